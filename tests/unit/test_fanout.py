import asyncio

import pytest

from castmesh.media.frames import AUDIO, VIDEO, make_frame, stream_key
from castmesh.proto.v1.media_pb2 import FrameBatch
from castmesh.proto.v1.relay_pb2 import StreamEnd
from services.relay import fanout
from services.relay.fanout import StreamTable, Subscriber


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(fanout.time, "monotonic", fake.monotonic)
    return fake


def batch(*frames: tuple[int, int, bytes]) -> FrameBatch:
    return FrameBatch(frames=[make_frame(kind, ts, payload) for kind, ts, payload in frames])


def test_a_lagging_subscriber_skips_to_the_next_keyframe_then_is_dropped(clock: Clock) -> None:
    sub = Subscriber("s", max_lag=3.0)
    sub.offer(batch((VIDEO, 0, b"\x17\x01k")), has_video=True)
    clock.now += 1
    sub.offer(batch((VIDEO, 40, b"\x27\x01p")), has_video=True)
    clock.now += 3  # the oldest queued batch is now 4 s old
    sub.offer(batch((VIDEO, 80, b"\x27\x01p"), (AUDIO, 90, b"\xaf\x01a"), (VIDEO, 120, b"\x17\x01k"),
                    (AUDIO, 130, b"\xaf\x01b")), has_video=True)
    assert sub.skips == 1
    # the queue was emptied and resumes at the keyframe inside the batch
    (only,) = sub.queue
    assert [f.timestamp for f in only[1].frames] == [120, 130]
    # It never takes anything: the next time the bound is hit, it is ended, not skipped again.
    clock.now += 4
    sub.offer(batch((VIDEO, 160, b"\x27\x01p")), has_video=True)
    assert sub.end is not None and sub.end.reason == StreamEnd.REASON_TOO_SLOW
    assert sub.skips == 1


def test_a_subscriber_that_keeps_reading_gets_merged_batches_in_order(clock: Clock) -> None:
    async def scenario() -> list[int]:
        sub = Subscriber("s", max_lag=3.0)
        for ts in (0, 40, 80):
            sub.offer(batch((VIDEO, ts, b"\x17\x01k" if ts == 0 else b"\x27\x01p")), has_video=True)
        got = await sub.next()
        assert isinstance(got, FrameBatch)
        sub.finish(StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED))
        end = await sub.next()
        assert isinstance(end, StreamEnd)
        return [f.timestamp for f in got.frames]

    assert asyncio.run(scenario()) == [0, 40, 80]


def test_one_publisher_per_stream_and_late_subscribers_start_from_the_gop(clock: Clock) -> None:
    table = StreamTable()
    key = stream_key("live", "x")
    stream = table.claim(key, "a")
    assert stream is not None and table.claim(key, "b") is None
    stream.publish(batch((VIDEO, 0, b"\x17\x00cfg"), (VIDEO, 0, b"\x17\x01k"), (VIDEO, 40, b"\x27\x01p")))
    sub = stream.subscribe("late", 3.0, from_gop=True)
    assert [f.timestamp for f in sub.queue[0][1].frames] == [0, 40]
    table.release(stream, StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED))
    assert sub.end is not None and table.claim(key, "c") is not None
