import pytest

from castmesh.media.frames import AUDIO, VIDEO, make_frame, stream_key
from castmesh.proto.v1.media_pb2 import FrameBatch, StreamHeader
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


def offer(sub: Subscriber, b: FrameBatch) -> None:
    sub.offer(b, has_video=True, size=b.ByteSize())


def test_a_lagging_subscriber_skips_to_the_next_keyframe_then_is_dropped(clock: Clock) -> None:
    sub = Subscriber("s", max_lag=3.0)
    offer(sub, batch((VIDEO, 0, b"\x17\x01k")))
    clock.now += 1
    offer(sub, batch((VIDEO, 40, b"\x27\x01p")))
    clock.now += 3  # the oldest queued batch is now 4 s old
    offer(sub, batch((VIDEO, 80, b"\x27\x01p"), (AUDIO, 90, b"\xaf\x01a"), (VIDEO, 120, b"\x17\x01k"),
                    (AUDIO, 130, b"\xaf\x01b")))
    assert sub.skips == 1
    # the queue was emptied and resumes at the keyframe inside the batch
    (only,) = sub.queue
    assert [f.timestamp for f in only[1].frames] == [120, 130]
    # It never takes anything: the next time the bound is hit, it is ended, not skipped again.
    clock.now += 4
    offer(sub, batch((VIDEO, 160, b"\x27\x01p")))
    assert sub.end is not None and sub.end.reason == StreamEnd.REASON_TOO_SLOW
    assert sub.skips == 1


def test_a_subscriber_hands_over_what_is_queued_in_order_then_its_end(clock: Clock) -> None:
    told: list[Subscriber] = []
    sub = Subscriber("s", max_lag=3.0, on_ready=told.append)
    for ts in (0, 40, 80):
        offer(sub, batch((VIDEO, ts, b"\x17\x01k" if ts == 0 else b"\x27\x01p")))
    assert told == [sub] * 3
    items, size, end = sub.take(budget=1 << 20)
    assert [f.timestamp for b in items for f in b.frames] == [0, 40, 80] and end is None
    assert size == sum(b.ByteSize() for b in items)
    sub.finish(StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED))
    items, _, end = sub.take(budget=1 << 20)
    assert items == [] and end is not None and end.reason == StreamEnd.REASON_UNPUBLISHED


def test_take_stops_at_the_budget_and_keeps_the_end_until_the_queue_is_drained(clock: Clock) -> None:
    sub = Subscriber("s", max_lag=3.0)
    for ts in range(0, 400, 40):
        offer(sub, batch((VIDEO, ts, b"\x17\x01" + bytes(1000))))
    sub.finish(StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED))
    first, size, end = sub.take(budget=2500)
    assert len(first) == 3 and size >= 2500 and end is None
    rest, _, end = sub.take(budget=1 << 20)
    assert len(rest) == 7 and end is not None


def test_one_publisher_per_stream_and_late_subscribers_start_from_the_gop(clock: Clock) -> None:
    table = StreamTable()
    key = stream_key("live", "x")
    stream = table.claim(key, "a")
    assert stream is not None and table.claim(key, "b") is None
    stream.publish(batch((VIDEO, 0, b"\x17\x00cfg"), (VIDEO, 0, b"\x17\x01k"), (VIDEO, 40, b"\x27\x01p")))
    sub = Subscriber("late", 3.0)
    stream.subscribe(sub, from_gop=True)
    header, gop = (item for _, item, _ in sub.queue)
    assert isinstance(header, StreamHeader) and header.session_id == "a"
    assert header.video_config.payload == b"\x17\x00cfg"
    assert isinstance(gop, FrameBatch) and [f.timestamp for f in gop.frames] == [0, 40]
    table.release(stream, StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED))
    assert sub.end is not None and table.claim(key, "c") is not None
