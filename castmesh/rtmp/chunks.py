"""The RTMP chunk stream, sans-IO: ChunkReader turns bytes into messages, ChunkWriter messages into bytes.

Rules this file keeps (RTMP 1.0 spec section 5.3, and what ffmpeg and SRS do where the spec is vague):
- Basic header: chunk stream id in 1 byte (2..63), 2 bytes (64 + b1) or 3 bytes (64 + b1 + 256 * b2).
- Message header by fmt: 11, 7, 3 or 0 bytes. A chunk stream must start with fmt 0. In a fmt 0 header the
  message stream id is little-endian, the only little-endian field in RTMP.
- The timestamp "delta" that a fmt 3 chunk starting a new message adds is the timestamp field of the last
  fmt 0/1/2 header on that chunk stream (for fmt 0, the absolute timestamp): ffmpeg and SRS agree.
- Extended timestamp: present when the 24-bit field is 0xFFFFFF, and then also on every fmt 3 chunk of that
  chunk stream. Some encoders leave it out of fmt 3 continuation chunks, so there, as SRS does, the 4 bytes
  count as extended timestamp only if they repeat the value.
- Set Chunk Size and Abort take effect at once, in the middle of a buffer.
The reader parses a chunk only once all of it has arrived, so any split of the input gives the same
messages, and it never holds more than one chunk of unparsed input plus the partial messages, which are
bounded by the limits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from castmesh.rtmp.errors import ChunkError, LimitExceeded

SET_CHUNK_SIZE, ABORT, ACKNOWLEDGEMENT, USER_CONTROL, WINDOW_ACK_SIZE, SET_PEER_BANDWIDTH = 1, 2, 3, 4, 5, 6
AUDIO, VIDEO = 8, 9
DATA_AMF3, SHARED_OBJECT_AMF3, COMMAND_AMF3 = 15, 16, 17
DATA_AMF0, SHARED_OBJECT_AMF0, COMMAND_AMF0 = 18, 19, 20
AGGREGATE = 22

DEFAULT_CHUNK_SIZE = 128
MIN_CHUNK_SIZE = 128  # SRS rejects smaller: tiny chunks multiply the per-byte parsing cost
EXTENDED = 0xFFFFFF
_U32 = struct.Struct(">I")
_U32LE = struct.Struct("<I")


@dataclass(slots=True)
class Message:
    csid: int
    timestamp: int
    type_id: int
    stream_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    max_chunk_size: int = 65536
    max_message_length: int = 8 << 20
    max_chunk_streams: int = 64
    # The sum of all partial messages. Without it, each of many chunk streams could hold a large message.
    max_pending_bytes: int = 16 << 20


class _ChunkStream:
    __slots__ = ("delta", "ext_value", "extended", "length", "payload", "stream_id", "timestamp", "type_id")

    def __init__(self) -> None:
        self.timestamp = 0
        self.delta = 0
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.extended = False
        self.ext_value = 0
        self.payload: bytearray | None = None  # the message being assembled, None between messages


def _u24(buf: bytearray, pos: int) -> int:
    return (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]


class ChunkReader:
    def __init__(self, limits: ChunkLimits | None = None) -> None:
        self.limits = limits or ChunkLimits()
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self._streams: dict[int, _ChunkStream] = {}
        self._buffer = bytearray()
        self._pending = 0

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        pos = 0
        while True:
            used = self._read_chunk(pos, messages)
            if not used:
                break
            pos += used
        if pos:
            del self._buffer[:pos]
        return messages

    def _read_chunk(self, pos: int, out: list[Message]) -> int:
        """Parse one whole chunk at pos; return its size, or 0 when it has not all arrived yet."""
        buf = self._buffer
        avail = len(buf) - pos
        if avail < 1:
            return 0
        b0 = buf[pos]
        fmt = b0 >> 6
        csid = b0 & 0x3F
        p = pos + 1
        if csid == 0:
            if avail < 2:
                return 0
            csid = 64 + buf[pos + 1]
            p += 1
        elif csid == 1:
            if avail < 3:
                return 0
            csid = 64 + buf[pos + 1] + 256 * buf[pos + 2]
            p += 2
        cs = self._streams.get(csid)
        if cs is None:
            if fmt != 0:
                raise ChunkError(f"chunk stream {csid} starts with a fmt {fmt} chunk; it must start with fmt 0")
            if len(self._streams) >= self.limits.max_chunk_streams:
                raise LimitExceeded(f"more than {self.limits.max_chunk_streams} chunk streams in one connection")
        end = len(buf)
        header_size = (11, 7, 3, 0)[fmt]
        if p + header_size > end:
            return 0
        timestamp = delta = length = type_id = stream_id = 0
        if fmt < 3:
            ts_field = _u24(buf, p)
            if fmt < 2:
                length = _u24(buf, p + 3)
                type_id = buf[p + 6]
                if fmt == 0:
                    stream_id = _U32LE.unpack_from(buf, p + 7)[0]
            p += header_size
            extended = ts_field == EXTENDED
            if extended:
                if p + 4 > end:
                    return 0
                ts_field = _U32.unpack_from(buf, p)[0]
                p += 4
            ext_value = ts_field
            starting = True
        else:
            assert cs is not None
            extended = cs.extended
            ext_value = cs.ext_value
            starting = cs.payload is None
            if extended:
                if p + 4 > end:
                    return 0
                if starting or _U32.unpack_from(buf, p)[0] == cs.ext_value:
                    p += 4
            ts_field = 0
        if fmt == 3:
            assert cs is not None
            length, type_id, stream_id = cs.length, cs.type_id, cs.stream_id
            if starting:
                delta = cs.delta
                timestamp = (cs.timestamp + delta) & 0xFFFFFFFF
        else:
            if fmt == 0:
                timestamp = delta = ts_field
            else:
                assert cs is not None
                delta = ts_field
                timestamp = (cs.timestamp + delta) & 0xFFFFFFFF
                stream_id = cs.stream_id
                if fmt == 2:
                    length, type_id = cs.length, cs.type_id
            if length > self.limits.max_message_length:
                raise LimitExceeded(
                    f"message of {length} bytes on chunk stream {csid} is over the limit of "
                    f"{self.limits.max_message_length}"
                )
        have = 0 if starting or cs is None or cs.payload is None else len(cs.payload)
        take = min(self.chunk_size, length - have)
        if p + take > end:
            return 0
        # The whole chunk is here: commit.
        if cs is None:
            cs = self._streams[csid] = _ChunkStream()
        if starting:
            if cs.payload is not None:
                # A new header in the middle of a message: the old one is abandoned, as ffmpeg does.
                self._pending -= len(cs.payload)
            cs.payload = bytearray()
            if fmt < 3:
                cs.length, cs.type_id, cs.stream_id = length, type_id, stream_id
                cs.delta = delta
                cs.extended, cs.ext_value = extended, ext_value
            cs.timestamp = timestamp
        payload = cs.payload
        assert payload is not None
        payload += buf[p : p + take]
        self._pending += take
        if self._pending > self.limits.max_pending_bytes:
            raise LimitExceeded(f"more than {self.limits.max_pending_bytes} bytes of incomplete messages")
        if len(payload) == cs.length:
            cs.payload = None
            self._pending -= cs.length
            message = Message(csid, cs.timestamp, cs.type_id, cs.stream_id, bytes(payload))
            self._apply_control(message)
            out.append(message)
        return p + take - pos

    def _apply_control(self, message: Message) -> None:
        if message.stream_id != 0 or message.type_id not in (SET_CHUNK_SIZE, ABORT):
            return
        if len(message.payload) < 4:
            raise ChunkError(f"protocol control message type {message.type_id} shorter than 4 bytes")
        value = _U32.unpack_from(message.payload)[0]
        if message.type_id == SET_CHUNK_SIZE:
            size = value & 0x7FFFFFFF
            if value & 0x80000000 or size < MIN_CHUNK_SIZE or size > self.limits.max_chunk_size:
                raise LimitExceeded(
                    f"Set Chunk Size {value} is outside {MIN_CHUNK_SIZE}..{self.limits.max_chunk_size}"
                )
            self.chunk_size = size
        else:
            aborted = self._streams.get(value)
            if aborted is not None and aborted.payload is not None:
                self._pending -= len(aborted.payload)
                aborted.payload = None


def basic_header(fmt: int, csid: int) -> bytes:
    if 2 <= csid <= 63:
        return bytes([(fmt << 6) | csid])
    if 64 <= csid <= 319:
        return bytes([fmt << 6, csid - 64])
    if 320 <= csid <= 65599:
        rest = csid - 64
        return bytes([(fmt << 6) | 1, rest & 0xFF, rest >> 8])
    raise ValueError(f"chunk stream id {csid} out of range")


class ChunkWriter:
    """Messages to chunks. Every message starts with a fmt 0 header, which every client reads correctly."""

    def __init__(self) -> None:
        self.chunk_size = DEFAULT_CHUNK_SIZE

    def write(self, csid: int, timestamp: int, type_id: int, stream_id: int, payload: bytes) -> bytes:
        timestamp &= 0xFFFFFFFF
        extended = timestamp >= EXTENDED
        ext = _U32.pack(timestamp) if extended else b""
        length = len(payload)
        if length > 0xFFFFFF:
            raise ValueError("RTMP messages are at most 16 MiB")
        header = bytearray(basic_header(0, csid))
        header += (EXTENDED if extended else timestamp).to_bytes(3, "big")
        header += length.to_bytes(3, "big")
        header.append(type_id)
        header += _U32LE.pack(stream_id)
        header += ext
        size = self.chunk_size
        out = bytearray(header)
        out += payload[:size]
        if length > size:
            continuation = basic_header(3, csid) + ext
            for offset in range(size, length, size):
                out += continuation
                out += payload[offset : offset + size]
        return bytes(out)

    def set_chunk_size(self, size: int) -> bytes:
        """The Set Chunk Size message; chunks written after it use the new size."""
        data = self.write(2, 0, SET_CHUNK_SIZE, 0, _U32.pack(size))
        self.chunk_size = size
        return data
