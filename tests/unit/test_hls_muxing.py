"""The HLS muxers on their own: MPEG-TS packets and tables, fMP4 boxes, codec configuration parsing, and
the segmenter's cutting, windowing and discontinuity rules."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.media import codecs, fmp4, mpegts
from castmesh.media.frames import AUDIO, VIDEO, make_frame
from castmesh.media.hls import HlsError, Segmenter
from castmesh.proto.v1.media_pb2 import Frame

SPS = bytes.fromhex("6764001eacd940a0")
PPS = bytes.fromhex("68ebe3cb")
AVC_RECORD = bytes((1, 0x64, 0, 0x1E, 0xFF, 0xE1)) + struct.pack(">H", len(SPS)) + SPS + b"\x01" + \
    struct.pack(">H", len(PPS)) + PPS
AAC_LC_44100_STEREO = bytes.fromhex("1210")


def video(ts: int, keyframe: bool, cts: int = 0, nal: bytes = b"\x65\x88\x84") -> Frame:
    body = bytes((0x17 if keyframe else 0x27, 1)) + (cts & 0xFFFFFF).to_bytes(3, "big")
    nal = nal if keyframe else b"\x41\x9a" + nal[2:]
    return make_frame(VIDEO, ts, body + struct.pack(">I", len(nal)) + nal)


def config_frames() -> list[Frame]:
    return [make_frame(VIDEO, 0, b"\x17\x00\x00\x00\x00" + AVC_RECORD),
            make_frame(AUDIO, 0, b"\xaf\x00" + AAC_LC_44100_STEREO)]


def audio(ts: int) -> Frame:
    return make_frame(AUDIO, ts, b"\xaf\x01" + b"\x21" * 20)


def stream(seconds: float, gop_ms: int = 1000, fps: int = 25, start: int = 0) -> list[Frame]:
    frames = []
    step = 1000 // fps
    for ts in range(start, start + int(seconds * 1000), step):
        frames.append(video(ts, (ts - start) % gop_ms == 0))
        frames.append(audio(ts))
    return frames


# MPEG-TS ----------------------------------------------------------------------------------------------


def test_crc_is_crc32_mpeg2() -> None:
    assert mpegts.crc32_mpeg2(b"123456789") == 0x0376E6E7  # the catalogue's check value


def read_section(packet: bytes) -> bytes:
    assert packet[0] == 0x47 and packet[1] & 0x40
    pointer = packet[4]
    section = packet[5 + pointer:]
    length = ((section[1] & 0x0F) << 8) | section[2]
    whole = section[:3 + length]
    assert mpegts.crc32_mpeg2(whole[:-4]) == int.from_bytes(whole[-4:], "big"), "CRC"
    return whole


def test_pat_and_pmt_name_program_1_and_its_streams() -> None:
    tables = mpegts.TsWriter(True, True).tables()
    assert len(tables) == 2 * 188
    pat = read_section(tables[:188])
    assert pat[0] == 0 and pat[8:10] == b"\x00\x01" and (((pat[10] & 0x1F) << 8) | pat[11]) == mpegts.PMT_PID
    pmt = read_section(tables[188:])
    assert pmt[0] == 2 and pmt[3:5] == b"\x00\x01"
    assert pmt[12:17] == bytes((0x1B, 0xE1, 0x00, 0xF0, 0)) and pmt[17:22] == bytes((0x0F, 0xE1, 0x01, 0xF0, 0))


def read_packets(data: bytes, pid: int) -> tuple[bytes, list[int], list[bytes]]:
    """The payload of one PES spread over packets, their continuity counters and adaptation fields."""
    assert len(data) % 188 == 0
    payload, counters, fields = b"", [], []
    for at in range(0, len(data), 188):
        packet = data[at:at + 188]
        assert packet[0] == 0x47 and ((packet[1] & 0x1F) << 8) | packet[2] == pid
        assert bool(packet[1] & 0x40) == (at == 0)
        counters.append(packet[3] & 0x0F)
        start = 4
        if packet[3] & 0x20:
            fields.append(packet[5:5 + packet[4]])
            start += 1 + packet[4]
        payload += packet[start:]
    return payload, counters, fields


@settings(max_examples=200, deadline=None)
@given(size=st.integers(min_value=1, max_value=2000), pts=st.integers(min_value=0, max_value=(1 << 33) - 1),
       cts=st.integers(min_value=0, max_value=90_000), keyframe=st.booleans())
def test_video_pes_packets_round_trip(size: int, pts: int, cts: int, keyframe: bool) -> None:
    writer = mpegts.TsWriter(True, True)
    access_unit = bytes(i & 0xFF for i in range(size))
    data = writer.video(access_unit, pts + cts, pts, keyframe)
    payload, counters, fields = read_packets(data, mpegts.VIDEO_PID)
    assert counters == [i & 0x0F for i in range(len(counters))]
    assert fields and fields[0][0] & 0x10  # PCR on the first packet of the video PID
    assert bool(fields[0][0] & 0x40) == keyframe
    assert payload[:4] == b"\x00\x00\x01\xe0"
    header_length = payload[8]
    assert payload[9 + header_length:] == access_unit

    def timestamp(b: bytes) -> int:
        return ((b[0] >> 1) & 7) << 30 | b[1] << 22 | (b[2] >> 1) << 15 | b[3] << 7 | b[4] >> 1

    if cts:
        assert payload[7] == 0xC0 and timestamp(payload[9:14]) == (pts + cts) % (1 << 33)
        assert timestamp(payload[14:19]) == pts
    else:
        assert payload[7] == 0x80 and timestamp(payload[9:14]) == pts


def test_audio_pes_has_its_length() -> None:
    writer = mpegts.TsWriter(False, True)
    payload, _, fields = read_packets(writer.audio(b"\xff" * 300, 9000), mpegts.AUDIO_PID)
    assert fields[0][0] & 0x10  # audio-only: PCR on the audio PID
    assert int.from_bytes(payload[4:6], "big") == len(payload) - 6


# Codecs -------------------------------------------------------------------------------------------------


def test_avc_config_and_annex_b() -> None:
    config = codecs.read_video(b"\x17\x00\x00\x00\x00" + AVC_RECORD)
    assert isinstance(config, codecs.VideoConfig)
    assert config.codec == "avc1" and config.nal_length_size == 4 and config.parameter_sets == (SPS, PPS)
    sample = codecs.read_video(video(0, True, cts=-40).payload)
    assert isinstance(sample, codecs.VideoSample) and sample.keyframe and sample.composition_ms == -40
    start = b"\x00\x00\x00\x01"
    assert codecs.annex_b(sample, config) == start + b"\x09\xf0" + start + SPS + start + PPS + start + b"\x65\x88\x84"
    inter = codecs.read_video(video(40, False).payload)
    assert isinstance(inter, codecs.VideoSample)
    assert codecs.annex_b(inter, config) == start + b"\x09\xf0" + start + b"\x41\x9a\x84"


@pytest.mark.parametrize("body", [b"\x17\x01\x00\x00\x00\x00\x00\x00\x09\x65",  # NAL longer than the tag
                                  b"\x17\x00\x00\x00\x00\x01\x64",  # truncated record
                                  b"\x17\x01", b"\x9f"])
def test_bad_video_is_a_codec_error(body: bytes) -> None:
    with pytest.raises(codecs.CodecError):
        item = codecs.read_video(body)
        if isinstance(item, codecs.VideoSample):
            codecs.nal_units(item.data, 4)


@pytest.mark.parametrize(("asc", "expected"), [
    ("1210", (2, 44100, 4, 2)),  # AAC-LC 44.1 kHz stereo (what ffmpeg's aac encoder writes)
    ("1188", (2, 48000, 3, 1)),  # AAC-LC 48 kHz mono
    ("2b920800", (2, 22050, 7, 2)),  # HE-AAC (SBR) signalled explicitly: the LC core
])
def test_audio_specific_config(asc: str, expected: tuple[int, int, int, int]) -> None:
    config = codecs.aac_config(bytes.fromhex(asc))
    assert (config.object_type, config.sample_rate, config.rate_index, config.channels) == expected


def test_adts_header_fields() -> None:
    header = codecs.adts_header(codecs.aac_config(AAC_LC_44100_STEREO), 100)
    assert header[:2] == b"\xff\xf1"
    assert header[2] >> 6 == 1 and (header[2] >> 2) & 0x0F == 4  # LC, 44.1 kHz
    assert ((header[2] & 1) << 2 | header[3] >> 6) == 2  # stereo
    assert ((header[3] & 3) << 11 | header[4] << 3 | header[5] >> 5) == 107  # frame length with the header
    with pytest.raises(codecs.CodecError):
        codecs.aac_config(b"\x12")


# fMP4 ---------------------------------------------------------------------------------------------------


def boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    out, at = [], 0
    while at < len(data):
        size, kind = struct.unpack_from(">I4s", data, at)
        assert size >= 8 and at + size <= len(data), (kind, size)
        out.append((kind, data[at + 8:at + size]))
        at += size
    return out


def find(data: bytes, path: list[bytes], skip: dict[bytes, int] | None = None) -> bytes:
    skip = {b"stsd": 8, b"avc1": 78, b"mp4a": 28, **(skip or {})}
    for kind, body in boxes(data):
        if kind == path[0]:
            return body if len(path) == 1 else find(body[skip.get(kind, 0):], path[1:], skip)
    raise AssertionError(f"no {path[0]!r} in {[k for k, _ in boxes(data)]}")


def test_init_segment_carries_the_records_as_they_came() -> None:
    video_config = codecs.read_video(b"\x17\x00\x00\x00\x00" + AVC_RECORD)
    audio_config = codecs.read_audio(b"\xaf\x00" + AAC_LC_44100_STEREO)
    assert isinstance(video_config, codecs.VideoConfig) and isinstance(audio_config, codecs.AudioConfig)
    init = fmp4.init_segment(video_config, audio_config, 640, 360)
    assert [k for k, _ in boxes(init)] == [b"ftyp", b"moov"]
    traks = [body for kind, body in boxes(find(init, [b"moov"])) if kind == b"trak"]
    assert len(traks) == 2
    avcc = find(traks[0], [b"mdia", b"minf", b"stbl", b"stsd", b"avc1", b"avcC"])
    assert avcc == AVC_RECORD
    assert struct.unpack_from(">HH", find(traks[0], [b"mdia", b"minf", b"stbl", b"stsd", b"avc1"]), 24) == (640, 360)
    assert struct.unpack_from(">I", find(traks[1], [b"mdia", b"mdhd"]), 12)[0] == 44100  # timescale
    esds = find(traks[1], [b"mdia", b"minf", b"stbl", b"stsd", b"mp4a", b"esds"])
    assert esds.endswith(b"\x05\x80\x80\x80\x02" + AAC_LC_44100_STEREO + b"\x06\x80\x80\x80\x01\x02")
    trex = [body for kind, body in boxes(find(init, [b"moov", b"mvex"]))]
    assert len(trex) == 2


def test_media_segment_offsets_point_at_the_samples() -> None:
    runs = [fmp4.TrackRun(1, 900, [fmp4.Sample(3000, b"V1" * 10, True, 3000), fmp4.Sample(3000, b"V2" * 5, False)]),
            fmp4.TrackRun(2, 441, [fmp4.Sample(1024, b"A" * 7)])]
    segment = fmp4.media_segment(7, runs)
    (moof_kind, moof), (mdat_kind, mdat) = boxes(segment)
    assert (moof_kind, mdat_kind) == (b"moof", b"mdat")
    assert struct.unpack(">I", find(moof, [b"mfhd"])[4:8])[0] == 7
    trafs = [body for kind, body in boxes(moof) if kind == b"traf"]
    for traf, run in zip(trafs, runs, strict=True):
        assert struct.unpack(">Q", find(traf, [b"tfdt"])[4:12])[0] == run.base_time
        trun = find(traf, [b"trun"])
        count, offset = struct.unpack_from(">Ii", trun, 4)
        assert count == len(run.samples)
        start = offset - (len(moof) + 8 + 8)  # offsets count from the moof's first byte
        assert mdat[start:start + len(run.samples[0].data)] == run.samples[0].data


# Segmenter ----------------------------------------------------------------------------------------------


def test_segments_cut_on_keyframes_at_the_target() -> None:
    seg = Segmenter("ts", target_ms=2000, window=3)
    done = seg.push(config_frames() + stream(9.1, gop_ms=1000))
    assert [s.duration for s in done] == [2.0, 2.0, 2.0, 2.0]
    assert [s.sequence for s in seg.listed()] == [1, 2, 3]
    assert seg.segment(0) is not None  # kept a little past the window for slow clients
    text = seg.playlist("p/")
    assert "#EXT-X-MEDIA-SEQUENCE:1" in text and "#EXT-X-TARGETDURATION:2" in text and "p/3.ts" in text
    assert all(s.data[:1] == b"\x47" and len(s.data) % 188 == 0 for s in done)


def test_long_gops_raise_the_target_duration() -> None:
    seg = Segmenter("ts", target_ms=2000)
    seg.push(config_frames() + stream(10, gop_ms=3000))
    assert [s.duration for s in seg.listed()] == [3.0, 3.0, 3.0]
    assert seg.target_duration == 3


def test_discontinuity_cuts_at_the_next_keyframe_and_is_counted_when_it_leaves() -> None:
    seg = Segmenter("ts", target_ms=2000, window=2, keep=0)
    seg.push(config_frames() + stream(3.5))
    seg.mark_discontinuity()
    seg.push(stream(0.5, start=3500)[2:])  # what is left of the old GOP, then a keyframe at 4000
    seg.push(stream(6.1, start=4000))
    text = seg.playlist("")
    listed = seg.listed()
    assert [s.discontinuity for s in listed] == [False, False]
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:1" in text and "#EXT-X-DISCONTINUITY\n" not in text
    seg2 = Segmenter("ts", target_ms=2000, window=6)
    seg2.push(config_frames() + stream(3.5))
    seg2.mark_discontinuity()
    seg2.push(stream(2.1, start=4000))
    assert [s.discontinuity for s in seg2.listed()] == [False, False, True]
    assert [s.duration for s in seg2.listed()][:2] == [2.0, 2.0]
    assert "#EXT-X-DISCONTINUITY\n" in seg2.playlist("")


def test_nothing_before_the_first_keyframe_and_bad_frames_are_dropped() -> None:
    seg = Segmenter("fmp4", target_ms=1000)
    frames = [*config_frames(), video(0, False), audio(0), *stream(2.1, start=40)]
    frames.insert(5, make_frame(VIDEO, 50, b"\x27\x01\x00\x00\x00\x00\x00\x00\xff\x41"))  # NAL past the end
    done = seg.push(frames)
    assert seg.dropped_frames == 1
    assert [s.duration for s in done] == [1.0, 1.0] and done[0].extension == "m4s"
    assert 0 in seg.inits and "#EXT-X-MAP:URI=\"init-0.mp4\"" in seg.playlist("")  # named after segment 0


def test_a_new_configuration_means_a_new_init_segment() -> None:
    seg = Segmenter("fmp4", target_ms=1000)
    seg.push(config_frames() + stream(2.1))
    changed = AVC_RECORD[:3] + b"\x28" + AVC_RECORD[4:]  # another level
    seg.push([make_frame(VIDEO, 2100, b"\x17\x00\x00\x00\x00" + changed), *stream(2.1, start=2120)])
    listed = seg.listed()
    assert [s.init for s in listed] == [0, 0, 0, 3, 3] and listed[3].discontinuity  # named by first segment
    assert listed[2].duration == 0.12  # the open segment closes where the new configuration takes over
    text = seg.playlist("")
    assert text.count("#EXT-X-MAP") == 2 and "#EXT-X-DISCONTINUITY" in text


def test_ts_refuses_hevc_and_auto_picks_fmp4() -> None:
    hevc_record = bytes(22) + b"\x00"
    hevc = make_frame(VIDEO, 0, b"\x1c\x00\x00\x00\x00" + hevc_record)
    keyframe = make_frame(VIDEO, 0, b"\x1c\x01\x00\x00\x00" + b"\x00\x00\x00\x02\x26\x01")
    with pytest.raises(HlsError):
        Segmenter("ts").push([hevc, keyframe])
    seg = Segmenter("auto", target_ms=1000, has_audio=False)
    seg.push([hevc, keyframe, make_frame(VIDEO, 1000, keyframe.payload)])
    assert seg.resolved() == "fmp4" and seg.listed()[0].extension == "m4s"


def test_a_muxer_remembers_only_the_clients_of_the_last_window(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each playlist request from a new connection is a new client: without pruning on requests, a muxer
    that nobody scraped /metrics for grew one entry per connection for as long as it ran."""
    from services.playback import hls as playback_hls

    monkeypatch.setattr(playback_hls, "CLIENT_WINDOW", 0.02)  # target durations: 20 ms here

    async def scenario() -> tuple[int, int]:
        muxer = playback_hls.HlsMuxer("live/x", "ts", 1000, 6, 30, on_stop=lambda m: None)
        for i in range(1000):
            muxer.playlist("p/", f"10.0.0.1:{i}", lambda status, body, reason: None, wait=False)
        before = len(muxer.clients)
        await asyncio.sleep(0.05)
        muxer.playlist("p/", "10.0.0.2:1", lambda status, body, reason: None, wait=False)
        after = len(muxer.clients)
        muxer.stop("test over")
        return before, after

    assert asyncio.run(scenario()) == (1000, 1)
