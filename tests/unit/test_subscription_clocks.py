"""The clocks of UpstreamSubscription, on a fake clock and fake relays: its retry window counts from the
loss of an upstream (not from the stream's start or its last header), keeps its first deadline through a
failure during the retries, and is given back whole once frames flow again. An edge that gives up says
its upstream was lost, never that the stream was unpublished."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from castmesh.media.frames import AUDIO, make_frame, stream_key
from castmesh.mesh import subscription
from castmesh.mesh.channels import Batch, End, Header
from castmesh.mesh.retry import RecentFailures, RetryWindow
from castmesh.mesh.subscription import UpstreamSubscription
from castmesh.proto.v1.media_pb2 import Frame, FrameBatch, StreamHeader, StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd, SubscribeOpen

Event = Header | Batch | End


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeChannel:
    """A subscription on a fake relay: delivers what a link would, and is over once its end came."""

    def __init__(self, address: str, on_event: Callable[[Event], None]) -> None:
        self.address = address
        self.on_event = on_event
        self.done = asyncio.Event()
        self.lost = ""

    def close(self) -> None:
        self.done.set()

    def header(self, session: str = "s1") -> None:
        self.on_event(Header(1, self, StreamHeader(session_id=session, has_video=False, has_audio=True)))

    def frames(self, first: int, count: int = 1) -> None:
        frames = []
        for seq in range(first, first + count):
            frame = make_frame(AUDIO, seq * 20, b"\xaf\x01" + b"x" * 8)
            frame.sequence = seq
            frames.append(frame)
        self.on_event(Batch(1, self, FrameBatch(frames=frames)))

    def fail(self) -> None:
        self.lost = "UNAVAILABLE"
        self.done.set()

    def end(self, reason: StreamEnd.Reason.ValueType) -> None:
        self.on_event(End(1, self, StreamEnd(reason=reason)))
        self.done.set()


class FakeLinks:
    """Relays by address; every subscribe opens a FakeChannel the test then drives."""

    def __init__(self) -> None:
        self.opened: list[FakeChannel] = []

    def subscribe(self, address: str) -> FakeLinks:
        self.address = address
        return self

    def open(self, opening: SubscribeOpen, on_event: Callable[[Event], None]) -> FakeChannel:
        channel = FakeChannel(self.address, on_event)
        self.opened.append(channel)
        return channel


class Upstreams:
    """locate(): names `relays` in order (skipping avoided ones); None once told nobody has it. Every call
    advances the fake clock by `step`."""

    def __init__(self, clock: FakeClock, step: float = 0.5) -> None:
        self.clock = clock
        self.step = step
        self.relays = ["origin-1"]
        self.calls = 0
        self.avoided: list[set[str]] = []

    async def locate(self, key: StreamKey, avoid: set[str]) -> str | None:
        self.calls += 1
        self.avoided.append(avoid)
        self.clock.now += self.step
        return next((r for r in self.relays if r not in avoid), None)


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subscription, "RETRY_EVERY", 0)


class Following:
    """A subscription on a fake clock, its task, and what it was given."""

    def __init__(self, *relays: str) -> None:
        self.clock, self.links, self.received = FakeClock(), FakeLinks(), list[Frame]()
        self.upstreams = Upstreams(self.clock)
        self.upstreams.relays = list(relays)
        self.sub = UpstreamSubscription(stream_key("live", "x"), self.upstreams.locate, self.links,  # type: ignore[arg-type]
                                        "viewer", on_header=lambda h, new: None, on_frames=self.received.extend,
                                        retry_for=10.0, clock=self.clock)
        self.task = asyncio.create_task(self.sub.run())


async def opened(links: FakeLinks, count: int) -> FakeChannel:
    for _ in range(1000):
        if len(links.opened) >= count:
            return links.opened[count - 1]
        await asyncio.sleep(0)
    raise AssertionError(f"channel {count} was never opened")


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_loss_after_an_hour_of_following_retries_for_the_whole_window() -> None:
    async def scenario() -> None:
        f = Following("origin-1")
        first = await opened(f.links, 1)
        first.header()
        first.frames(1)
        for minute in range(60):  # an hour of frames from the same upstream, and no header since
            f.clock.now += 60
            first.frames(2 + minute)
        f.upstreams.relays = []  # nobody has it any more: every locate from now on finds nothing
        calls_before, lost_at = f.upstreams.calls, f.clock.now
        first.fail()
        end = await f.task
        assert end.reason == StreamEnd.REASON_UPSTREAM_LOST  # not UNPUBLISHED: it may live on elsewhere
        assert f.upstreams.calls - calls_before == 20  # 10 s of retries, 0.5 s each, counted from the loss
        assert f.clock.now - lost_at == pytest.approx(10.0)
        assert len(f.received) == 61

    run(scenario)


def test_a_loss_during_a_retry_keeps_the_first_deadline() -> None:
    async def scenario() -> None:
        f = Following("origin-1", "origin-2")
        first = await opened(f.links, 1)
        first.header()
        first.frames(1, 5)
        f.clock.now += 3600
        lost_at = f.clock.now
        first.fail()  # origin-1 dies after an hour
        second = await opened(f.links, 2)
        assert second.address == "origin-2"
        f.clock.now += 4
        second.header()  # origin-2 answers with the header and the GOP replay, all of it already seen
        second.frames(1, 5)
        assert len(f.received) == 5
        f.upstreams.relays = []
        second.fail()  # and dies too, before any new frame: the deadline is still lost_at + 10
        end = await f.task
        assert end.reason == StreamEnd.REASON_UPSTREAM_LOST
        assert f.clock.now - lost_at == pytest.approx(10.0)

    run(scenario)


def test_frames_flowing_again_give_the_window_back() -> None:
    async def scenario() -> None:
        f = Following("origin-1", "origin-2")
        first = await opened(f.links, 1)
        first.header()
        first.frames(1)
        first.fail()
        second = await opened(f.links, 2)
        assert f.upstreams.avoided[-1] == {"origin-1"}
        f.clock.now += 8  # most of the window spent finding origin-2
        second.header()
        second.frames(2)  # a new frame: recovered
        assert not f.sub.window.losing and not f.sub.avoid.current()
        f.clock.now += 100
        f.upstreams.relays = []
        lost_at = f.clock.now
        second.fail()
        end = await f.task
        assert f.clock.now - lost_at == pytest.approx(10.0)  # a whole window again, not the 2 s left of the first
        assert end.reason == StreamEnd.REASON_UPSTREAM_LOST

    run(scenario)


def test_an_upstream_that_lost_the_stream_is_left_for_another_one() -> None:
    """An edge that gave up (UPSTREAM_LOST) or is shutting down is a failover, not the end of the stream;
    only UNPUBLISHED ends it."""

    async def scenario() -> None:
        f = Following("edge-1", "edge-2", "origin")
        first = await opened(f.links, 1)
        first.header()
        first.frames(1)
        first.end(StreamEnd.REASON_UPSTREAM_LOST)
        second = await opened(f.links, 2)
        assert second.address == "edge-2"
        second.header()
        second.end(StreamEnd.REASON_SHUTDOWN)
        third = await opened(f.links, 3)
        assert third.address == "origin"
        third.header()
        third.frames(2)
        third.end(StreamEnd.REASON_UNPUBLISHED)
        end = await f.task
        assert end.reason == StreamEnd.REASON_UNPUBLISHED
        assert f.sub.switches == 2 and [f.sequence for f in f.received] == [1, 2]

    run(scenario)


def test_a_failed_relay_is_avoided_for_a_few_seconds_only() -> None:
    """A relay restarted on the same address must be used again."""
    clock = FakeClock()
    avoid = RecentFailures(3.0, clock)
    avoid.add("edge-1")
    clock.now += 2
    avoid.add("edge-2")
    assert avoid.current() == {"edge-1", "edge-2"}
    clock.now += 1.5
    assert avoid.current() == {"edge-2"}
    clock.now += 2
    assert avoid.current() == set()


def test_the_retry_window_counts_from_the_first_loss() -> None:
    clock = FakeClock()
    window = RetryWindow(10, clock)
    assert not window.expired()  # never lost
    clock.now += 3600
    window.lose()
    clock.now += 6
    window.lose()  # a second failure while retrying
    assert not window.expired()
    clock.now += 4
    assert window.expired()
    window.recover()
    assert not window.expired() and not window.losing


def test_an_unreachable_dispatch_is_logged_once_per_outage_not_per_retry(caplog: pytest.LogCaptureFixture) -> None:
    import grpc

    from castmesh.mesh.subscription import dispatch_upstream
    from castmesh.proto.v1.dispatch_pb2 import LocateReply

    class Dispatch:
        down = True

        async def Locate(self, request: object, timeout: float) -> LocateReply:
            if self.down:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
            return LocateReply(found=True, origin="o:1")

    async def scenario() -> list[str | None]:
        dispatch = Dispatch()
        locate = dispatch_upstream(dispatch)  # type: ignore[arg-type]
        found = [await locate(stream_key("live", f"s{i % 7}"), set()) for i in range(200)]  # many feeds, retrying
        dispatch.down = False
        found.append(await locate(stream_key("live", "s1"), set()))
        return found

    with caplog.at_level("INFO", logger="castmesh.subscription"):
        found = asyncio.run(scenario())
    assert found[:200] == [None] * 200 and found[200] == "o:1"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("locate.failed" in m for m in messages) == 1
    assert sum("locate.recovered" in m for m in messages) == 1
