"""Links to relays: one Relay.Publish call and one Relay.Subscribe call per relay this node talks to,
shared by every stream it sends there or reads from there.

A Link is the asyncio adapter of one call around its sans-IO side (castmesh.mesh.channels): it writes the
messages the protocol hands it and feeds it what the relay sends. A LinkChannel on it carries one stream.
Items sent on any channel while the previous write is in flight go out together in the next message, so
an idle link writes at once (no added delay) and a busy one writes few, large messages: gRPC's cost per
message, which dominates per-stream calls, is paid per peer instead of per stream. Events go to their
channel as they arrive, on the event loop, with no task per channel.

When the call breaks, every channel on it is told (`lost` names why, `done` is set), every write not yet
made reports False, and the link leaves the pool; the next channel to that relay opens a fresh call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc
from prometheus_client import Counter

from castmesh.mesh import tracing
from castmesh.mesh.channels import (
    FINAL,
    Accepted,
    Batch,
    End,
    Ended,
    Header,
    LimitExceeded,
    ProtocolError,
    PublishClient,
    Rejected,
    SubscribeClient,
)
from castmesh.mesh.grpcutil import ChannelPool
from castmesh.mesh.logs import event
from castmesh.proto.v1.media_pb2 import FrameBatch
from castmesh.proto.v1.relay_pb2 import PublishOpen, SubscribeOpen
from castmesh.proto.v1.relay_pb2_grpc import RelayStub

log = logging.getLogger("castmesh.link")

OPENED = Counter("castmesh_link_calls_opened", "Relay.Publish/Subscribe calls this node opened to relays; more than "
                 "one per relay means the call was restarted after it broke", ["call"])
BROKEN = Counter("castmesh_link_calls_broken", "Relay.Publish/Subscribe calls that broke (not closed at shutdown)",
                 ["call"])

P = TypeVar("P", PublishClient, SubscribeClient)
PublishAnswer = Accepted | Rejected | Ended


class LinkChannel:
    """One stream on a link."""

    def __init__(self, link: Link[Any]) -> None:
        self.link = link
        self.number = 0
        self.done = asyncio.Event()  # the channel is over: its last event came, its owner closed it, or the link broke
        self.lost = ""  # why the link broke, if it did

    def deliver(self, ev: Any) -> None:
        if isinstance(ev, FINAL):
            self.done.set()

    def finish(self, why: str) -> None:
        self.lost = why
        self.done.set()

    def close(self) -> None:
        """Stop: the relay is told if it still holds the channel, and nothing more is heard of it."""
        if not self.done.is_set():
            self.link.close_channel(self.number)
        self.done.set()


class PublishChannel(LinkChannel):
    """A publish: send batches, then an end; the relay's answers (to the open, to the end) wait in order."""

    link: Link[PublishClient]

    def __init__(self, link: Link[PublishClient]) -> None:
        super().__init__(link)
        self.answers: deque[PublishAnswer] = deque()  # two at most: the open's and the end's
        self.arrived = asyncio.Event()

    def deliver(self, ev: PublishAnswer) -> None:
        self.answers.append(ev)
        self.arrived.set()
        super().deliver(ev)

    def finish(self, why: str) -> None:
        super().finish(why)
        self.arrived.set()

    def batch(self, batch: FrameBatch, size: int) -> asyncio.Future[bool]:
        """Send frames (about `size` bytes of media); the future says True once they are written, False if
        the link broke first."""
        link = self.link
        if link.lost or self.done.is_set():
            return link.failed()
        return link.queued(link.protocol.batch(self.number, batch, size))

    def end(self, clean: bool) -> asyncio.Future[bool]:
        link = self.link
        if link.lost or self.done.is_set():
            return link.failed()
        return link.queued(link.protocol.end(self.number, clean))

    async def answer(self, timeout: float) -> PublishAnswer | None:
        """The relay's next answer; None if the link broke or none came within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not self.answers and not self.lost:
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            return None
        return self.answers.popleft() if self.answers else None


class SubscribeChannel(LinkChannel):
    """A subscription: headers, batches and an end go to `on_event` as they arrive."""

    link: Link[SubscribeClient]

    def __init__(self, link: Link[SubscribeClient], on_event: Callable[[Header | Batch | End], None]) -> None:
        super().__init__(link)
        self.on_event = on_event

    def deliver(self, ev: Header | Batch | End) -> None:
        self.on_event(ev)
        super().deliver(ev)

    def stop(self) -> None:
        """Ask the relay to end the subscription: its end (closed) comes as the last event."""
        if not self.done.is_set() and not self.link.lost:
            self.link.protocol.close(self.number)
            self.link.wake.set()


class Link(Generic[P]):
    def __init__(self, address: str, call: grpc.aio.StreamStreamCall, protocol: P,
                 on_broken: Callable[[Link[Any]], None], kind: str) -> None:
        self.address = address
        self.kind = kind  # publish or subscribe
        OPENED.labels(kind).inc()
        self.call = call
        self.protocol: P = protocol
        self.on_broken = on_broken
        self.waiting: dict[int, asyncio.Future[bool]] = {}  # by message number: senders waiting for its write
        self.written = 0  # the last message number written
        self.wake = asyncio.Event()
        self.lost = ""
        self.messages_out = 0
        self.messages_in = 0
        loop = asyncio.get_running_loop()
        self.writer = loop.create_task(self._write_loop())
        self.reader = loop.create_task(self._read_loop())

    def _open(self, channel: LinkChannel, opening: Any) -> None:
        if self.lost:
            channel.finish(self.lost)
            return
        try:
            channel.number, _ = self.protocol.open(opening, channel)
        except LimitExceeded as exc:
            channel.finish(str(exc))
            return
        self.wake.set()

    def failed(self) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.set_result(False)
        return future

    def queued(self, number: int) -> asyncio.Future[bool]:
        """An item joined message `number`: wake the writer; the future of that message's write."""
        self.wake.set()
        future = self.waiting.get(number)
        if future is None:
            future = self.waiting[number] = asyncio.get_running_loop().create_future()
        return future

    def close_channel(self, number: int) -> None:
        if not self.lost and number:
            if isinstance(self.protocol, PublishClient):
                self.protocol.abandon(number)
            else:
                self.protocol.close(number)
                self.protocol.forget(number)
            self.wake.set()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while (out := self.protocol.data_to_send()) is not None:
                    number, message = out
                    await self.call.write(message)
                    self.messages_out += 1
                    self.written = number
                    if (future := self.waiting.pop(number, None)) is not None:
                        future.set_result(True)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self.broken(f"write failed: {type(exc).__name__}")

    async def _read_loop(self) -> None:
        why = "the relay ended the call"
        try:
            async for response in self.call:
                self.messages_in += 1
                for ev in self.protocol.receive(response):
                    try:
                        ev.owner.deliver(ev)
                    except Exception:  # one stream's bug must not break every stream on the link
                        log.exception("channel %d of the link to %s failed; closing it", ev.channel, self.address)
                        ev.owner.close()
        except grpc.aio.AioRpcError as exc:
            why = exc.code().name
        except ProtocolError as exc:
            why = f"protocol error: {exc}"
        except asyncio.CancelledError:
            if self.lost:
                raise  # broken() stopped this loop
            why = "the call was cancelled"  # by someone else holding it
        self.broken(why)

    def broken(self, why: str, quiet: bool = False) -> None:
        """The call is gone: tell every channel and every sender still waiting for a write."""
        if self.lost:
            return
        self.lost = why
        self.on_broken(self)
        lost = self.protocol.broken(why)
        if not quiet:
            BROKEN.labels(self.kind).inc()
            event(log, "link.lost", level=logging.WARNING, relay=self.address, reason=why, channels=len(lost))
        for ev in lost:
            if ev.owner is not None:
                ev.owner.finish(why)
        for future in self.waiting.values():  # the write in flight too: its sender must hear it
            future.set_result(False)
        self.waiting.clear()
        self.call.cancel()
        for task in (self.writer, self.reader):
            if task is not asyncio.current_task():
                task.cancel()


