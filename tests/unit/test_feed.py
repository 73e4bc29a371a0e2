"""A playback feed whose publisher has only just connected: viewers wait until the stream says what it
carries, so the FLV header names the right tracks."""

import asyncio

from castmesh.media import amf0
from castmesh.media.frames import AUDIO, DATA, make_frame, stream_key
from castmesh.mesh.link import RelayLinks
from castmesh.proto.v1.media_pb2 import StreamHeader, StreamKey
from services.playback.feed import StreamFeed
from services.playback.formats import HTTP_FLV
from services.playback.viewer import Viewer


class Transport:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0


class Sink:
    format = HTTP_FLV

    def __init__(self) -> None:
        self.transport = Transport()
        self.viewer: Viewer | None = None
        self.head = b""

    def start(self, head: bytes) -> bool:
        self.head = head
        return True

    def refuse(self, status: int, reason: str) -> None: ...
    def finish(self, reason: str) -> None: ...


def test_viewers_wait_for_the_first_media_when_the_header_is_empty() -> None:
    async def scenario() -> bytes:
        async def nowhere(key: StreamKey, avoid: set[str]) -> str | None:
            await asyncio.Event().wait()
            return None

        feed = StreamFeed(nowhere, RelayLinks(), stream_key("live", "a"), merge_ms=0, max_lag=3, on_closed=print)
        sink = Sink()
        feed.add(Viewer("v1", "flv", "127.0.0.1:1", sink, {"app": "live", "stream": "a"}, max_lag=3))
        feed._on_header(StreamHeader(session_id="s"), new_timeline=True)  # the publisher sent nothing yet
        assert sink.head == b"" and not feed.live
        meta = amf0.encode("onMetaData", {"audiocodecid": 10.0, "audiosamplerate": 44100.0})
        feed._on_frames([make_frame(DATA, 0, meta), make_frame(AUDIO, 0, b"\xaf\x00\x12\x10"),
                         make_frame(AUDIO, 23, b"\xaf\x01sound")])
        feed.task.cancel()
        return sink.head[sink.head.index(b"FLV"):]

    head = asyncio.run(scenario())
    assert head[4] == 0x04  # audio only, as onMetaData says
    assert head.count(b"sound") == 1  # the first frames come once, from the cache
