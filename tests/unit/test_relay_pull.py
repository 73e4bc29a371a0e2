import asyncio

import pytest

from castmesh.media.frames import stream_key
from castmesh.mesh import subscription
from castmesh.mesh.retry import RetryWindow
from castmesh.proto.v1.media_pb2 import StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd, SubscribeOpen
from services.relay.fanout import Subscriber
from services.relay.service import RelayService
from tests.unit.test_subscription_clocks import FakeLinks, opened


def test_an_ended_pull_does_not_unregister_a_newer_pull_of_the_same_stream() -> None:
    async def scenario() -> None:
        forever = asyncio.Event()
        calls = 0

        async def locate(key: StreamKey, avoid: set[str]) -> str | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                return None  # the first pull finds nothing and ends
            await forever.wait()  # the second keeps looking
            return None

        relay = RelayService(role="edge", locate=locate, node_id="edge")
        opening = SubscribeOpen(stream=stream_key("live", "x"))
        first = relay._pull(opening)
        relay._pull(opening)  # a newer pull of the same stream, before the first has finished
        newer = relay.pulls[first.path]
        for _ in range(5):
            await asyncio.sleep(0)
        assert relay.pulls.get(first.path) is newer  # still known, so it can be stopped when unused
        newer.task.cancel()
        await asyncio.gather(newer.task, return_exceptions=True)
        assert first.path not in relay.pulls

    asyncio.run(scenario())


def test_an_edge_that_gives_up_says_its_upstream_was_lost_not_that_the_stream_was_unpublished(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its subscribers (playback nodes, deeper edges) then look elsewhere and keep their viewers."""
    monkeypatch.setattr(subscription, "RETRY_EVERY", 0.01)

    async def scenario() -> StreamEnd | None:
        found = True

        async def locate(key: StreamKey, avoid: set[str]) -> str | None:
            return "origin-1" if found else None

        relay = RelayService(role="edge", locate=locate, node_id="edge")
        links = FakeLinks()
        relay.links = links  # type: ignore[assignment]
        sub = Subscriber("playback-1", max_lag=3.0)
        stream = relay.subscribe(SubscribeOpen(stream=stream_key("live", "x")), sub)
        assert not isinstance(stream, StreamEnd)
        pull = relay.pulls[stream.path]
        pull.subscription.window = RetryWindow(0.3)  # a short window, on the real clock
        upstream = await opened(links, 1)
        upstream.header()
        upstream.frames(1, 3)
        found = False
        upstream.fail()  # the origin dies and dispatch names no other, for longer than the window
        await asyncio.wait_for(pull.task, 5)
        return sub.end

    end = asyncio.run(scenario())
    assert end is not None and end.reason == StreamEnd.REASON_UPSTREAM_LOST, end
