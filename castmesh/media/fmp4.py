"""Fragmented MP4 (ISO 14496-12, CMAF-style) writing for HLS and recordings: an initialization segment
(ftyp + moov with empty sample tables and mvex) and media segments (moof + mdat, one track fragment per
track). No IO and no decoding: the codec configuration records from FLV go into the sample entries as they
are. Reading, for recordings played back: the fragments of a file as castmesh wrote it (read_index), with
their times, and tfdt rewritten so that pieces of several files make one timeline (shift_times).

Video uses a 90 kHz timescale; AAC uses its sample rate, and every AAC frame lasts 1024 samples. Sample
flags mark sync samples, so a segment that starts on a keyframe is independent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from castmesh.media.codecs import AudioConfig, VideoConfig

VIDEO_TIMESCALE = 90_000
AAC_FRAME_SAMPLES = 1024
VIDEO_TRACK, AUDIO_TRACK = 1, 2
_SYNC, _NON_SYNC = 0x02000000, 0x01010000  # sample_depends_on=2 (I) / 1 with sample_is_non_sync_sample
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *parts)


@dataclass(slots=True)
class Sample:
    duration: int
    data: bytes
    sync: bool = True
    composition_offset: int = 0


@dataclass(slots=True)
class TrackRun:
    track_id: int
    base_time: int
    samples: list[Sample] = field(default_factory=list)


def init_segment(video: VideoConfig | None, audio: AudioConfig | None, width: int = 0, height: int = 0) -> bytes:
    traks, trexs = [], []
    if video is not None:
        traks.append(_trak(VIDEO_TRACK, VIDEO_TIMESCALE, b"vide", _video_entry(video, width, height), width, height))
        trexs.append(_trex(VIDEO_TRACK))
    if audio is not None:
        traks.append(_trak(AUDIO_TRACK, audio.sample_rate, b"soun", _audio_entry(audio)))
        trexs.append(_trex(AUDIO_TRACK))
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6", b"cmfc", b"iso5", b"mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x10000, 0x100),
                    bytes(10), _MATRIX, bytes(24), struct.pack(">I", 3))
    return ftyp + box(b"moov", mvhd, *traks, box(b"mvex", *trexs))


def _trak(track_id: int, timescale: int, handler: bytes, entry: bytes, width: int = 0, height: int = 0) -> bytes:
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track_id, 0, 0), bytes(8),
                    struct.pack(">hhhH", 0, 0, 0x100 if handler == b"soun" else 0, 0), _MATRIX,
                    struct.pack(">II", width << 16, height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))  # language "und"
    hdlr = full_box(b"hdlr", 0, 0, bytes(4), handler, bytes(12), b"castmesh\x00")
    header = full_box(b"vmhd", 0, 1, bytes(8)) if handler == b"vide" else full_box(b"smhd", 0, 0, bytes(4))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), entry),
               full_box(b"stts", 0, 0, bytes(4)), full_box(b"stsc", 0, 0, bytes(4)),
               full_box(b"stsz", 0, 0, bytes(8)), full_box(b"stco", 0, 0, bytes(4)))
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", header, dinf, stbl)))


_CONFIG_BOX = {"avc1": b"avcC", "hvc1": b"hvcC", "av01": b"av1C", "vp09": b"vpcC"}


def _vpcc(record: bytes) -> bytes:
    """vpcC's body: a full box (version 1, flags 0) around the VPCodecConfigurationRecord. E-RTMP senders
    differ on whether the record they send has the version and flags already (ffmpeg's has: 01 000000,
    then the profile and a level of 10 or more, so a second byte of 0 tells them apart)."""
    if len(record) >= 12 and record[0] == 1 and record[1:4] == b"\x00\x00\x00":
        return record
    return b"\x01\x00\x00\x00" + record


def _video_entry(video: VideoConfig, width: int, height: int) -> bytes:
    config = video.record if video.codec != "vp09" else _vpcc(video.record)
    return box(video.codec.encode(), bytes(6), struct.pack(">H", 1), bytes(16),
               struct.pack(">HHIIIH", width, height, 0x480000, 0x480000, 0, 1), bytes(32),
               struct.pack(">Hh", 0x18, -1), box(_CONFIG_BOX[video.codec], config))


def _descriptor(tag: int, body: bytes) -> bytes:
    size = len(body)  # four-byte length form, as most muxers write it
    return bytes((tag, 0x80 | (size >> 21) & 0x7F, 0x80 | (size >> 14) & 0x7F, 0x80 | (size >> 7) & 0x7F,
                  size & 0x7F)) + body


def _audio_entry(audio: AudioConfig) -> bytes:
    decoder_config = _descriptor(0x04, bytes((0x40, 0x15)) + bytes(11) + _descriptor(0x05, audio.record))
    es = _descriptor(0x03, struct.pack(">HB", 0, 0) + decoder_config + _descriptor(0x06, b"\x02"))
    channels = 8 if audio.channels == 7 else audio.channels  # configuration 7 is 7.1
    return box(b"mp4a", bytes(6), struct.pack(">H", 1), bytes(8), struct.pack(">HHHH", channels, 16, 0, 0),
               struct.pack(">I", min(audio.sample_rate, 0xFFFF) << 16), full_box(b"esds", 0, 0, es))


def _trex(track_id: int) -> bytes:
    return full_box(b"trex", 0, 0, struct.pack(">IIIII", track_id, 1, 0, 0, 0))


def media_segment(sequence: int, runs: list[TrackRun]) -> bytes:
    """moof + mdat for one segment: each run's samples, in run order, in one mdat."""
    runs = [run for run in runs if run.samples]

    def moof(data_start: int) -> bytes:
        trafs, offset = [], data_start
        for run in runs:
            trafs.append(_traf(run, offset))
            offset += sum(len(s.data) for s in run.samples)
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)

    size = len(moof(0))  # offsets do not change the size: measure, then write with the real ones
    mdat_body = b"".join(s.data for run in runs for s in run.samples)
    return moof(size + 8) + struct.pack(">I", 8 + len(mdat_body)) + b"mdat" + mdat_body


