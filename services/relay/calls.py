"""The relay's end of the multiplexed calls: asyncio adapters around the sans-IO relay side of the channel
protocol (castmesh.mesh.channels; castmesh.mesh.link is the other end).

A PublishCall holds the streams that one ingest publishes through one Relay.Publish call, by channel.
When the call breaks, each of them is treated as a publisher that vanished (the stream waits in grace).

A SubscribeCall holds the subscriptions of one node (an edge or a playback node) on one Relay.Subscribe
call. Subscribers say when they have something; each response gathers what every ready subscriber has,
so a busy call writes few, large messages. All subscriptions of a call share its HTTP/2 flow control:
if the peer stops reading, the writes stall, the subscribers' queues age past max_lag, they skip and then
drop, and the first drop that finds the call stalled for longer than max_lag ends the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, StatusCode

from castmesh.media.frames import detached, stream_path
from castmesh.mesh import tracing
from castmesh.mesh.channels import (
    MAX_MESSAGE_BYTES,
    Closed,
    Frames,
    LimitExceeded,
    PublishOpened,
    PublishServer,
    SubscribeOpened,
    SubscribeServer,
    Unpublished,
)
from castmesh.mesh.logs import event
from castmesh.proto.v1.media_pb2 import FrameBatch
from castmesh.proto.v1.relay_pb2 import (
    PublishOpen,
    PublishRejected,
    PublishRequest,
    PublishResponse,
    StreamEnd,
    SubscribeOpen,
    SubscribeRequest,
    SubscribeResponse,
)
from services.relay.fanout import BYTES_OUT, FRAMES_OUT, RelayStream, StreamTable, Subscriber

log = logging.getLogger("castmesh.relay")


class Relay(Protocol):
    """What the calls need of their relay (services.relay.service.RelayService): this module does not
    import it, so the two do not import each other."""

    table: StreamTable
    max_lag: float
    node_id: str
    role: str

    def subscribe(self, opening: SubscribeOpen, sub: Subscriber) -> RelayStream | StreamEnd: ...
    def unsubscribe(self, stream: RelayStream, sub: Subscriber, outcome: str) -> None: ...
    def unpublished(self, stream: RelayStream, session_id: str, clean: bool, reason: str) -> None: ...


@dataclass(slots=True)
class Publishing:
    """One publish on a call."""

    stream: RelayStream
    session_id: str
    setup: Span  # its `relay.publish` span until its first frames, then INVALID_SPAN


@dataclass(slots=True)
class Watching:
    """One subscription on a call."""

    sub: Subscriber
    stream: RelayStream
    setup: Span  # its `relay.subscribe` span until its first frames go out, then INVALID_SPAN


class _Call:
    """What both calls share: the peer's messages, read in a task of their own and handled as they come."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.wake = asyncio.Event()  # set when there is something to send, or reading has ended
        self.reading = True
        self.task = asyncio.current_task()  # the handler's: cancelled to end the call

    def received(self, message: PublishRequest | SubscribeRequest) -> None:
        try:
            self._handle(message)
        except LimitExceeded as exc:
            self._overflowed(exc)

    def _handle(self, message: PublishRequest | SubscribeRequest) -> None:
        raise NotImplementedError

    def _overflowed(self, exc: LimitExceeded) -> None:
        """The peer leaves more answers unread than it may (castmesh.mesh.channels.MAX_PENDING): end its call."""
        if self.task is not None and not self.task.done():
            event(log, "call.overflow", level=logging.WARNING, call=type(self).__name__, error=str(exc))
            self.task.cancel()

    async def read(self, requests: AsyncIterator[PublishRequest] | AsyncIterator[SubscribeRequest]) -> None:
        try:
            async for request in requests:
                self.received(request)
                self.wake.set()
        except Exception:
            log.exception("%s failed while reading", type(self).__name__)
        finally:
            self.reading = False
            self.wake.set()


