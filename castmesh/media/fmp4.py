"""Fragmented MP4 (ISO 14496-12, CMAF-style) writing for HLS: an initialization segment (ftyp + moov with
empty sample tables and mvex) and media segments (moof + mdat, one track fragment per track). No IO and no
decoding: the codec configuration records from FLV go into the sample entries as they are.

Video uses a 90 kHz timescale; AAC uses its sample rate, and every AAC frame lasts 1024 samples. Sample
flags mark sync samples, so a segment that starts on a keyframe is independent.
"""

from __future__ import annotations

import struct
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