def _traf(run: TrackRun, data_offset: int) -> bytes:
    tfhd = full_box(b"tfhd", 0, 0x020000, struct.pack(">I", run.track_id))  # default-base-is-moof
    tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", run.base_time))
    entries = b"".join(struct.pack(">IIIi", s.duration, len(s.data), _SYNC if s.sync else _NON_SYNC,
                                   s.composition_offset) for s in run.samples)
    # data offset, duration, size, flags and (signed, version 1) composition offset per sample
    trun = full_box(b"trun", 1, 0x000F01, struct.pack(">Ii", len(run.samples), data_offset), entries)
    return box(b"traf", tfhd, tfdt, trun)


# Reading: what recordings need of their own files ----------------------------------------------------------

MAX_MOOV = 1 << 20  # bytes an initialization segment may have
MAX_MOOF = 4 << 20  # bytes of one fragment's moof (its sample table)


class Mp4Error(ValueError):
    """A file that is not fragmented MP4 as castmesh writes it: the message says where it went wrong."""


@dataclass(frozen=True, slots=True)
class Fragment:
    offset: int  # of its moof, in the file
    size: int  # moof and mdat
    start: int  # the pacing track's base time (tfdt), in its timescale
    duration: int  # the pacing track's sample durations, summed
    independent: bool  # its first sample of the pacing track is a sync sample


