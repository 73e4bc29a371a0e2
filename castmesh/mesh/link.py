"""Links to relays: one Relay.Publish call and one Relay.Subscribe call per relay this node talks to,
shared by every stream it sends there or reads from there.

A Link owns one call. A LinkChannel on it carries one stream. Items sent on any channel while the
previous write is in flight go out together in the next message, so an idle link writes at once (no
added delay) and a busy one writes few, large messages: gRPC's cost per message, which dominates
per-stream calls, is paid per peer instead of per stream. Replies go to their channel's callback as
they arrive, on the event loop, with no task per channel.

When the call breaks, every channel on it is told (`lost` names why, `done` is set) and the link leaves
the pool; the next channel to that relay opens a fresh call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import grpc
from prometheus_client import Counter

from castmesh.mesh import tracing
from castmesh.mesh.grpcutil import ChannelPool
from castmesh.mesh.logs import event
from castmesh.proto.v1.relay_pb2 import (
    PublishItem,
    PublishReply,
    PublishRequest,
    PublishResponse,
    SubscribeEvent,
    SubscribeItem,
    SubscribeRequest,
    SubscribeResponse,
)
from castmesh.proto.v1.relay_pb2_grpc import RelayStub

log = logging.getLogger("castmesh.link")

OPENED = Counter("castmesh_link_calls_opened", "Relay.Publish/Subscribe calls this node opened to relays; more than "
                 "one per relay means the call was restarted after it broke", ["call"])
BROKEN = Counter("castmesh_link_calls_broken", "Relay.Publish/Subscribe calls that broke (not closed at shutdown)",
                 ["call"])

# Media per message at most: a burst (GOP replays after a failover) goes out as several messages, well
# under grpcutil.MAX_MESSAGE.
MAX_WRITE_BYTES = 8 << 20

class OnChannel(Protocol):
    channel: int


Item = TypeVar("Item", bound=OnChannel)  # PublishItem or SubscribeItem
Reply = TypeVar("Reply", bound=OnChannel)  # PublishReply or SubscribeEvent


class LinkChannel(Generic[Item, Reply]):
    """One stream on a link."""

    def __init__(self, link: Link[Item, Reply], number: int, on_reply: Callable[[Reply], None]) -> None:
        self.link = link
        self.number = number
        self.on_reply = on_reply
        self.done = asyncio.Event()  # the channel is over: ended by its owner, or its link broke
        self.lost = ""  # why the link broke, if it did

    def send(self, item: Item, size: int = 0) -> asyncio.Future[bool]:
        """Queue `item` (about `size` bytes of media); the future says True once it is written, False if
        the link broke first."""
        item.channel = self.number
        return self.link.enqueue(item, size)

    def close(self) -> None:
        """Stop routing replies here; the number is not used again on this link."""
        self.link.channels.pop(self.number, None)
        self.done.set()


class Write(Generic[Item]):
    __slots__ = ("items", "size", "written")

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.size = 0
        self.written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


class Link(Generic[Item, Reply]):
    def __init__(self, address: str, call: grpc.aio.StreamStreamCall, wrap: Callable[[list[Item]], Any],
                 replies: Callable[[Any], Iterable[Reply]], on_broken: Callable[[Link[Item, Reply]], None],
                 kind: str) -> None:
        self.address = address
        self.kind = kind  # publish or subscribe
        OPENED.labels(kind).inc()
        self.call = call
        self.wrap = wrap
        self.replies = replies
        self.on_broken = on_broken
        self.channels: dict[int, LinkChannel[Item, Reply]] = {}
        self.numbers = itertools.count(1)
        self.writes: deque[Write[Item]] = deque()
        self.in_flight: Write[Item] | None = None  # popped from writes, its call.write not yet returned
        self.wake = asyncio.Event()
        self.lost = ""
        self.messages_out = 0
        self.messages_in = 0
        loop = asyncio.get_running_loop()
        self.writer = loop.create_task(self._write_loop())
        self.reader = loop.create_task(self._read_loop())

    def open(self, on_reply: Callable[[Reply], None]) -> LinkChannel[Item, Reply]:
        channel = LinkChannel(self, next(self.numbers), on_reply)
        self.channels[channel.number] = channel
        if self.lost:
            channel.lost = self.lost
            channel.close()
        return channel

    def enqueue(self, item: Item, size: int) -> asyncio.Future[bool]:
        if self.lost:
            failed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            failed.set_result(False)
            return failed
        write = self.writes[-1] if self.writes else None
        if write is None or (write.items and write.size + size > MAX_WRITE_BYTES):
            write = Write()
            self.writes.append(write)
        write.items.append(item)
        write.size += size
        self.wake.set()
        return write.written

    async def _write_loop(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.writes:
                    write = self.in_flight = self.writes.popleft()
                    await self.call.write(self.wrap(write.items))
                    self.in_flight = None
                    self.messages_out += 1
                    write.written.set_result(True)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self.broken(f"write failed: {type(exc).__name__}")

    async def _read_loop(self) -> None:
        why = "the relay ended the call"
        try:
            async for response in self.call:
                self.messages_in += 1
                for reply in self.replies(response):
                    channel = self.channels.get(reply.channel)
                    if channel is None:
                        continue  # closed by its owner since
                    try:
                        channel.on_reply(reply)
                    except Exception:  # one stream's bug must not break every stream on the link
                        log.exception("channel %d of the link to %s failed; closing it", channel.number, self.address)
                        channel.close()
        except grpc.aio.AioRpcError as exc:
            why = exc.code().name
        except asyncio.CancelledError:
            if self.lost:
                raise  # broken() stopped this loop
            why = "the call was cancelled"  # by someone else holding it (the channel was closed)
        self.broken(why)

    def broken(self, why: str, quiet: bool = False) -> None:
        """The call is gone: tell every channel and every pending write."""
        if self.lost:
            return
        self.lost = why
        self.on_broken(self)
        if not quiet:
            BROKEN.labels(self.kind).inc()
            event(log, "link.lost", level=logging.WARNING, relay=self.address, reason=why,
                  channels=len(self.channels))
        for channel in list(self.channels.values()):
            channel.lost = why
            channel.close()
        if self.in_flight is not None:  # its sender must hear it too, or it waits for ever
            self.writes.appendleft(self.in_flight)
            self.in_flight = None
        while self.writes:
            self.writes.popleft().written.set_result(False)
        self.call.cancel()
        for task in (self.writer, self.reader):
            if task is not asyncio.current_task():
                task.cancel()


class RelayLinks:
    """This node's links, by relay address."""

    def __init__(self, channels: ChannelPool | None = None) -> None:
        self.channels = channels or ChannelPool(traced=False)  # media calls trace themselves
        self.publishes: dict[str, Link[PublishItem, PublishReply]] = {}
        self.subscribes: dict[str, Link[SubscribeItem, SubscribeEvent]] = {}

    def publish(self, address: str) -> Link[PublishItem, PublishReply]:
        link = self.publishes.get(address)
        if link is None:
            span, metadata = tracing.media_call("/castmesh.v1.Relay/Publish")
            call = RelayStub(self.channels.get(address)).Publish(metadata=metadata)
            tracing.end_at_setup(span, call)
            link = self.publishes[address] = Link(address, call, _publish_request, _publish_replies, self._forget,
                                                  "publish")
        return link

    def subscribe(self, address: str) -> Link[SubscribeItem, SubscribeEvent]:
        link = self.subscribes.get(address)
        if link is None:
            span, metadata = tracing.media_call("/castmesh.v1.Relay/Subscribe")
            call = RelayStub(self.channels.get(address)).Subscribe(metadata=metadata)
            tracing.end_at_setup(span, call)
            link = self.subscribes[address] = Link(address, call, _subscribe_request, _subscribe_events,
                                                   self._forget, "subscribe")
        return link

    def _forget(self, link: Link[Any, Any]) -> None:
        for links in (self.publishes, self.subscribes):
            if links.get(link.address) is link:
                del links[link.address]
        if link.address not in self.publishes and link.address not in self.subscribes:
            self.channels.forget(link.address)  # the relay may be gone for good (a replaced pod)

    async def close(self) -> None:
        links: list[Link[Any, Any]] = [*self.publishes.values(), *self.subscribes.values()]
        for link in links:
            link.broken("shutting down", quiet=True)
        await self.channels.close()


def _publish_request(items: list[PublishItem]) -> PublishRequest:
    return PublishRequest(items=items)


def _publish_replies(response: PublishResponse) -> Iterable[PublishReply]:
    return response.replies


def _subscribe_request(items: list[SubscribeItem]) -> SubscribeRequest:
    return SubscribeRequest(items=items)


def _subscribe_events(response: SubscribeResponse) -> Iterable[SubscribeEvent]:
    return response.events
