"""RTP for WebRTC viewers, sans-IO: a stream's frames as RTP packets, made once per stream and sent as the
same bytes to every viewer (only SRTP, which is keyed per peer, is done per viewer).

- RTP headers (RFC 3550 5.1): version 2, no padding, no extensions, no CSRC; the marker on the last
  packet of a video frame.
- H.264 (RFC 6184, packetization-mode=1): a NAL unit that fits is a packet of its own; a larger one is
  cut into FU-A fragments; SPS and PPS go before every IDR picture in one STAP-A, so a viewer can start
  at any keyframe. Access unit delimiters, filler and types no picture carries (0, 24-31, which would
  read as aggregation or fragment packets) are left out.
- HEVC (RFC 7798, no DONL): as H.264, with its two-byte NAL header: single NAL unit packets, FUs for
  larger units, VPS, SPS and PPS in an AP before every IRAP picture.
- VP9 (RFC 9628): the frame cut into packets behind a one-byte descriptor (P: predicted, B: first, E:
  last), with no picture ID or layer indices, so receivers order and reference pictures by sequence number
  as for H.264 (libwebrtc does for VP9 without picture IDs) and a burst can be renumbered per viewer.
- AV1 (the AOM's RTP payload format): every OBU but temporal delimiters, tile lists and padding, its size
  field dropped, each behind its length in packets it fills and continues across (aggregation header Z, Y,
  W=0, N on a keyframe's first packet); the sequence header before every keyframe that lacks one.
- Opus (RFC 7587): one Opus packet per RTP packet, 48 kHz timestamps.

Timestamps come from the frames' presentation times (milliseconds) on the codec's clock, from a random
origin per stream. A stream whose pictures are reordered (B-frames: a presentation time that goes back)
cannot be packetized for WebRTC, whose receivers decode in arrival order and present by timestamp:
`Reordered` says so and names the cause.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence

from castmesh.media.codecs import CodecError, VideoConfig, VideoSample, nal_units

MAX_PAYLOAD = 1200  # bytes of RTP payload: with the RTP, SRTP, UDP and IP headers, within a 1280-byte path
VIDEO_CLOCK = 90_000  # every video payload format's RTP clock
OPUS_CLOCK = 48_000
_STAP_A, _FU_A = 24, 28
_SPS, _PPS, _AUD, _FILLER, _IDR = 7, 8, 9, 12, 5
_KEPT = frozenset(range(1, 24)) - {_AUD, _FILLER}  # 0 and 24-31 are not NAL unit types a picture carries


class Reordered(CodecError):
    """A video frame presented before one sent earlier: B-frames, which WebRTC cannot carry."""


def h264_payloads(sample: VideoSample, config: VideoConfig, max_payload: int = MAX_PAYLOAD) -> list[bytes]:
    """One H.264 access unit (length-prefixed NAL units, as FLV carries them) as RTP payloads."""
    units = [u for u in nal_units(sample.data, config.nal_length_size) if len(u) and u[0] & 0x1F in _KEPT]
    payloads: list[bytes] = []
    if any(u[0] & 0x1F == _IDR for u in units) and not any(u[0] & 0x1F == _SPS for u in units):
        payloads += _stap_a(config.parameter_sets, max_payload)
    for unit in units:
        if len(unit) <= max_payload:
            payloads.append(bytes(unit))
        else:
            payloads += _fu_a(unit, max_payload)
    return payloads


_H265_AP, _H265_FU = 48, 49
_H265_VPS, _H265_PPS, _H265_IRAP = 32, 34, range(16, 22)  # IRAP: BLA, IDR, CRA pictures


def h265_payloads(sample: VideoSample, config: VideoConfig, max_payload: int = MAX_PAYLOAD) -> list[bytes]:
    """One HEVC access unit as RTP payloads (RFC 7798, no DONL): a NAL unit that fits is a packet of its
    own, a larger one is cut into FUs; VPS, SPS and PPS go before every IRAP picture in one AP."""
    units = [u for u in nal_units(sample.data, config.nal_length_size)
             if len(u) >= 2 and (u[0] >> 1) & 0x3F < _H265_AP and (u[0] >> 1) & 0x3F != 35]  # not AUD
    kinds = {(u[0] >> 1) & 0x3F for u in units}
    payloads: list[bytes] = []
    if kinds & set(_H265_IRAP) and not kinds & {_H265_VPS, _H265_VPS + 1, _H265_PPS}:
        sets = [ps for ps in config.parameter_sets if _H265_VPS <= (ps[0] >> 1) & 0x3F <= _H265_PPS]
        aggregated = b"".join(len(ps).to_bytes(2, "big") + ps for ps in sets)
        if sets and 2 + len(aggregated) <= max_payload:  # the AP's header: the lowest layer and temporal id
            layer = min((ps[0] & 0x01) << 5 | ps[1] >> 3 for ps in sets)
            temporal = min(ps[1] & 0x07 for ps in sets)
            payloads.append(bytes((_H265_AP << 1 | layer >> 5, (layer & 0x1F) << 3 | temporal)) + aggregated)
        else:
            payloads += [bytes(ps) for ps in sets]
    for unit in units:
        if len(unit) <= max_payload:
            payloads.append(bytes(unit))
            continue
        kind, room = (unit[0] >> 1) & 0x3F, max_payload - 3
        header = bytes((unit[0] & 0x81 | _H265_FU << 1, unit[1]))
        body = unit[2:]
        for start in range(0, len(body), room):
            flags = (0x80 if start == 0 else 0) | (0x40 if start + room >= len(body) else 0)
            payloads.append(header + bytes((flags | kind,)) + body[start:start + room])
    return payloads


def vp9_payloads(sample: VideoSample, max_payload: int = MAX_PAYLOAD) -> list[bytes]:
    """One VP9 frame as RTP payloads (RFC 9628 4.2, non-flexible mode with I=0, L=0)."""
    data, room = memoryview(sample.data), max_payload - 1
    if not data:
        raise CodecError("empty VP9 frame")
    count = -(-len(data) // room)
    predicted = 0 if sample.keyframe else 0x40
    return [bytes((predicted | (0x08 if i == 0 else 0) | (0x04 if i == count - 1 else 0),))
            + data[i * room:(i + 1) * room] for i in range(count)]


_OBU_SEQUENCE_HEADER, _OBU_TEMPORAL_DELIMITER, _OBU_TILE_LIST, _OBU_PADDING = 1, 2, 8, 15
_OBU_LEFT_OUT = frozenset((_OBU_TEMPORAL_DELIMITER, _OBU_TILE_LIST, _OBU_PADDING))


def av1_obus(data: bytes | memoryview) -> list[bytes]:
    """The OBUs of a temporal unit (AV1's low-overhead format, as MP4 and FLV carry it) as RTP's OBU
    elements: header (and extension) with obu_has_size_field cleared, then the payload."""
    view, pos, out = memoryview(data), 0, []
    while pos < len(view):
        header = view[pos]
        if header & 0x80:
            raise CodecError("AV1 OBU with its forbidden bit set")
        head = 2 if header & 0x04 else 1
        if pos + head > len(view):
            raise CodecError("AV1 OBU header past the end of the frame")
        start = pos + head
        if header & 0x02:
            size, shift = 0, 0
            while True:
                if start >= len(view) or shift > 49:
                    raise CodecError("AV1 OBU size past the end of the frame")
                byte = view[start]
                size |= (byte & 0x7F) << shift
                start, shift = start + 1, shift + 7
                if not byte & 0x80:
                    break
        else:
            size = len(view) - start
        end = start + size
        if end > len(view):
            raise CodecError("AV1 OBU past the end of the frame")
        if (header >> 3) & 0x0F not in _OBU_LEFT_OUT:
            out.append(bytes((header & ~0x02,)) + bytes(view[pos + 1:pos + head]) + bytes(view[start:end]))
        pos = end
    return out


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def av1_payloads(sample: VideoSample, config: VideoConfig, max_payload: int = MAX_PAYLOAD) -> list[bytes]:
    """One AV1 temporal unit as RTP payloads: its OBU elements, each behind its length (W=0), filling
    packets and continuing across them (Z, Y). A packet never ends where an OBU does unless the temporal
    unit ends there: libwebrtc takes a packet that ends an OBU (Y=0) as the end of a frame."""
    elements = av1_obus(sample.data)
    sequence_header = any((e[0] >> 3) & 0x0F == _OBU_SEQUENCE_HEADER for e in elements)
    if sample.keyframe and not sequence_header:  # av1C's configOBUs carry it
        config_obus = [e for e in av1_obus(config.record[4:]) if (e[0] >> 3) & 0x0F == _OBU_SEQUENCE_HEADER]
        elements = config_obus + elements
        sequence_header = bool(config_obus)
    if not elements:
        raise CodecError("AV1 temporal unit with no OBU to send")
    room, out = max_payload - 1, []
    body, continued = bytearray(), False  # the packet being filled; whether it starts inside an OBU
    for index, element in enumerate(elements):
        more, pos = index < len(elements) - 1, 0
        while pos < len(element):
            space, left = room - len(body), len(element) - pos
            prefix = len(_leb128(min(left, space)))
            take = min(left, space - prefix)
            if take == left and more and left > 1 and space - prefix - take < 3:
                take = left - 1  # ending here would end the packet on an OBU boundary: continue it
            body += _leb128(take) + element[pos:pos + take]
            pos += take
            if pos < len(element):  # the packet is full and this OBU goes on in the next
                out.append(bytes(((0x80 if continued else 0) | 0x40,)) + bytes(body))
                body, continued = bytearray(), True
    out.append(bytes((0x80 if continued else 0,)) + bytes(body))
    if sample.keyframe and sequence_header:
        out[0] = bytes((out[0][0] | 0x08,)) + out[0][1:]  # N: a new coded video sequence starts here
    return out


def _stap_a(units: Sequence[bytes], max_payload: int) -> list[bytes]:
    """Parameter sets aggregated in one packet (or one packet each, if together they do not fit)."""
    if not units:
        return []
    size = 1 + sum(2 + len(u) for u in units)
    if size > max_payload:
        return [p for u in units for p in ([u] if len(u) <= max_payload else _fu_a(memoryview(u), max_payload))]
    nri = max(u[0] & 0x60 for u in units)
    return [bytes((nri | _STAP_A,)) + b"".join(len(u).to_bytes(2, "big") + u for u in units)]


def _fu_a(unit: memoryview | bytes, max_payload: int) -> list[bytes]:
    indicator = bytes((unit[0] & 0xE0 | _FU_A,))
    kind = unit[0] & 0x1F
    step = max_payload - 2
    body = memoryview(unit)[1:]
    count = (len(body) + step - 1) // step
    out = []
    for i in range(count):
        header = kind | (0x80 if i == 0 else 0) | (0x40 if i == count - 1 else 0)
        out.append(indicator + bytes((header,)) + body[i * step:(i + 1) * step])
    return out


class Packetizer:
    """One RTP stream (one SSRC): payloads in, whole packets out, numbered and stamped."""

    __slots__ = ("clock_ms", "last_presented", "origin", "payload_type", "sequence", "ssrc")

    def __init__(self, payload_type: int, clock_rate: int, ssrc: int | None = None) -> None:
        self.payload_type = payload_type
        self.clock_ms = clock_rate // 1000
        self.ssrc = (ssrc if ssrc is not None else secrets.randbits(32)).to_bytes(4, "big")
        self.sequence = secrets.randbits(16)
        self.origin = secrets.randbits(32)
        self.last_presented: int | None = None

    def timestamp(self, presented_ms: int) -> int:
        return (self.origin + presented_ms * self.clock_ms) & 0xFFFFFFFF

    def packets(self, payloads: list[bytes], presented_ms: int, marker: bool = True) -> list[bytes]:
        """The payloads of one frame presented at `presented_ms`; the marker on the last if `marker`."""
        if self.last_presented is not None and presented_ms < self.last_presented:
            raise Reordered(f"a frame presented at {presented_ms} ms follows one at {self.last_presented} ms "
                            "(B-frames; publish without them for WebRTC, e.g. x264's bframes=0)")
        self.last_presented = presented_ms
        stamp = self.timestamp(presented_ms).to_bytes(4, "big") + self.ssrc
        out = []
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            second = self.payload_type | (0x80 if marker and i == last else 0)
            out.append(bytes((0x80, second)) + (self.sequence & 0xFFFF).to_bytes(2, "big") + stamp + payload)
            self.sequence += 1
        return out


def with_payload_type(packet: bytes, payload_type: int) -> bytes:
    """The same packet for a viewer that negotiated another payload type number."""
    return packet[:1] + bytes((packet[1] & 0x80 | payload_type,)) + packet[2:]


def parse_header(packet: bytes) -> tuple[bool, int, int, int, int]:
    """(marker, payload type, sequence, timestamp, ssrc) of a packet (for tests and for RTCP)."""
    if len(packet) < 12 or packet[0] >> 6 != 2:
        raise CodecError("not an RTP version 2 packet")
    return (bool(packet[1] & 0x80), packet[1] & 0x7F, int.from_bytes(packet[2:4], "big"),
            int.from_bytes(packet[4:8], "big"), int.from_bytes(packet[8:12], "big"))


def burst(packets: list[bytes], end: int | None = None) -> list[bytes]:
    """Packets sent at once (the GOP a viewer starts with, or is sent again after it lost the picture)
    restamped one clock tick apart, ending at `end` (default: the last one's own time): a receiver decodes
    them at once and shows the last, instead of playing them out at their old pace and staying that far
    behind for good. Sequence numbers are kept."""
    if not packets:
        return []
    stamps = [int.from_bytes(p[4:8], "big") for p in packets]
    frames = 1 + sum(1 for a, b in itertools.pairwise(stamps) if a != b)
    stamp = ((stamps[-1] if end is None else end) - frames + 1) & 0xFFFFFFFF
    out = []
    for i, packet in enumerate(packets):
        if i and stamps[i] != stamps[i - 1]:
            stamp = (stamp + 1) & 0xFFFFFFFF
        out.append(packet[:4] + stamp.to_bytes(4, "big") + packet[8:])
    return out


def renumber(packets: list[bytes], offset: int) -> list[bytes]:
    """The packets with their sequence numbers moved on by `offset` (for one viewer that was sent packets
    the others were not)."""
    if not offset:
        return packets
    return [p[:2] + ((int.from_bytes(p[2:4], "big") + offset) & 0xFFFF).to_bytes(2, "big") + p[4:] for p in packets]


MAX_ACCESS_UNIT = 4 << 20  # bytes of one picture a depacketizer gathers before it gives up on it
MAX_FRAGMENTS = 4096  # NAL units in one picture


class H264Depacketizer:
    """RTP packets of one H.264 stream (RFC 6184 modes 0 and 1) back into access units: NAL units gathered
    per RTP timestamp, given out when the marker bit or a new timestamp ends a picture. A picture with a
    gap in its sequence numbers, or over the limits, is dropped, and `waiting_keyframe` says so until the
    next IDR (its owner may ask the sender for one)."""

    def __init__(self) -> None:
        self.units: list[bytes] = []
        self.size = 0
        self.timestamp: int | None = None
        self.fragment: bytearray | None = None
        self.next_sequence: int | None = None
        self.broken = False
        self.waiting_keyframe = True
        self.dropped = 0

    def push(self, payload: bytes, sequence: int, timestamp: int, marker: bool) -> tuple[int, list[bytes]] | None:
        """One packet; a whole picture (its timestamp and NAL units) when this packet completes one."""
        done = None
        if self.timestamp is not None and timestamp != self.timestamp:
            done = self._finish()
        if self.next_sequence is not None and sequence != self.next_sequence:
            self.broken = True  # lost (or reordered) packets: this picture cannot be whole
        self.next_sequence = (sequence + 1) & 0xFFFF
        self.timestamp = timestamp
        try:
            self._take(payload)
        except CodecError:
            self.broken = True
        if marker:
            done = self._finish() or done
        return done

    def _take(self, payload: bytes) -> None:
        if not payload:
            raise CodecError("empty RTP payload")
        kind = payload[0] & 0x1F
        if kind == _STAP_A:
            pos = 1
            while pos + 2 <= len(payload):
                size = int.from_bytes(payload[pos:pos + 2], "big")
                if size == 0 or pos + 2 + size > len(payload):
                    raise CodecError("STAP-A unit past the packet's end")
                self._unit(payload[pos + 2:pos + 2 + size])
                pos += 2 + size
        elif kind == _FU_A:
            if len(payload) < 3:
                raise CodecError("FU-A shorter than its headers")
            start, end = payload[1] & 0x80, payload[1] & 0x40
            if start:
                self.fragment = bytearray(((payload[0] & 0xE0) | (payload[1] & 0x1F),))
            elif self.fragment is None:
                raise CodecError("FU-A fragment without its start")
            self.fragment += payload[2:]
            if len(self.fragment) > MAX_ACCESS_UNIT:
                raise CodecError("FU-A unit over the size limit")
            if end:
                unit, self.fragment = bytes(self.fragment), None
                self._unit(unit)
        elif 1 <= kind <= 23:
            self._unit(payload)
        else:
            raise CodecError(f"RTP H.264 payload type {kind} is not supported (STAP-B, MTAP, FU-B)")

    def _unit(self, unit: bytes) -> None:
        if not unit or not 1 <= unit[0] & 0x1F <= 23:
            raise CodecError("a NAL unit type no picture carries")
        self.size += len(unit)
        if self.size > MAX_ACCESS_UNIT or len(self.units) >= MAX_FRAGMENTS:
            raise CodecError("access unit over the limits")
        self.units.append(unit)

    def _finish(self) -> tuple[int, list[bytes]] | None:
        units, timestamp, broken = self.units, self.timestamp, self.broken or self.fragment is not None
        self.units, self.size, self.fragment, self.broken, self.timestamp = [], 0, None, False, None
        if not units or timestamp is None:
            return None
        if broken:
            self.dropped += 1
            self.waiting_keyframe = True
            return None
        if self.waiting_keyframe:
            if not any(u[0] & 0x1F == _IDR for u in units):
                self.dropped += 1
                return None
            self.waiting_keyframe = False
        return timestamp, units
