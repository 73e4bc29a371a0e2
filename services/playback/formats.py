"""What each kind of viewer is sent, made from a stream's frames once per flush and shared by every viewer
of that kind (the serialize-once path). A format's key says which viewers can share its bytes.

A socket's formats make bytes; an in-memory viewer's (an HLS muxer, which cuts its own segments) passes
the frames on as they are and counts no bytes: HLS bytes are counted as its segments are served."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

from castmesh.media import flv
from castmesh.media.gop import GopCache, header_frames
from castmesh.media.mpegts import lead_into
from castmesh.media.tsmux import TsMuxer
from castmesh.proto.v1.media_pb2 import Frame
from castmesh.rtmp.play import play_messages


class OutputFormat(Protocol):
    protocol: str  # for metrics: http-flv, ws-flv, rtmp, hls, webrtc, srt

    @property
    def key(self) -> Hashable:
        """Viewers whose formats have equal keys are sent the same bytes."""

    def head(self, cache: GopCache) -> Any:
        """What a viewer joining now gets first: what a decoder needs, then the GOP cache."""

    def body(self, frames: list[Frame], start: int = 0) -> Any:
        """frames[start:] as its viewers' sinks take them (bytes, for a socket). The feed asks once per
        flush for all the frames and once per point where skipping viewers resume."""

    def size(self, body: Any) -> int:
        """The bytes a body puts on the wire (for the bytes-out counter)."""


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def websocket_message(data: bytes) -> bytes:
    """One unmasked binary WebSocket frame (RFC 6455 5.2), as a server sends it."""
    size = len(data)
    if size < 126:
        head = bytes((0x82, size))
    elif size < 1 << 16:
        head = b"\x82\x7e" + size.to_bytes(2, "big")
    else:
        head = b"\x82\x7f" + size.to_bytes(8, "big")
    return head + data


def flv_start(cache: GopCache) -> bytes:
    """The FLV file header and the tags a joining viewer starts with."""
    has_audio, has_video = cache.has_audio, cache.has_video
    if not has_audio and not has_video:
        has_audio = has_video = True  # nothing known yet: announce both, as SRS does
    return flv.file_header(has_audio, has_video) + flv.tags(start_frames(cache))


def start_frames(cache: GopCache) -> list[Frame]:
    """Metadata and sequence headers stamped with the GOP's first timestamp, then the GOP: players take
    the first timestamp they see as the start, so nothing may come before it."""
    start_ts = cache.frames[0].timestamp if cache.frames else cache.last_timestamp
    heads = [Frame(kind=f.kind, timestamp=start_ts, payload=f.payload) for f in header_frames(cache.header())]
    return heads + cache.frames


class Bytes:
    """A format whose bodies are bytes for a socket."""

    size = staticmethod(len)


class HttpFlv(Bytes):
    """An FLV file as an HTTP/1.1 chunked body."""

    key = protocol = "http-flv"

    def head(self, cache: GopCache) -> bytes:
        return http_chunk(flv_start(cache))

    def body(self, frames: list[Frame], start: int = 0) -> bytes:
        return http_chunk(flv.tags(frames[start:]))


class RawFlv(Bytes):
    """An FLV file as the DATA frames of an HTTP/2 stream (HTTP/2 has no chunked encoding)."""

    key = "h2-flv"
    protocol = "http-flv"

    def head(self, cache: GopCache) -> bytes:
        return flv_start(cache)

    def body(self, frames: list[Frame], start: int = 0) -> bytes:
        return flv.tags(frames[start:])


class WebSocketFlv(Bytes):
    """An FLV stream in binary WebSocket messages, one per flush (mpegts.js and flv.js reassemble it)."""

    key = protocol = "ws-flv"

    def head(self, cache: GopCache) -> bytes:
        return websocket_message(flv_start(cache))

    def body(self, frames: list[Frame], start: int = 0) -> bytes:
        return websocket_message(flv.tags(frames[start:]))


class RtmpPlay(Bytes):
    """RTMP messages on the message stream the viewer plays."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.key = ("rtmp", stream_id)
        self.protocol = "rtmp"

    def head(self, cache: GopCache) -> bytes:
        return play_messages(start_frames(cache), self.stream_id)

    def body(self, frames: list[Frame], start: int = 0) -> bytes:
        return play_messages(frames[start:], self.stream_id)


class Frames:
    """What an in-memory viewer takes (an HLS muxer, a stream's WebRTC packetizer): the stream's cache when
    it starts, then the frames as they come."""

    key = "frames"

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol

    def head(self, cache: GopCache) -> GopCache:
        return cache

    def body(self, frames: list[Frame], start: int = 0) -> list[Frame]:
        return frames[start:] if start else frames

    def size(self, body: list[Frame]) -> int:
        return 0


class MpegTs(Bytes):
    """A stream's MPEG-TS, for its SRT viewers: one per stream (its tables and continuity counters are the
    stream's), so its key is itself. All the frames of a flush are made TS once; a viewer resuming part way
    through gets the rest of those bytes (castmesh.media.tsmux), and a joining viewer's start is renumbered
    to lead into them (castmesh.media.mpegts.lead_into)."""

    protocol = "srt"

    def __init__(self) -> None:
        self.muxer = TsMuxer()
        self.made_for: list[Frame] | None = None  # the flush's frames (kept: identity is the test)
        self.made = b""
        self.offsets: list[int] = []

    @property
    def key(self) -> Hashable:
        return self

    def head(self, cache: GopCache) -> bytes:
        frames = start_frames(cache)
        self.muxer.configure(frames[:len(frames) - len(cache.frames)])  # the sequence headers, if it lacks them
        start, _ = TsMuxer().push(frames)
        return lead_into(start, self.muxer.counters)

    def body(self, frames: list[Frame], start: int = 0) -> bytes:
        if frames is not self.made_for:
            self.made, self.offsets = self.muxer.push(frames)
            self.made_for = frames
        return self.made[self.offsets[start]:] if start else self.made


HTTP_FLV = HttpFlv()
H2_FLV = RawFlv()
WEBSOCKET_FLV = WebSocketFlv()
HLS_FRAMES = Frames("hls")
WEBRTC_FRAMES = Frames("webrtc")
