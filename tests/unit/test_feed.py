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
    def discontinuity(self) -> None: ...

    def watching(self) -> int:
        return 1


def unlinked_feed() -> StreamFeed:
    """A feed of live/a whose upstream is never found: the test hands it headers and frames itself."""
    async def nowhere(key: StreamKey, avoid: set[str]) -> str | None:
        await asyncio.Event().wait()
        return None

    return StreamFeed(nowhere, RelayLinks(), stream_key("live", "a"), merge_ms=0, max_lag=3, on_closed=print)


def test_viewers_wait_for_the_first_media_when_the_header_is_empty() -> None:
    async def scenario() -> bytes:
        feed = unlinked_feed()
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


def test_an_hls_muxer_is_one_viewer_of_the_feed_standing_for_its_clients() -> None:
    """The muxer takes the frames the FLV viewer is sent, a new publish session reaches it as a
    discontinuity, it never lags, its frames add nothing to bytes-out, and leaving makes the feed linger."""
    from prometheus_client import REGISTRY

    from services.playback.hls import HlsMuxer
    from tests.unit.test_hls_muxing import config_frames, stream

    def bytes_out() -> float:
        return REGISTRY.get_sample_value("castmesh_playback_bytes_out_total") or 0.0

    async def scenario() -> None:
        feed = unlinked_feed()
        sink = Sink()
        feed.add(Viewer("v1", "http-flv", "127.0.0.1:1", sink, {"app": "live", "stream": "a"}, max_lag=3))
        stopped: list[HlsMuxer] = []
        muxer = HlsMuxer("live/a", "ts", 1000, 6, 30, on_stop=stopped.append)
        hls = Viewer("n.hls-1", "hls", "", muxer, {"app": "live", "stream": "a"}, max_lag=3)
        hls.feed = feed
        feed.add(hls)
        feed._on_header(StreamHeader(session_id="s1"), new_timeline=True)
        feed._on_frames(config_frames())  # live from here: both viewers start
        before = bytes_out()
        feed._on_frames(stream(3.0))
        assert hls in feed.viewers and len(muxer.segmenter.listed()) == 2  # two complete 1 s segments
        assert bytes_out() - before == len(sink.transport.data)  # the FLV viewer's bytes only
        assert hls.behind(0.0) == 0.0
        for port in range(3):
            muxer.playlist("p/", f"10.0.0.1:{port}", lambda status, body, reason: None, wait=False)
        assert muxer.watching() == 3

        feed._on_header(StreamHeader(session_id="s2"), new_timeline=True)  # a new publish session
        feed._on_frames(config_frames() + stream(2.5, start=3000))
        assert "#EXT-X-DISCONTINUITY" in muxer.segmenter.playlist("p/")

        muxer.stop("test over")
        assert stopped == [muxer]
        feed.remove(hls)
        assert hls not in feed.viewers and feed.idle_handle is None  # the FLV viewer still watches
        feed.remove(next(iter(feed.viewers)))
        assert feed.idle_handle is not None  # nobody left: the feed lingers, then closes
        feed.task.cancel()

    asyncio.run(scenario())


def test_every_waiting_viewer_is_refused_when_the_stream_is_not_found_even_those_that_leave_on_it() -> None:
    """A refused HLS muxer removes its viewer from the feed at once: the feed must still refuse every other
    viewer that waited (two muxers of one stream asked for at once, before it was published: the second
    was left waiting on a closed feed, and its clients got 504s for as long as it lived)."""
    refused: list[str] = []

    class Leaving(Sink):
        def refuse(self, status: int, reason: str) -> None:
            refused.append(f"{status} {reason}")
            assert self.viewer is not None and self.viewer.feed is not None
            self.viewer.feed.remove(self.viewer)

    async def scenario() -> None:
        feed = unlinked_feed()
        for n in range(3):
            viewer = Viewer(f"v{n}", "hls", "", Leaving(), {"app": "live", "stream": "a"}, max_lag=3)
            viewer.feed = feed
            feed.add(viewer)
        feed._finish("nobody is publishing this stream", 404)
        feed.task.cancel()

    asyncio.run(scenario())
    assert refused == ["404 nobody is publishing this stream"] * 3
