"""Windows that follow the media: a picture is written (playback) or sent (ingest) at once with the audio
that waited for it; audio alone waits at most its window; and playback gathers pictures only while its
writes keep the process busy (services.playback.feed.WriteLoad)."""

import asyncio
import time

import pytest

from castmesh.media.frames import AUDIO, VIDEO, make_frame
from castmesh.media.frames import stream_key as key_of
from castmesh.proto.v1.media_pb2 import StreamHeader
from services.ingest.forward import RelayPublish
from services.playback import feed as feed_module
from services.playback.feed import WriteLoad
from services.playback.viewer import Viewer
from tests.unit.test_feed import Sink, unlinked_feed
from tests.unit.test_ingest_limits import FixedLease

AVC_HEADER = b"\x17\x00\x00\x00\x00\x01\x64\x00\x1f\xff\xe1\x00\x04\x67\x64\x00\x1f\x01\x00\x04\x68\xee\x3c\x80"
AAC_HEADER = b"\xaf\x00\x12\x10"


def picture(ts: int, key: bool = False) -> object:
    return make_frame(VIDEO, ts, (b"\x17" if key else b"\x27") + b"\x01\x00\x00\x00" + b"P%d" % ts)


def sound(ts: int) -> object:
    return make_frame(AUDIO, ts, b"\xaf\x01" + b"A%d" % ts)


async def live_feed(merge_ms: float) -> tuple[object, Sink]:
    feed = unlinked_feed()
    feed.merge = merge_ms / 1000
    sink = Sink()
    feed.add(Viewer("v", "http-flv", "127.0.0.1:1", sink, {"app": "live", "stream": "a"}, max_lag=3))
    feed._on_header(StreamHeader(session_id="s"), new_timeline=True)
    feed._on_frames([make_frame(VIDEO, 0, AVC_HEADER), make_frame(AUDIO, 0, AAC_HEADER), picture(0, key=True)])
    await asyncio.sleep(0.01)
    assert b"P0" in sink.head + sink.transport.data
    return feed, sink


def test_a_picture_is_written_at_once_and_carries_the_audio_that_waited() -> None:
    async def scenario() -> None:
        feed, sink = await live_feed(merge_ms=200)
        feed._on_frames([sound(20)])
        await asyncio.sleep(0.02)
        assert b"A20" not in sink.transport.data  # audio waits for a picture...
        feed._on_frames([picture(33)])
        feed._on_frames([sound(40)])  # ...and what arrives in the same turn of the loop goes with it
        await asyncio.sleep(0)
        data = sink.transport.data
        assert b"A20" in data and b"P33" in data and b"A40" in data
        assert data.index(b"A20") < data.index(b"P33") < data.index(b"A40")
        feed.task.cancel()

    asyncio.run(scenario())


def test_audio_alone_waits_at_most_the_merge_window() -> None:
    async def scenario() -> None:
        feed, sink = await live_feed(merge_ms=60)
        feed._on_frames([sound(20)])
        await asyncio.sleep(0.03)
        assert b"A20" not in sink.transport.data
        await asyncio.sleep(0.1)  # past the 60 ms window: timers due before a later one fire first
        assert b"A20" in sink.transport.data
        feed.task.cancel()

    asyncio.run(scenario())


def test_write_load_widens_the_window_only_past_its_share() -> None:
    load = WriteLoad()
    assert load.window(0.05) == 0.0
    now = feed_module.time.monotonic
    load.share, load.at = 0.2, now()
    assert load.window(0.05) == 0.0
    load.share, load.at = 0.30, now()
    assert load.window(0.05) == pytest.approx(0.025, rel=0.05)
    load.share, load.at = 0.9, now()
    assert load.window(0.05) == 0.05
    load.share, load.at = 0.9, 0.0  # long ago: it has decayed away
    assert load.current() < 0.01 and load.window(0.05) == 0.0
    busy = WriteLoad()
    for n in range(150):  # five seconds of 30 writes a second, 13 ms each: 0.39 of the time
        busy.spent(0.013, n / 30 + 0.013)
    assert 0.35 < busy.share < 0.43


def test_a_busy_process_gathers_pictures_up_to_the_merge_window(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = WriteLoad()
    busy.spent = lambda start, end: None  # type: ignore[method-assign]
    busy.current = lambda: 0.9  # type: ignore[method-assign]
    monkeypatch.setattr(feed_module, "WRITES", busy)

    async def scenario() -> None:
        feed, sink = await live_feed(merge_ms=80)
        feed.last_flush = feed_module.time.monotonic()
        feed._on_frames([picture(33)])
        await asyncio.sleep(0.03)
        assert b"P33" not in sink.transport.data  # within 80 ms of the last write: gathered
        feed._on_frames([picture(66)])
        await asyncio.sleep(0.1)  # 80 ms after the last write: both pictures, in one write
        data = sink.transport.data
        assert data.rindex(b"P33") < data.rindex(b"P66")
        assert data.count(b"\r\n") - data[:data.rindex(b"P33")].count(b"\r\n") <= 2
        feed.task.cancel()

    asyncio.run(scenario())


def test_ingest_sends_a_picture_at_once_and_audio_rides_along() -> None:
    async def scenario() -> list[list[int]]:
        publish = RelayPublish(None, FixedLease("r:1"), key_of("live", "x"), "s", "", batch_ms=40,  # type: ignore[arg-type]
                               on_pause=lambda paused: None, on_lost=lambda reason: None)
        publish.push(make_frame(VIDEO, 0, AVC_HEADER))
        publish.push(sound(0))
        publish.push(sound(23))
        queued_before_picture = publish.queue.qsize()
        publish.push(picture(33, key=True))
        batches = []
        while not publish.queue.empty():
            item = publish.queue.get_nowait()
            assert item is not None
            batches.append([frame.timestamp for frame in item[0]])
        publish.push(sound(46))
        assert publish.queue.empty()
        await asyncio.sleep(0.06)  # no picture came: the audio goes alone after batch_ms
        item = publish.queue.get_nowait()
        assert item is not None and [frame.timestamp for frame in item[0]] == [46]
        assert queued_before_picture == 1  # the video header went at once
        return batches

    assert asyncio.run(scenario()) == [[0], [0, 23, 33]]


def test_write_load_counts_cpu_not_a_stalled_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write during which the process is stalled (here: it sleeps, as when another process or the
    hypervisor has the core) costs no CPU, so it must not read as load and make later pictures wait."""
    load = WriteLoad()
    monkeypatch.setattr(feed_module, "WRITES", load)

    async def scenario() -> None:
        feed, sink = await live_feed(merge_ms=50)
        write = sink.transport.write

        def stalled(data: bytes) -> None:
            time.sleep(0.02)
            write(data)

        sink.transport.write = stalled  # type: ignore[method-assign]
        for n in range(1, 16):  # 15 pictures, each write stalled 20 ms: 0.6 of the wall time
            feed._on_frames([picture(n * 33)])
            await asyncio.sleep(0.013)
        assert load.current() < 0.1, load.current()
        assert load.window(0.05) == 0.0
        feed.task.cancel()

    asyncio.run(scenario())
