"""RTP packetizing for WebRTC viewers: H.264 (RFC 6184 mode 1), HEVC (RFC 7798), VP9 (RFC 9628), AV1 (the AOM's payload
format) and the RTP header, checked by putting the frames back together from the packets as a receiver
(libwebrtc, for AV1's frame ends) does."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.media.codecs import CodecError, VideoConfig, VideoSample
from castmesh.webrtc.rtp import (
    MAX_PAYLOAD,
    Packetizer,
    Reordered,
    av1_obus,
    av1_payloads,
    h264_payloads,
    h265_payloads,
    parse_header,
    vp9_payloads,
    with_payload_type,
)

SPS = bytes.fromhex("6764001eacd940a0")
PPS = bytes.fromhex("68ebe3cb")
CONFIG = VideoConfig("avc1", b"", 4, (SPS, PPS))


def sample(*units: bytes, keyframe: bool = False) -> VideoSample:
    return VideoSample(keyframe, 0, b"".join(struct.pack(">I", len(u)) + u for u in units))


def depacketize(payloads: list[bytes]) -> list[bytes]:
    """NAL units back from RFC 6184 payloads: single units, STAP-A, FU-A."""
    units: list[bytes] = []
    fragment = b""
    for p in payloads:
        kind = p[0] & 0x1F
        if kind == 24:
            pos = 1
            while pos < len(p):
                size = int.from_bytes(p[pos:pos + 2], "big")
                units.append(p[pos + 2:pos + 2 + size])
                pos += 2 + size
        elif kind == 28:
            if p[1] & 0x80:
                fragment = bytes((p[0] & 0xE0 | p[1] & 0x1F,))
            fragment += p[2:]
            if p[1] & 0x40:
                units.append(fragment)
        else:
            units.append(p)
    return units


def test_an_idr_gets_its_parameter_sets_and_large_units_are_fragmented() -> None:
    idr = b"\x65" + bytes(range(256)) * 20  # 5 KiB: FU-A
    sei = b"\x06\x05\x01\x00\x80"
    payloads = h264_payloads(sample(b"\x09\xf0", sei, idr, keyframe=True), CONFIG)
    assert payloads[0][0] & 0x1F == 24  # SPS and PPS in one STAP-A, first
    assert all(len(p) <= MAX_PAYLOAD for p in payloads)
    assert depacketize(payloads) == [SPS, PPS, sei, idr]  # the delimiter is left out
    assert {p[0] & 0x1F for p in payloads[2:]} == {28}


def test_parameter_sets_are_not_repeated_when_the_picture_carries_them() -> None:
    idr = b"\x65\x88\x84"
    assert depacketize(h264_payloads(sample(SPS, PPS, idr, keyframe=True), CONFIG)) == [SPS, PPS, idr]
    assert depacketize(h264_payloads(sample(b"\x41\x9a"), CONFIG)) == [b"\x41\x9a"]  # not an IDR: none


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=4000).map(lambda b: bytes((b[0] & 0x7F,)) + b[1:]),
                min_size=1, max_size=8),
       st.integers(min_value=16, max_value=1400))
def test_any_access_unit_comes_back_whole(units: list[bytes], max_payload: int) -> None:
    kept = [u for u in units if u[0] & 0x1F not in (0, 9, 12, *range(24, 32))]
    payloads = h264_payloads(sample(*units), CONFIG, max_payload)
    assert all(len(p) <= max_payload for p in payloads)
    restored = depacketize(payloads)
    if any(u[0] & 0x1F == 5 for u in kept) and not any(u[0] & 0x1F == 7 for u in kept):
        assert restored[:2] == [SPS, PPS]
        restored = restored[2:]
    assert restored == kept


def test_packets_are_numbered_stamped_and_marked() -> None:
    packetizer = Packetizer(102, 90_000, ssrc=0x01020304)
    packetizer.sequence = 0xFFFF  # wraps
    first = packetizer.packets([b"a", b"b"], 1000)
    second = packetizer.packets([b"c"], 1033)
    headers = [parse_header(p) for p in first + second]
    assert [h[2] for h in headers] == [0xFFFF, 0, 1]
    assert [h[0] for h in headers] == [False, True, True] and {h[1] for h in headers} == {102}
    assert headers[2][3] - headers[0][3] == 33 * 90 and headers[0][4] == 0x01020304
    assert first[0][12:] == b"a"
    assert parse_header(with_payload_type(first[1], 96))[:3] == (True, 96, 0)


def test_a_frame_presented_before_the_last_is_refused_as_b_frames() -> None:
    packetizer = Packetizer(102, 90_000)
    packetizer.packets([b"i"], 1000)
    with pytest.raises(Reordered, match="B-frames"):
        packetizer.packets([b"b"], 967)


def test_a_burst_is_restamped_one_tick_apart_ending_at_its_own_time() -> None:
    from castmesh.webrtc.rtp import burst

    packetizer = Packetizer(102, 90_000, ssrc=7)
    packets = [p for i in range(5) for p in packetizer.packets([b"x", b"y"], i * 40)]
    restamped = burst(packets)
    headers = [parse_header(p) for p in restamped]
    last = parse_header(packets[-1])[3]
    assert [h[3] for h in headers] == [(last - 4 + i // 2) & 0xFFFFFFFF for i in range(10)]
    assert [h[2] for h in headers] == [parse_header(p)[2] for p in packets]  # same numbers
    assert [p[12:] for p in restamped] == [p[12:] for p in packets] and burst([]) == []


def test_packets_come_back_as_the_pictures_they_carry() -> None:
    from castmesh.webrtc.rtp import H264Depacketizer

    packetizer = Packetizer(102, 90_000, ssrc=1)
    idr = b"\x65" + bytes(range(256)) * 12
    p_frame = b"\x41\x9a" + bytes(500)
    depacketizer = H264Depacketizer()
    pictures = []
    for i, (units, key) in enumerate([([idr], True), ([p_frame], False), ([p_frame, p_frame], False)]):
        for packet in packetizer.packets(h264_payloads(sample(*units, keyframe=key), CONFIG, 600), i * 33):
            marker, _, sequence, timestamp, _ = parse_header(packet)
            done = depacketizer.push(packet[12:], sequence, timestamp, marker)
            if done:
                pictures.append(done)
    assert [units for _, units in pictures] == [[SPS, PPS, idr], [p_frame], [p_frame, p_frame]]
    assert [t - pictures[0][0] for t, _ in pictures] == [0, 33 * 90, 66 * 90]


def test_a_picture_with_a_lost_packet_is_dropped_until_the_next_idr() -> None:
    from castmesh.webrtc.rtp import H264Depacketizer

    packetizer = Packetizer(102, 90_000, ssrc=1)
    frames = [([b"\x65" + bytes(3000)], True), ([b"\x41" + bytes(3000)], False), ([b"\x41" + bytes(10)], False),
              ([b"\x65" + bytes(10)], True)]
    depacketizer = H264Depacketizer()
    out = []
    for i, (units, key) in enumerate(frames):
        packets = packetizer.packets(h264_payloads(sample(*units, keyframe=key), CONFIG, 1200), i * 33)
        if i == 1:
            packets = packets[:1] + packets[2:]  # the P-frame loses a packet
        for packet in packets:
            marker, _, sequence, timestamp, _ = parse_header(packet)
            done = depacketizer.push(packet[12:], sequence, timestamp, marker)
            if done:
                out.append(done[1][-1][:1])
    assert out == [b"\x65", b"\x65"] and depacketizer.dropped == 2  # the broken P and the P after it


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=1500), st.integers(0, 0xFFFF), st.integers(0, 10), st.booleans()),
                max_size=50))
def test_any_packets_leave_a_depacketizer_within_its_limits(packets: list[tuple[bytes, int, int, bool]]) -> None:
    from castmesh.webrtc.rtp import MAX_ACCESS_UNIT, H264Depacketizer

    depacketizer = H264Depacketizer()
    for payload, sequence, timestamp, marker in packets:
        done = depacketizer.push(payload, sequence, timestamp, marker)
        assert depacketizer.size <= MAX_ACCESS_UNIT and len(depacketizer.units) <= 4096
        if done:
            assert all(1 <= u[0] & 0x1F <= 23 for u in done[1])


# VP9 and AV1 -----------------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=6000), st.booleans(), st.integers(min_value=16, max_value=1400))
def test_a_vp9_frame_comes_back_whole_behind_its_descriptors(frame: bytes, keyframe: bool, max_payload: int) -> None:
    payloads = vp9_payloads(VideoSample(keyframe, 0, frame), max_payload)
    assert all(len(p) <= max_payload for p in payloads)
    assert b"".join(p[1:] for p in payloads) == frame
    flags = [p[0] for p in payloads]
    assert flags[0] & 0x08 and flags[-1] & 0x04  # B on the first, E on the last
    assert all(not f & 0x08 for f in flags[1:]) and all(not f & 0x04 for f in flags[:-1])
    assert all(bool(f & 0x40) != keyframe for f in flags)  # P: predicted, unless a keyframe
    assert all(not f & 0xB3 for f in flags)  # no picture ID, layer indices, flexible mode or SS


def obu(kind: int, payload: bytes, extension: int | None = None) -> bytes:
    """An OBU as MP4 and FLV carry it: header, optional extension, leb128 size, payload."""
    header = bytes(((kind << 3) | 0x02 | (0x04 if extension is not None else 0),))
    size, value = bytearray(), len(payload)
    while True:
        size.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            break
    return header + (bytes((extension,)) if extension is not None else b"") + bytes(size) + payload


def av1_depacketize(payloads: list[bytes]) -> tuple[list[bytes], list[int]]:
    """OBU elements back from AV1 RTP payloads as libwebrtc reads them (Z, Y, W, lengths), and the indexes
    of packets that end on an OBU boundary (Y=0: where libwebrtc ends a frame)."""
    elements: list[bytes] = []
    ends = []
    expect_continued = False
    for i, p in enumerate(payloads):
        z, y, w = p[0] & 0x80, p[0] & 0x40, (p[0] >> 4) & 0x03
        assert bool(z) == expect_continued
        pos, number = 1, 1
        while pos < len(p):
            if w and number == w:
                size = len(p) - pos
            else:
                size, shift = 0, 0
                while True:
                    byte = p[pos]
                    size |= (byte & 0x7F) << shift
                    pos, shift = pos + 1, shift + 7
                    if not byte & 0x80:
                        break
            piece = p[pos:pos + size]
            if number == 1 and z:
                elements[-1] += piece
            else:
                elements.append(piece)
            pos, number = pos + size, number + 1
        expect_continued = bool(y)
        if not y:
            ends.append(i)
    assert not expect_continued
    return elements, ends


SEQUENCE_HEADER = obu(1, bytes.fromhex("0000000a0bf3fb5f"))
AV1_CONFIG = VideoConfig("av01", b"\x81\x00\x0c\x00" + SEQUENCE_HEADER, 4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 15]), st.binary(min_size=1, max_size=3000),
                          st.one_of(st.none(), st.integers(0, 255))), min_size=1, max_size=6),
       st.booleans(), st.integers(min_value=24, max_value=1400))
def test_an_av1_temporal_unit_comes_back_as_its_obus_and_packets_end_only_with_it(
        obus: list[tuple[int, bytes, int | None]], keyframe: bool, max_payload: int) -> None:
    unit = obu(2, b"") + b"".join(obu(kind, payload, ext) for kind, payload, ext in obus)  # a temporal delimiter
    sent = [(k, p, e) for k, p, e in obus if k not in (2, 15)]
    if not sent and not keyframe:
        with pytest.raises(CodecError):
            av1_payloads(VideoSample(keyframe, 0, unit), AV1_CONFIG, max_payload)
        return
    payloads = av1_payloads(VideoSample(keyframe, 0, unit), AV1_CONFIG, max_payload)
    assert all(len(p) <= max_payload for p in payloads)
    elements, ends = av1_depacketize(payloads)
    expected = [bytes((k << 3 | (0x04 if e is not None else 0),)) + (bytes((e,)) if e is not None else b"") + p
                for k, p, e in sent]
    if keyframe and not any(k == 1 for k, _, _ in sent):  # the configuration's sequence header goes first
        expected.insert(0, bytes((1 << 3,)) + SEQUENCE_HEADER[2:])
    assert elements == expected
    assert ends == [len(payloads) - 1]  # no packet but the last ends on an OBU boundary
    assert bool(payloads[0][0] & 0x08) == keyframe  # N on a keyframe's first packet
    assert all(not p[0] & 0x08 for p in payloads[1:])


def test_a_malformed_av1_temporal_unit_is_refused() -> None:
    for bad in (b"\x80", b"\x32\x05\x01", b"\x36", b"\x32\xff\xff\xff\xff\xff\xff\xff\xff"):
        with pytest.raises(CodecError):
            av1_obus(bad)


# HEVC ------------------------------------------------------------------------------------------------------

VPS, HSPS, HPPS = bytes.fromhex("40010c01ffff"), bytes.fromhex("420101016000"), bytes.fromhex("4401c172b4")
HEVC_CONFIG = VideoConfig("hvc1", b"", 4, (VPS, HSPS, HPPS))


def h265_depacketize(payloads: list[bytes]) -> list[bytes]:
    """NAL units back from RFC 7798 payloads: single NAL units, APs, FUs (no DONL)."""
    units: list[bytes] = []
    fragment = b""
    for p in payloads:
        kind = (p[0] >> 1) & 0x3F
        if kind == 48:
            pos = 2
            while pos < len(p):
                size = int.from_bytes(p[pos:pos + 2], "big")
                units.append(p[pos + 2:pos + 2 + size])
                pos += 2 + size
        elif kind == 49:
            if p[2] & 0x80:
                fragment = bytes((p[0] & 0x81 | (p[2] & 0x3F) << 1, p[1]))
            fragment += p[3:]
            if p[2] & 0x40:
                units.append(fragment)
        else:
            units.append(p)
    return units


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 19, 20, 21, 39, 35]), st.binary(min_size=1, max_size=4000)),
                min_size=1, max_size=6),
       st.integers(min_value=24, max_value=1400))
def test_any_hevc_access_unit_comes_back_whole(units: list[tuple[int, bytes]], max_payload: int) -> None:
    nals = [bytes((kind << 1, 0x01)) + body for kind, body in units]
    payloads = h265_payloads(sample(*nals), HEVC_CONFIG, max_payload)
    assert all(len(p) <= max_payload for p in payloads)
    kept = [n for n in nals if (n[0] >> 1) & 0x3F != 35]  # access unit delimiters are left out
    restored = h265_depacketize(payloads)
    if any(19 <= (n[0] >> 1) & 0x3F <= 21 for n in kept):  # an IRAP picture: VPS, SPS and PPS first
        assert restored[:3] == [VPS, HSPS, HPPS]
        restored = restored[3:]
    assert restored == kept
