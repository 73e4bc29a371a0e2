"""Many streams on one Relay.Publish and one Relay.Subscribe call: a real relay server in this process,
real gRPC on loopback, the links every castmesh node uses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from castmesh.media.frames import VIDEO, make_frame, stream_key
from castmesh.mesh.catalog import LISTING_TTL, Catalog
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.subscription import fixed_upstream
from castmesh.proto.v1.media_pb2 import FrameBatch
from castmesh.proto.v1.relay_pb2 import (
    PublishItem,
    PublishOpen,
    PublishRejected,
    PublishReply,
    PublishRequest,
    StatsReply,
    StatsRequest,
    StreamEnd,
    SubscribeClose,
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


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


async def publish_all(links: RelayLinks, address: str, names: list[str]) -> list:
    link = links.publish(address)
    replies: dict[str, list[PublishReply]] = {name: [] for name in names}
    channels = []
    for name in names:
        channel = link.open(replies[name].append)
        channel.send(PublishItem(open=PublishOpen(stream=stream_key("live", name), session_id=name)))
        channels.append(channel)
    await until(lambda: all(replies.values()), "every publish to be answered")
    assert all(r[0].HasField("accepted") for r in replies.values())
    return channels


def test_streams_share_one_call_each_way_and_every_subscriber_gets_only_its_stream() -> None:
    async def scenario(address: str, relay: RelayService) -> None:
        links = RelayLinks()
        names = [f"s{i}" for i in range(20)]
        publishers = await publish_all(links, address, names)
        got: dict[str, list[SubscribeEvent]] = {name: [] for name in names}
        link = links.subscribe(address)
        for name in names:
            link.open(got[name].append).send(SubscribeItem(open=SubscribeOpen(
                stream=stream_key("live", name), subscriber_id=f"viewer-{name}")))
        await until(lambda: all(any(e.HasField("header") for e in evs) for evs in got.values()), "headers")
        for ts in range(0, 400, 40):  # ten batches per stream, sent without waiting in between
            for name, channel in zip(names, publishers, strict=True):
                channel.send(PublishItem(batch=frame(ts, name.encode())))
        await until(lambda: all(sum(len(e.batch.frames) for e in evs) == 10 for evs in got.values()), "frames")
        for name, events in got.items():
            frames = [f for e in events for f in e.batch.frames]
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
        got: dict[str, list[SubscribeEvent]] = {"a": [], "b": []}
        link = links.subscribe(address)
        sub_a = link.open(got["a"].append)
        sub_a.send(SubscribeItem(open=SubscribeOpen(stream=stream_key("live", "a"), subscriber_id="va")))
        link.open(got["b"].append).send(SubscribeItem(open=SubscribeOpen(stream=stream_key("live", "b"),
                                                                         subscriber_id="vb")))
        await until(lambda: bool(got["a"]) and bool(got["b"]), "headers")
        sub_a.send(SubscribeItem(close=SubscribeClose()))
        await until(lambda: any(e.HasField("end") for e in got["a"]), "the closed channel's end")
        assert [e.end.reason for e in got["a"] if e.HasField("end")] == [StreamEnd.REASON_CLOSED]
        a.send(PublishItem(batch=frame(0, b"a")))
        b.send(PublishItem(batch=frame(0, b"b")))
        await until(lambda: any(e.HasField("batch") for e in got["b"]), "b's frame")
        assert not any(e.HasField("batch") for e in got["a"])
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
        channels = [link.open(lambda e: None) for _ in range(3)]
        for name, channel in zip("abc", channels, strict=True):
            channel.send(SubscribeItem(open=SubscribeOpen(stream=stream_key("live", name))))
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
            publisher.send(PublishItem(batch=FrameBatch(frames=[make_frame(VIDEO, 0, b"\x17\x00cfg")])))
            link = links.subscribe(f"127.0.0.1:{edge_port}")
            first: list[SubscribeEvent] = []
            link.open(first.append).send(SubscribeItem(open=SubscribeOpen(stream=stream_key("live", "x"))))
            await until(lambda: any(e.HasField("header") for e in first), "the first subscriber's header")
            for ts in (0, 40, 80):
                publisher.send(PublishItem(batch=frame(ts, b"x")))
            await until(lambda: sum(len(e.batch.frames) for e in first) == 3, "frames through the edge")
            late: list[SubscribeEvent] = []
            link.open(late.append).send(SubscribeItem(open=SubscribeOpen(stream=stream_key("live", "x"))))
            await until(lambda: any(e.HasField("batch") for e in late), "the late subscriber's GOP")
            assert late[0].HasField("header") and late[0].header.video_config.payload == b"\x17\x00cfg"
            assert [f.timestamp for e in late if e.HasField("batch") for f in e.batch.frames] == [0, 40, 80]
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
