"""Many streams on one Relay.Publish and one Relay.Subscribe call: a real relay server in this process,
real gRPC on loopback, the links every castmesh node uses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from castmesh.media.frames import VIDEO, make_frame, stream_key
from castmesh.mesh.catalog import LISTING_TTL, Catalog
from castmesh.mesh.channels import Accepted, Batch, End, Header
from castmesh.mesh.link import PublishChannel, RelayLinks
from castmesh.mesh.subscription import fixed_upstream
from castmesh.proto.v1.media_pb2 import Frame, FrameBatch
from castmesh.proto.v1.relay_pb2 import (
    PublishItem,
    PublishOpen,
    PublishRejected,
    PublishReply,
    PublishRequest,
    StatsReply,
    StatsRequest,
    StreamEnd,
    SubscribeEvent,
    SubscribeItem,
    SubscribeOpen,
    SubscribeRequest,
)
from castmesh.proto.v1.relay_pb2_grpc import RelayStub
from services.relay import service as relay_service
from services.relay.service import RelayService

Scenario = Callable[[str, RelayService], Awaitable[None]]


def run(scenario: Scenario) -> None:
    async def main() -> None:
        relay = RelayService(node_id="relay")
        server, port = await relay_service.start("127.0.0.1", 0, relay)
        try:
            await asyncio.wait_for(scenario(f"127.0.0.1:{port}", relay), 20)
        finally:
            await server.stop(grace=0)

    asyncio.run(main())


def frame(ts: int, tag: bytes) -> FrameBatch:
    return FrameBatch(frames=[make_frame(VIDEO, ts, (b"\x17\x01" if ts == 0 else b"\x27\x01") + tag)])


Event = Header | Batch | End


def frames_of(events: list[Event]) -> list[Frame]:
    return [f for e in events if isinstance(e, Batch) for f in e.batch.frames]


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


async def publish_all(links: RelayLinks, address: str, names: list[str]) -> list[PublishChannel]:
    link = links.publish(address)
    channels = [link.open(PublishOpen(stream=stream_key("live", name), session_id=name)) for name in names]
    answers = await asyncio.gather(*(channel.answer(4) for channel in channels))
    assert all(isinstance(answer, Accepted) for answer in answers), answers
    return channels


def test_streams_share_one_call_each_way_and_every_subscriber_gets_only_its_stream() -> None:
    async def scenario(address: str, relay: RelayService) -> None:
        links = RelayLinks()
        names = [f"s{i}" for i in range(20)]
        publishers = await publish_all(links, address, names)
        got: dict[str, list[Event]] = {name: [] for name in names}
        link = links.subscribe(address)
        for name in names:
            link.open(SubscribeOpen(stream=stream_key("live", name), subscriber_id=f"viewer-{name}"), got[name].append)
        await until(lambda: all(any(isinstance(e, Header) for e in evs) for evs in got.values()), "headers")
        for ts in range(0, 400, 40):  # ten batches per stream, sent without waiting in between
            for name, channel in zip(names, publishers, strict=True):
                channel.batch(frame(ts, name.encode()), 0)
        await until(lambda: all(len(frames_of(evs)) == 10 for evs in got.values()), "frames")
        for name, events in got.items():
            frames = frames_of(events)
            assert [f.timestamp for f in frames] == list(range(0, 400, 40))
            assert {f.payload[2:] for f in frames} == {name.encode()}
        publish_link = links.publishes[address]
        assert publish_link.messages_out < 200 / 4, "items of many streams were not gathered into few messages"
        assert links.subscribes[address].messages_in < 200 / 4
        stats = await RelayStub(links.channels.get(address)).Stats(StatsRequest())
        assert sorted(s.subscribers[0] for s in stats.streams) == sorted(f"viewer-{n}" for n in names)
        await links.close()

    run(scenario)


def test_a_closed_subscription_ends_and_the_others_on_the_call_continue() -> None:
    async def scenario(address: str, relay: RelayService) -> None:
        links = RelayLinks()
        a, b = await publish_all(links, address, ["a", "b"])
        got: dict[str, list[Event]] = {"a": [], "b": []}
        link = links.subscribe(address)
        sub_a = link.open(SubscribeOpen(stream=stream_key("live", "a"), subscriber_id="va"), got["a"].append)
        link.open(SubscribeOpen(stream=stream_key("live", "b"), subscriber_id="vb"), got["b"].append)
        await until(lambda: bool(got["a"]) and bool(got["b"]), "headers")
        sub_a.stop()
        await until(lambda: any(isinstance(e, End) for e in got["a"]), "the closed channel's end")
        assert [e.end.reason for e in got["a"] if isinstance(e, End)] == [StreamEnd.REASON_CLOSED]
        a.batch(frame(0, b"a"), 0)
        b.batch(frame(0, b"b"), 0)
        await until(lambda: any(isinstance(e, Batch) for e in got["b"]), "b's frame")
        assert not any(isinstance(e, Batch) for e in got["a"])
        stats = await RelayStub(links.channels.get(address)).Stats(StatsRequest())
        assert {s.stream.name: list(s.subscribers) for s in stats.streams} == {"a": [], "b": ["vb"]}
        await links.close()

    run(scenario)


def test_bad_opens_get_a_clear_answer_and_harm_no_other_channel() -> None:
    async def scenario(address: str, relay: RelayService) -> None:
        stub = RelayStub(grpc.aio.insecure_channel(address))
        publish = stub.Publish()
        key = stream_key("live", "x")
        await publish.write(PublishRequest(items=[
            PublishItem(channel=1, open=PublishOpen(stream=key, session_id="one")),
            PublishItem(channel=1, open=PublishOpen(stream=stream_key("live", "y"), session_id="dup")),
            PublishItem(channel=2, open=PublishOpen(stream=stream_key("live", ""), session_id="unnamed")),
            PublishItem(channel=3, open=PublishOpen(stream=key, session_id="second")),
            PublishItem(channel=9, batch=frame(0, b"stray")),  # never opened: ignored
        ]))
        replies: list[PublishReply] = []
        while len(replies) < 4:
            replies += (await publish.read()).replies
        answers = [(r.channel, r.WhichOneof("body"), r.rejected.reason) for r in replies]
        assert answers == [(1, "accepted", 0), (1, "rejected", PublishRejected.REASON_BAD_REQUEST),
                           (2, "rejected", PublishRejected.REASON_BAD_REQUEST),
                           (3, "rejected", PublishRejected.REASON_ALREADY_PUBLISHED)]
        subscribe = stub.Subscribe()
        await subscribe.write(SubscribeRequest(items=[
            SubscribeItem(channel=1, open=SubscribeOpen(stream=stream_key("live", "nobody"))),
            SubscribeItem(channel=2, open=SubscribeOpen(stream=key)),
            SubscribeItem(channel=2, open=SubscribeOpen(stream=key)),
        ]))
        await publish.write(PublishRequest(items=[PublishItem(channel=1, batch=frame(0, b"ok"))]))
        events: list[SubscribeEvent] = []
        async for response in _responses(subscribe):
            events += response.events
            if any(e.HasField("batch") for e in events):
                break
        ends = {e.channel: e.end.reason for e in events if e.HasField("end")}
        assert ends == {1: StreamEnd.REASON_NOT_FOUND, 2: StreamEnd.REASON_BAD_REQUEST}
        assert [f.payload[2:] for e in events if e.HasField("batch") for f in e.batch.frames] == [b"ok"]
        publish.cancel()
        subscribe.cancel()

    run(scenario)


async def _responses(call: grpc.aio.StreamStreamCall) -> AsyncIterator:
    while (response := await call.read()) is not grpc.aio.EOF:
        yield response


def test_when_the_call_breaks_every_channel_on_it_is_told_and_streams_wait_for_their_publisher() -> None:
    async def scenario(address: str, relay: RelayService) -> None:
        publisher, subscriber = RelayLinks(), RelayLinks()
        await publish_all(publisher, address, ["a", "b", "c"])
        link = subscriber.subscribe(address)
        channels = [link.open(SubscribeOpen(stream=stream_key("live", name)), lambda e: None) for name in "abc"]
        await until(lambda: all(len(s.subscribers) == 1 for s in relay.table.streams.values()), "subscribers")
        # The publishing node goes away: its streams wait in grace, their subscribers stay.
        publisher.publishes[address].call.cancel()
        await until(lambda: not any(s.publishing for s in relay.table.streams.values()), "grace")
        assert len(relay.table.streams) == 3 and not any(c.done.is_set() for c in channels)
        # The subscribing node's call breaks: every channel on it learns why, and the link is replaced.
        link.call.cancel()
        await until(lambda: all(c.done.is_set() for c in channels), "every channel to be told")
        assert all(c.lost for c in channels)
        assert subscriber.subscribes.get(address) is not link
        await until(lambda: all(not s.subscribers for s in relay.table.streams.values()), "unsubscribed")
        await publisher.close()
        await subscriber.close()

    run(scenario)


def test_a_late_subscriber_to_an_edge_gets_the_header_before_the_gop() -> None:
    async def scenario(address: str, relay: RelayService) -> None:
        edge = RelayService(role="edge", locate=fixed_upstream(address), node_id="edge")
        edge_server, edge_port = await relay_service.start("127.0.0.1", 0, edge)
        links = RelayLinks()
        try:
            (publisher,) = await publish_all(links, address, ["x"])
            publisher.batch(FrameBatch(frames=[make_frame(VIDEO, 0, b"\x17\x00cfg")]), 0)
            link = links.subscribe(f"127.0.0.1:{edge_port}")
            first: list[Event] = []
            link.open(SubscribeOpen(stream=stream_key("live", "x")), first.append)
            await until(lambda: any(isinstance(e, Header) for e in first), "the first subscriber's header")
            for ts in (0, 40, 80):
                publisher.batch(frame(ts, b"x"), 0)
            await until(lambda: len(frames_of(first)) == 3, "frames through the edge")
            late: list[Event] = []
            link.open(SubscribeOpen(stream=stream_key("live", "x")), late.append)
            await until(lambda: any(isinstance(e, Batch) for e in late), "the late subscriber's GOP")
            assert isinstance(late[0], Header) and late[0].header.video_config.payload == b"\x17\x00cfg"
            assert [f.timestamp for f in frames_of(late)] == [0, 40, 80]
            stats = await RelayStub(links.channels.get(address)).Stats(StatsRequest())
            assert list(stats.streams[0].subscribers) == ["edge"]  # one upstream subscription for both
        finally:
            await links.close()
            await edge.links.close()
            await edge_server.stop(grace=0)

    run(scenario)


def test_a_relay_that_goes_away_is_forgotten_and_one_on_its_address_is_reached_again() -> None:
    async def main() -> None:
        links = RelayLinks()
        server, port = await relay_service.start("127.0.0.1", 0, RelayService(node_id="first"))
        address = f"127.0.0.1:{port}"
        catalog = Catalog(None, relay=address)
        await publish_all(links, address, ["a"])
        assert [s.stream.name for s in await catalog.streams()] == ["a"]
        await server.stop(grace=0)
        # Calls failed: no link and no channel to the address are kept (it may never come back).
        await until(lambda: address not in links.publishes, "the link to leave")
        assert address not in links.channels.channels
        catalog.streams.cache_clear()  # not the listing of a second ago
        assert await catalog.streams() == []
        assert address not in catalog.channels.channels
        server, _ = await relay_service.start("127.0.0.1", port, RelayService(node_id="second"))
        try:
            await publish_all(links, address, ["b"])  # a new call on a new channel, accepted
            catalog.streams.cache_clear()
            assert [s.stream.name for s in await catalog.streams()] == ["b"]
        finally:
            await links.close()
            await catalog.close()
            await server.stop(grace=0)

    asyncio.run(asyncio.wait_for(main(), 20))


class CountingRelay(RelayService):
    def __init__(self) -> None:
        super().__init__(node_id="counted")
        self.stats_calls = 0

    async def Stats(self, request: StatsRequest, context: grpc.aio.ServicerContext) -> StatsReply:
        self.stats_calls += 1
        return await super().Stats(request, context)


def test_listings_asked_for_together_or_within_a_second_cost_the_origin_one_stats_call() -> None:
    async def main() -> None:
        relay = CountingRelay()
        server, port = await relay_service.start("127.0.0.1", 0, relay)
        address = f"127.0.0.1:{port}"
        links, catalog = RelayLinks(), Catalog(None, relay=address)
        try:
            await publish_all(links, address, ["a"])
            lists = await asyncio.gather(*(catalog.streams() for _ in range(50)))  # fifty pages at once
            lists.append(await catalog.streams())  # and one a moment later
            assert all([s.stream.name for s in found] == ["a"] for found in lists)
            assert relay.stats_calls == 1
            await publish_all(links, address, ["b"])
            await asyncio.sleep(LISTING_TTL + 0.2)
            assert [s.stream.name for s in await catalog.streams()] == ["a", "b"]  # a new listing
            assert relay.stats_calls == 2
        finally:
            await links.close()
            await catalog.close()
            await server.stop(grace=0)

    asyncio.run(asyncio.wait_for(main(), 20))