class PublishLink(Link[PublishClient]):
    def open(self, opening: PublishOpen) -> PublishChannel:
        channel = PublishChannel(self)
        self._open(channel, opening)
        return channel


class SubscribeLink(Link[SubscribeClient]):
    def open(self, opening: SubscribeOpen, on_event: Callable[[Header | Batch | End], None]) -> SubscribeChannel:
        channel = SubscribeChannel(self, on_event)
        self._open(channel, opening)
        return channel


class RelayLinks:
    """This node's links, by relay address."""

    def __init__(self, channels: ChannelPool | None = None) -> None:
        self.channels = channels or ChannelPool(traced=False)  # media calls trace themselves
        self.publishes: dict[str, PublishLink] = {}
        self.subscribes: dict[str, SubscribeLink] = {}

    def publish(self, address: str) -> PublishLink:
        link = self.publishes.get(address)
        if link is None:
            span, metadata = tracing.media_call("/castmesh.v1.Relay/Publish")
            call = RelayStub(self.channels.get(address)).Publish(metadata=metadata)
            tracing.end_at_setup(span, call)
            link = self.publishes[address] = PublishLink(address, call, PublishClient(), self._forget, "publish")
        return link

    def subscribe(self, address: str) -> SubscribeLink:
        link = self.subscribes.get(address)
        if link is None:
            span, metadata = tracing.media_call("/castmesh.v1.Relay/Subscribe")
            call = RelayStub(self.channels.get(address)).Subscribe(metadata=metadata)
            tracing.end_at_setup(span, call)
            link = self.subscribes[address] = SubscribeLink(address, call, SubscribeClient(), self._forget,
                                                            "subscribe")
        return link

    def _forget(self, link: Link[Any]) -> None:
        for links in (self.publishes, self.subscribes):
            if links.get(link.address) is link:
                del links[link.address]
        if link.address not in self.publishes and link.address not in self.subscribes:
            self.channels.forget(link.address)  # the relay may be gone for good (a replaced pod)

    async def close(self) -> None:
        links: list[Link[Any]] = [*self.publishes.values(), *self.subscribes.values()]
        for link in links:
            link.broken("shutting down", quiet=True)
        await self.channels.close()
