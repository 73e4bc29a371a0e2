"""The relay's end of the multiplexed calls (see castmesh.mesh.link for the other end).

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
from typing import Any, Protocol

from opentelemetry.trace import Span, SpanKind, StatusCode

from castmesh.media.frames import detached, stream_path
from castmesh.mesh import tracing
from castmesh.mesh.logs import event
from castmesh.proto.v1.media_pb2 import FrameBatch, StreamHeader
from castmesh.proto.v1.relay_pb2 import (
    PublishAccepted,
    PublishEnded,
    PublishItem,
    PublishOpen,
    PublishRejected,
    PublishReply,
    PublishRequest,
    StreamEnd,
    SubscribeEvent,
    SubscribeItem,
    SubscribeOpen,
    SubscribeRequest,
    SubscribeResponse,
)
from services.relay.fanout import BYTES_OUT, FRAMES_OUT, RelayStream, StreamTable, Subscriber

log = logging.getLogger("castmesh.relay")

MAX_CHANNELS = 10_000  # per call: a node carries thousands of streams, not millions
# Answers (accepted/rejected/ended) and notes (ends) waiting to be sent on one call. A peer that keeps
# sending opens and ends but reads nothing would grow them without end: past this, its call is ended.
MAX_PENDING = 2 * MAX_CHANNELS
MAX_RESPONSE_BYTES = 8 << 20  # media per response; the rest goes in the next one


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


class _Call:
    """What both calls share: the peer's items, read in a task of their own and handled as they come."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.wake = asyncio.Event()  # set when there is something to send, or reading has ended
        self.reading = True
        self.task = asyncio.current_task()  # the handler's: cancelled to end the call

    def _overflowing(self, pending: int) -> bool:
        """True (and the call is being ended) if `pending` answers are more than the peer may leave unread."""
        if pending < MAX_PENDING:
            return False
        if self.task is not None and not self.task.done():
            event(log, "call.overflow", level=logging.WARNING, call=type(self).__name__, pending=pending)
            self.task.cancel()
        return True

    def handle(self, item: Any) -> None:
        raise NotImplementedError

    async def read(self, requests: AsyncIterator[PublishRequest] | AsyncIterator[SubscribeRequest]) -> None:
        try:
            async for request in requests:
                for item in request.items:
                    self.handle(item)
        except Exception:
            log.exception("%s failed while reading", type(self).__name__)
        finally:
            self.reading = False
            self.wake.set()