@dataclass(frozen=True, slots=True)
class Index:
    init_size: int  # ftyp + moov: bytes 0..init_size of the file
    track: int  # the pacing track (video if there is one, else audio)
    timescale: int  # the pacing track's
    fragments: list[Fragment]
    complete: int  # bytes of the file up to the end of its last whole fragment


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, body start, box end) of the boxes in data[start:end]."""
    found = []
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        if size < 8 or start + size > end:
            raise Mp4Error(f"box {kind!r} at {start}: size {size} does not fit")
        found.append((kind, start + 8, start + size))
        start += size
    return found


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def read_index(read: Callable[[int, int], bytes], size: int) -> Index:
    """The fragments of a fragmented MP4 file of `size` bytes, read through read(offset, length). A fragment
    cut short (a file still being written, or a writer that died) is left out: `complete` says where the
    whole ones end. Mp4Error if the file does not start with an initialization segment."""
    head = read(0, min(size, MAX_MOOV))
    offset, moov = 0, None
    while offset + 8 <= len(head):
        box_size, kind = struct.unpack_from(">I4s", head, offset)
        if box_size < 8:
            raise Mp4Error(f"box {kind!r} at {offset}: size {box_size}")
        if kind == b"moov":
            if offset + box_size > len(head):
                raise Mp4Error(f"moov over {MAX_MOOV} bytes, or cut short")
            moov = (offset + 8, offset + box_size)
            offset += box_size
            break
        offset += box_size
    if moov is None:
        raise Mp4Error("no moov box at the start")
    timescales: dict[int, tuple[int, bytes]] = {}  # track id -> (timescale, handler)
    for kind, start, end in _boxes(head, *moov):
        if kind != b"trak":
            continue
        tkhd, mdia = _child(head, start, end, b"tkhd"), _child(head, start, end, b"mdia")
        if tkhd is None or mdia is None:
            raise Mp4Error("a trak without tkhd or mdia")
        version = head[tkhd[0]]
        track_id = struct.unpack_from(">I", head, tkhd[0] + (20 if version else 12))[0]
        mdhd, hdlr = _child(head, *mdia, b"mdhd"), _child(head, *mdia, b"hdlr")
        if mdhd is None or hdlr is None:
            raise Mp4Error("an mdia without mdhd or hdlr")
        timescale = struct.unpack_from(">I", head, mdhd[0] + (20 if head[mdhd[0]] else 12))[0]
        timescales[track_id] = (timescale, head[hdlr[0] + 8:hdlr[0] + 12])
    if not timescales:
        raise Mp4Error("no tracks")
    track = next((t for t, (_, handler) in timescales.items() if handler == b"vide"), min(timescales))
    init_size, fragments, complete = offset, [], offset
    while offset + 8 <= size:
        box_size, kind = struct.unpack(">I4s", read(offset, 8))
        if box_size < 8:
            raise Mp4Error(f"box {kind!r} at {offset}: size {box_size}")
        if kind != b"moof":  # (free, or the like)
            if offset + box_size > size:
                break
            offset = complete = offset + box_size
            continue
        if box_size > MAX_MOOF:
            raise Mp4Error(f"moof at {offset}: {box_size} bytes, over {MAX_MOOF}")
        moof = read(offset, box_size)
        if len(moof) < box_size:
            break
        mdat_at = offset + box_size
        mdat = read(mdat_at, 8)
        if len(mdat) < 8 or mdat[4:8] != b"mdat":
            break
        end = mdat_at + struct.unpack(">I", mdat[:4])[0]
        if end > size:
            break  # its media are not all there
        found = _pacing_run(moof, track)
        if found is not None:
            fragments.append(Fragment(offset, end - offset, *found))
        offset = complete = end
    return Index(init_size, track, timescales[track][0], fragments, complete)


def _pacing_run(moof: bytes, track: int) -> tuple[int, int, bool] | None:
    """(base time, duration, independent) of `track`'s run in a moof, if it has one."""
    for kind, start, end in _boxes(moof, 8, len(moof)):
        if kind != b"traf":
            continue
        tfhd, tfdt, trun = (_child(moof, start, end, k) for k in (b"tfhd", b"tfdt", b"trun"))
        if tfhd is None or tfdt is None or trun is None:
            continue
        if struct.unpack_from(">I", moof, tfhd[0] + 4)[0] != track:
            continue
        base = struct.unpack_from(">Q" if moof[tfdt[0]] else ">I", moof, tfdt[0] + 4)[0]
        flags, count = struct.unpack_from(">II", moof, trun[0])
        at = trun[0] + 12  # past the data offset: then duration, size, flags, composition offset per sample
        if flags & 0xFFFFFF != 0x000F01 or at + count * 16 > trun[1]:
            raise Mp4Error(f"a trun with flags {flags & 0xFFFFFF:#x}: castmesh writes 0xf01")
        durations = struct.unpack_from(f">{count * 4}I", moof, at)[0::4]
        first_flags = struct.unpack_from(">I", moof, at + 8)[0] if count else _NON_SYNC
        return base, sum(durations), first_flags == _SYNC
    return None


def shift_times(moof: bytes, shifts: dict[int, int]) -> bytes:
    """A moof with each track's tfdt moved by shifts[track] (in that track's timescale): how a download
    made of several recordings keeps one timeline."""
    out = bytearray(moof)
    for kind, start, end in _boxes(moof, 8, len(moof)):
        if kind != b"traf":
            continue
        tfhd, tfdt = _child(moof, start, end, b"tfhd"), _child(moof, start, end, b"tfdt")
        if tfhd is None or tfdt is None or moof[tfdt[0]] != 1:
            continue
        shift = shifts.get(struct.unpack_from(">I", moof, tfhd[0] + 4)[0], 0)
        base = struct.unpack_from(">Q", moof, tfdt[0] + 4)[0]
        struct.pack_into(">Q", out, tfdt[0] + 4, max(0, base + shift))
    return bytes(out)


def track_timescales(init: bytes) -> dict[int, int]:
    """track id -> timescale, from an initialization segment."""
    moov = _child(init, 0, len(init), b"moov")
    if moov is None:
        raise Mp4Error("no moov box")
    scales = {}
    for kind, start, end in _boxes(init, *moov):
        if kind != b"trak":
            continue
        tkhd, mdia = _child(init, start, end, b"tkhd"), _child(init, start, end, b"mdia")
        if tkhd is None or mdia is None:
            continue
        mdhd = _child(init, *mdia, b"mdhd")
        if mdhd is None:
            continue
        track_id = struct.unpack_from(">I", init, tkhd[0] + (20 if init[tkhd[0]] else 12))[0]
        scales[track_id] = struct.unpack_from(">I", init, mdhd[0] + (20 if init[mdhd[0]] else 12))[0]
    return scales

