"""FLV: the file header, tag writing, and a bounded incremental tag reader.

Writing is the hot path of HTTP-FLV: a batch of frames becomes tag bytes once per stream and the same
bytes go to every viewer. A tag is an 11-byte header, the body, and the 4-byte size of the previous tag.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from castmesh.proto.v1.media_pb2 import Frame

FLV_AUDIO_FLAG, FLV_VIDEO_FLAG = 0x04, 0x01
_TAG_HEADER = struct.Struct(">BBHBHBBH")  # type, size(3 as 1+2), ts low 24 (1+2), ts ext, stream id (1+2)
_U32 = struct.Struct(">I")


class FlvError(ValueError):
    """Malformed FLV, or a tag over the reader's limit."""


def file_header(has_audio: bool, has_video: bool) -> bytes:
    flags = (FLV_AUDIO_FLAG if has_audio else 0) | (FLV_VIDEO_FLAG if has_video else 0)
    return b"FLV\x01" + bytes([flags]) + b"\x00\x00\x00\x09" + b"\x00\x00\x00\x00"


def tag(kind: int, timestamp: int, payload: bytes) -> bytes:
    size = len(payload)
    header = _TAG_HEADER.pack(
        kind, size >> 16, size & 0xFFFF, (timestamp >> 16) & 0xFF, timestamp & 0xFFFF, (timestamp >> 24) & 0xFF, 0, 0
    )
    return header + payload + _U32.pack(size + 11)


def tags(frames: Iterable[Frame]) -> bytes:
    return b"".join([tag(f.kind, f.timestamp, f.payload) for f in frames])


@dataclass(slots=True)
class Tag:
    kind: int
    timestamp: int
    payload: bytes


class FlvReader:
    """Incremental FLV parser for clients (tests, benchmarks): feed bytes, get whole tags back."""

    def __init__(self, max_tag_size: int = 16 << 20) -> None:
        self.max_tag_size = max_tag_size
        self.buffer = bytearray()
        self.header: bytes | None = None

    def feed(self, data: bytes) -> list[Tag]:
        self.buffer += data
        out: list[Tag] = []
        buf = self.buffer
        pos = 0
        if self.header is None:
            if len(buf) < 13:
                return out
            if buf[:3] != b"FLV":
                raise FlvError("stream does not start with an FLV signature")
            offset = _U32.unpack_from(buf, 5)[0]
            if offset < 9 or offset > 1024:
                raise FlvError(f"FLV header size {offset} is not plausible")
            if len(buf) < offset + 4:
                return out
            self.header = bytes(buf[:offset])
            pos = offset + 4
        while len(buf) - pos >= 11:
            kind = buf[pos] & 0x1F
            size = (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]
            if size > self.max_tag_size:
                raise FlvError(f"FLV tag of {size} bytes is over the limit of {self.max_tag_size}")
            end = pos + 11 + size + 4
            if end > len(buf):
                break
            ts = (buf[pos + 4] << 16) | (buf[pos + 5] << 8) | buf[pos + 6] | (buf[pos + 7] << 24)
            out.append(Tag(kind, ts, bytes(buf[pos + 11 : pos + 11 + size])))
            pos = end
        del buf[:pos]
        return out