class PublishCall(_Call):
    """Each open is a `relay.publish` span in the publisher's trace, ended by the channel's first frames."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.protocol = PublishServer()

    def _handle(self, request: PublishRequest) -> None:
        for ev in self.protocol.receive(request):
            if isinstance(ev, Frames):
                if ev.batch.frames:
                    ev.owner.stream.publish(detached(ev.batch))
                    if ev.owner.setup is not INVALID_SPAN:
                        ev.owner.setup = tracing.set_up(ev.owner.setup, "first frames", frames=len(ev.batch.frames))
            elif isinstance(ev, PublishOpened):
                self._open(ev.channel, ev.open)
            elif isinstance(ev, Unpublished):
                publishing: Publishing = ev.owner
                publishing.setup = tracing.set_up(publishing.setup, "ended before any frame")
                self.relay.unpublished(publishing.stream, publishing.session_id, ev.clean,
                                       "publisher unpublished" if ev.clean else "publisher vanished")

    def _open(self, channel: int, opening: PublishOpen) -> None:
        def reject(reason: PublishRejected.Reason, detail: str) -> None:
            self.protocol.reject(channel, reason, detail)

        if not opening.stream.name:
            return reject(PublishRejected.REASON_BAD_REQUEST, "open named no stream")
        if self.relay.role != "origin":
            return reject(PublishRejected.REASON_BAD_REQUEST, "this relay is an edge; publish to an origin")
        waiting = self.relay.table.get(opening.stream)
        previous = waiting.session_id if waiting is not None else ""
        span = tracing.start("relay.publish", {"castmesh.stream": stream_path(opening.stream),
                                               "castmesh.session": opening.session_id,
                                               "castmesh.node": self.relay.node_id},
                             kind=SpanKind.SERVER, context=opening.trace_context)
        stream = self.relay.table.claim(opening.stream, opening.session_id, dict(opening.trace_context))
        if stream is None:
            span.set_status(StatusCode.ERROR, "already published")
            span.end()
            event(log, "publish.rejected", stream=f"{opening.stream.app}/{opening.stream.name}",
                  session=opening.session_id, reason="already published")
            return reject(PublishRejected.REASON_ALREADY_PUBLISHED, "stream is already being published")
        if waiting is not None and previous != opening.session_id:
            span.add_event("republish", {"castmesh.previous_session": previous,
                                         "castmesh.subscribers": len(waiting.subscribers)})
        event(log, "publish.start", stream=stream.path, session=opening.session_id, client=opening.client_addr,
              subscribers=len(stream.subscribers))
        self.protocol.accept(channel, Publishing(stream, opening.session_id, span))

    async def next_response(self) -> PublishResponse | None:
        """What to answer next; None once the publisher has stopped sending."""
        while (response := self.protocol.data_to_send()) is None:
            if not self.reading:
                return None
            self.wake.clear()
            await self.wake.wait()
        return response

    def vanished(self) -> None:
        """The call is over: what it still published lost its publisher."""
        for ev in self.protocol.broken():
            publishing: Publishing = ev.owner
            publishing.setup = tracing.set_up(publishing.setup, "call ended before any frame")
            self.relay.unpublished(publishing.stream, publishing.session_id, False, "publish call ended")


class SubscribeCall(_Call):
    """Each open is a `relay.subscribe` span in the subscriber's trace, linked to the publisher's session,
    ended once the subscriber's first frames go out."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.protocol = SubscribeServer()
        self.ready: dict[int, None] = {}  # an ordered set: channels whose subscriber has something to send
        self.writing_since = 0.0

    def _handle(self, request: SubscribeRequest) -> None:
        for ev in self.protocol.receive(request):
            if isinstance(ev, SubscribeOpened):
                self._open(ev.channel, ev.open)
            elif isinstance(ev, Closed):
                watching: Watching = ev.owner
                self._set_up(watching, "closed before any frame")
                self.ready.pop(ev.channel, None)
                self.relay.unsubscribe(watching.stream, watching.sub, "closed")

    def _open(self, channel: int, opening: SubscribeOpen) -> None:
        sub = Subscriber(opening.subscriber_id, self.relay.max_lag, self._ready, channel)
        sub.on_drop = self._dropped
        span = tracing.start("relay.subscribe", {"castmesh.stream": stream_path(opening.stream),
                                                 "castmesh.subscriber": opening.subscriber_id,
                                                 "castmesh.node": self.relay.node_id},
                             kind=SpanKind.SERVER, context=opening.trace_context)
        with tracing.current(span):  # an edge's pull starts inside it
            found = self.relay.subscribe(opening, sub)
        if isinstance(found, StreamEnd):
            span.set_status(StatusCode.ERROR, StreamEnd.Reason.Name(found.reason))
            span.end()
            self.protocol.refuse(channel, found)
            return
        self.protocol.start(channel, Watching(sub, found, span))

    @staticmethod
    def _set_up(watching: Watching, outcome: str) -> None:
        if watching.setup is not INVALID_SPAN:
            for link in tracing.links(watching.stream.publisher_trace):
                watching.setup.add_link(link.context, {"castmesh.link": "publisher"})
            watching.setup = tracing.set_up(watching.setup, outcome)

    def _ready(self, sub: Subscriber) -> None:
        self.ready[sub.channel] = None
        self.wake.set()

    def _dropped(self, sub: Subscriber) -> None:
        if self.writing_since and time.monotonic() - self.writing_since > self.relay.max_lag and self.task:
            event(log, "subscribe.stalled", level=logging.WARNING, subscriber=sub.id,
                  channels=len(self.protocol.channels), stalled_s=round(time.monotonic() - self.writing_since, 1))
            self.task.cancel()

    async def next_response(self) -> SubscribeResponse | None:
        """Everything ready subscribers have, up to MAX_MESSAGE_BYTES; None once the subscriber has
        stopped sending and no subscription is left."""
        while not self.ready and not self.protocol.has_notes():
            if not self.reading and not self.protocol.channels:
                return None
            self.wake.clear()
            await self.wake.wait()
        response = self.protocol.response()
        budget = MAX_MESSAGE_BYTES
        frames = 0
        channels = self.protocol.channels
        for number in list(self.ready):
            if budget <= 0:
                break
            channel = channels.get(number)
            watching: Watching | None = channel.owner if channel is not None else None
            if watching is None:  # not started yet (its GOP came during the open), or over
                if channel is None:
                    del self.ready[number]
                continue
            items, size, end = watching.sub.take(budget)
            budget -= size
            if watching.setup is not INVALID_SPAN and (end is not None or any(isinstance(i, FrameBatch)
                                                                              for i in items)):
                self._set_up(watching, "ended" if end else "first frames")
            frames += self.protocol.write(response, number, items, end)
            if end is not None:
                self.relay.unsubscribe(watching.stream, watching.sub, StreamEnd.Reason.Name(end.reason))
            if not watching.sub.queue or end is not None:
                del self.ready[number]
        BYTES_OUT.inc(MAX_MESSAGE_BYTES - budget)
        FRAMES_OUT.inc(frames)
        return response

    def close_all(self) -> None:
        for ev in self.protocol.broken():
            watching: Watching = ev.owner
            self._set_up(watching, "call ended before any frame")
            end = watching.sub.end
            outcome = StreamEnd.Reason.Name(end.reason) if end else "cancelled"
            self.relay.unsubscribe(watching.stream, watching.sub, outcome)
        self.ready.clear()