class PublishCall(_Call):
    """Each open is a `relay.publish` span in the publisher's trace, ended by the channel's first frames."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.streams: dict[int, tuple[RelayStream, str]] = {}  # channel -> (stream, publish session id)
        self.setups: dict[int, Span] = {}  # channel -> its span, until its first frames
        self.replies: list[PublishReply] = []

    def handle(self, item: PublishItem) -> None:
        body = item.WhichOneof("body")
        if body == "batch":
            entry = self.streams.get(item.channel)
            if entry is not None and item.batch.frames:
                entry[0].publish(detached(item.batch))
                if self.setups:
                    self._set_up(item.channel, "first frames", frames=len(item.batch.frames))
        elif body == "open":
            self._open(item.channel, item.open)
        elif body == "end":
            self._set_up(item.channel, "ended before any frame")
            entry = self.streams.pop(item.channel, None)
            if entry is not None:
                clean = item.end.clean
                self.relay.unpublished(entry[0], entry[1], clean,
                                       "publisher unpublished" if clean else "publisher vanished")
            self._reply(PublishReply(channel=item.channel, ended=PublishEnded()))

    def _open(self, channel: int, opening: PublishOpen) -> None:
        def reject(reason: PublishRejected.Reason, detail: str) -> None:
            self._reply(PublishReply(channel=channel, rejected=PublishRejected(reason=reason, detail=detail)))

        if channel in self.streams:
            return reject(PublishRejected.REASON_BAD_REQUEST, f"channel {channel} is already open")
        if len(self.streams) >= MAX_CHANNELS:
            return reject(PublishRejected.REASON_BAD_REQUEST, f"more than {MAX_CHANNELS} streams on one call")
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
        self.setups[channel] = span
        self.streams[channel] = (stream, opening.session_id)
        event(log, "publish.start", stream=stream.path, session=opening.session_id, client=opening.client_addr,
              subscribers=len(stream.subscribers))
        self._reply(PublishReply(channel=channel, accepted=PublishAccepted()))

    def _set_up(self, channel: int, outcome: str, **attributes: int) -> None:
        span = self.setups.pop(channel, None)
        if span is not None:
            tracing.set_up(span, outcome, **attributes)

    def _reply(self, reply: PublishReply) -> None:
        if self._overflowing(len(self.replies)):
            return
        self.replies.append(reply)
        self.wake.set()

    async def next_replies(self) -> list[PublishReply] | None:
        """What to answer next; None once the publisher has stopped sending."""
        while not self.replies:
            if not self.reading:
                return None
            self.wake.clear()
            await self.wake.wait()
        replies, self.replies = self.replies, []
        return replies

    def vanished(self) -> None:
        """The call is over: what it still published lost its publisher."""
        for stream, session_id in self.streams.values():
            self.relay.unpublished(stream, session_id, False, "publish call ended")
        self.streams.clear()
        for channel in list(self.setups):
            self._set_up(channel, "call ended before any frame")


class SubscribeCall(_Call):
    """Each open is a `relay.subscribe` span in the subscriber's trace, linked to the publisher's session,
    ended once the subscriber's first frames go out."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.channels: dict[int, tuple[Subscriber, RelayStream]] = {}
        self.setups: dict[Subscriber, Span] = {}
        self.ready: dict[Subscriber, None] = {}  # an ordered set: subscribers with something to send
        self.notes: list[SubscribeEvent] = []  # ends for opens that never started, and for closes
        self.writing_since = 0.0

    def handle(self, item: SubscribeItem) -> None:
        channel = item.channel
        body = item.WhichOneof("body")
        if body == "open":
            if channel in self.channels:
                return self._note(channel, StreamEnd.REASON_BAD_REQUEST, f"channel {channel} is already open")
            if len(self.channels) >= MAX_CHANNELS:
                return self._note(channel, StreamEnd.REASON_BAD_REQUEST, f"more than {MAX_CHANNELS} streams")
            sub = Subscriber(item.open.subscriber_id, self.relay.max_lag, self._ready, channel)
            sub.on_drop = self._dropped
            span = tracing.start("relay.subscribe", {"castmesh.stream": stream_path(item.open.stream),
                                                     "castmesh.subscriber": item.open.subscriber_id,
                                                     "castmesh.node": self.relay.node_id},
                                 kind=SpanKind.SERVER, context=item.open.trace_context)
            with tracing.current(span):  # an edge's pull starts inside it
                found = self.relay.subscribe(item.open, sub)
            if isinstance(found, StreamEnd):
                span.set_status(StatusCode.ERROR, StreamEnd.Reason.Name(found.reason))
                span.end()
                return self._note(channel, found.reason, found.detail)
            self.setups[sub] = span
            self.channels[channel] = (sub, found)
        elif body == "close":
            entry = self.channels.pop(channel, None)
            if entry is not None:
                self._set_up(entry[0], entry[1], "closed before any frame")
                self.ready.pop(entry[0], None)
                self.relay.unsubscribe(entry[1], entry[0], "closed")
                self._note(channel, StreamEnd.REASON_CLOSED, "closed by the subscriber")

    def _set_up(self, sub: Subscriber, stream: RelayStream, outcome: str) -> None:
        span = self.setups.pop(sub, None)
        if span is not None:
            for link in tracing.links(stream.publisher_trace):
                span.add_link(link.context, {"castmesh.link": "publisher"})
            tracing.set_up(span, outcome)

    def _note(self, channel: int, reason: StreamEnd.Reason, detail: str) -> None:
        if self._overflowing(len(self.notes)):
            return
        self.notes.append(SubscribeEvent(channel=channel, end=StreamEnd(reason=reason, detail=detail)))
        self.wake.set()

    def _ready(self, sub: Subscriber) -> None:
        self.ready[sub] = None
        self.wake.set()

    def _dropped(self, sub: Subscriber) -> None:
        if self.writing_since and time.monotonic() - self.writing_since > self.relay.max_lag and self.task:
            event(log, "subscribe.stalled", level=logging.WARNING, subscriber=sub.id, channels=len(self.channels),
                  stalled_s=round(time.monotonic() - self.writing_since, 1))
            self.task.cancel()

    async def next_response(self) -> SubscribeResponse | None:
        """Everything ready subscribers have, up to MAX_RESPONSE_BYTES; None once the subscriber has
        stopped sending and no subscription is left."""
        while not self.ready and not self.notes:
            if not self.reading and not self.channels:
                return None
            self.wake.clear()
            await self.wake.wait()
        response = SubscribeResponse(events=self.notes)
        self.notes = []
        budget = MAX_RESPONSE_BYTES
        frames = 0
        for sub in list(self.ready):
            if budget <= 0:
                break
            items, size, end = sub.take(budget)
            budget -= size
            if sub in self.setups and (end is not None or any(isinstance(i, FrameBatch) for i in items)):
                self._set_up(sub, self.channels[sub.channel][1], "ended" if end else "first frames")
            batch = None
            for item in items:
                if isinstance(item, StreamHeader):
                    response.events.add(channel=sub.channel).header.CopyFrom(item)
                    batch = None
                else:
                    if batch is None:
                        batch = response.events.add(channel=sub.channel).batch
                    batch.MergeFrom(item)
                    frames += len(item.frames)
            if end is not None:
                response.events.add(channel=sub.channel).end.CopyFrom(end)
                entry = self.channels.pop(sub.channel, None)
                if entry is not None:
                    self.relay.unsubscribe(entry[1], sub, StreamEnd.Reason.Name(end.reason))
            if not sub.queue:
                del self.ready[sub]
        BYTES_OUT.inc(MAX_RESPONSE_BYTES - budget)
        FRAMES_OUT.inc(frames)
        return response

    def close_all(self) -> None:
        for sub, stream in self.channels.values():
            self._set_up(sub, stream, "call ended before any frame")
            self.relay.unsubscribe(stream, sub, StreamEnd.Reason.Name(sub.end.reason) if sub.end else "cancelled")
        self.channels.clear()
        self.ready.clear()
