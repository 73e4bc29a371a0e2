"""The relay channel protocol, sans-IO: what each side of a Relay.Publish or Relay.Subscribe call may send
and receive, channel by channel, and the Dispatch.Lease call's one question at a time.

No gRPC and no asyncio in here (h11's shape). Each side is an object that is told what its owner does
(`open`, `accept`, `batch`, `end`...), takes the peer's messages (`receive(message)` yields events) and
hands back the messages to write (`data_to_send()`). The adapters only move messages between a gRPC
call and one of these: castmesh.mesh.link (the caller's side: ingest, edges, playback), services.relay.calls
(the relay's side) and services.ingest.lease.

Per channel (a number the caller picks, unique within its call; one stream each):
  publish    caller: open  ->  relay: accepted | rejected          (rejected: the channel is over)
             caller: batch*                                        (only once accepted)
             caller: end   ->  relay: ended                        (the channel is over)
  subscribe  caller: open  ->  relay: header, (header | batch)*, end   (end: the channel is over)
             caller: close ->  relay: end (closed)                 (what comes before it is dropped)
Every transition is in the tables below; anything else from the owner is a ProtocolError (a bug here),
from the peer a ProtocolError on the caller's side (the call is dropped) and a per-channel answer or a
dropped item on the relay's side (one peer's bad channel must not end its other streams).
`receive` yields lazily: the owner decides on an open before the next item of the message is looked at.
A broken call ends every channel at once: the caller's are lost, the relay's publishes vanish (grace).

Limits: MAX_CHANNELS open channels per call; MAX_PENDING answers waiting to be written on the relay's side
(a peer that sends and never reads: past it, LimitExceeded and the call is ended); MAX_MESSAGE_BYTES of
media per message the caller writes (a burst goes out as several messages).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from castmesh.proto.v1.dispatch_pb2 import LeaseReply, LeaseRequest
from castmesh.proto.v1.media_pb2 import FrameBatch, StreamHeader
from castmesh.proto.v1.relay_pb2 import (
    PublishAccepted,
    PublishEnd,
    PublishEnded,
    PublishItem,
    PublishOpen,
    PublishRejected,
    PublishReply,
    PublishRequest,
    PublishResponse,
    StreamEnd,
    SubscribeClose,
    SubscribeEvent,
    SubscribeItem,
    SubscribeOpen,
    SubscribeRequest,
    SubscribeResponse,
)

MAX_CHANNELS = 10_000  # per call: a node carries thousands of streams, not millions
MAX_PENDING = 2 * MAX_CHANNELS  # answers and notes waiting to be written, on one relay call
MAX_MESSAGE_BYTES = 8 << 20  # media per message, well under grpcutil.MAX_MESSAGE


class ProtocolError(Exception):
    """Something the protocol does not allow: from the owner, a bug; from the peer, a broken call."""


class LimitExceeded(ProtocolError):
    """A limit above was reached: the call is to be ended (the peer reads nothing, or opens without end)."""


class State(Enum):
    OPENING = "opening"  # open sent (caller) or received (relay), not answered yet
    OPEN = "open"  # accepted (publish) or started (subscribe)
    CLOSING = "closing"  # the caller sent end (publish) or close (subscribe); its answer is not in yet
    DONE = "done"  # over: no more events for it


OPENING, OPEN, CLOSING, DONE = State.OPENING, State.OPEN, State.CLOSING, State.DONE

# (state, what happens) -> next state; None is "no such channel". What is missing is not allowed.
# Sent by the caller ("send ...") or received from the relay ("recv ...").
PUBLISH_CALLER: dict[tuple[State | None, str], State] = {
    (None, "send open"): OPENING,
    (OPENING, "recv accepted"): OPEN,
    (OPENING, "recv rejected"): DONE,
    (OPEN, "send batch"): OPEN,
    (OPENING, "send end"): CLOSING,  # given up before the answer: the relay answers the open, then the end
    (OPEN, "send end"): CLOSING,
    (CLOSING, "recv accepted"): CLOSING,
    (CLOSING, "recv rejected"): CLOSING,
    (CLOSING, "recv ended"): DONE,
}
# Received from the caller ("recv ...") or decided by the relay ("send ...").
PUBLISH_RELAY: dict[tuple[State | None, str], State | None] = {
    (None, "recv open"): OPENING,
    (OPENING, "send accepted"): OPEN,
    (OPENING, "send rejected"): None,
    (OPEN, "recv batch"): OPEN,
    (OPEN, "recv end"): None,  # answered "ended"
    (OPENING, "recv end"): None,
    (None, "recv end"): None,  # an end for a channel it does not have is answered "ended" too
}
SUBSCRIBE_CALLER: dict[tuple[State | None, str], State] = {
    (None, "send open"): OPENING,
    (OPENING, "recv header"): OPEN,
    (OPENING, "recv end"): DONE,
    (OPEN, "recv header"): OPEN,
    (OPEN, "recv batch"): OPEN,
    (OPEN, "recv end"): DONE,
    (OPENING, "send close"): CLOSING,
    (OPEN, "send close"): CLOSING,
    (CLOSING, "recv header"): CLOSING,  # sent before the relay read the close: dropped
    (CLOSING, "recv batch"): CLOSING,
    (CLOSING, "recv end"): DONE,
}
SUBSCRIBE_RELAY: dict[tuple[State | None, str], State | None] = {
    (None, "recv open"): OPENING,
    (OPENING, "send end"): None,  # refused (no such stream)
    (OPENING, "send started"): OPEN,
    (OPEN, "send media"): OPEN,
    (OPEN, "send end"): None,
    (OPEN, "recv close"): None,  # answered with an end (closed)
}


_RECV = {body: f"recv {body}" for body in ("accepted", "rejected", "ended", "header", "batch", "end")}


def _next(table: dict[tuple[State | None, str], Any], state: State | None, what: str, channel: int) -> Any:
    try:
        return table[(state, what)]
    except KeyError:
        raise ProtocolError(f"channel {channel}: {what} when {state.value if state else 'not open'}") from None


@dataclass(slots=True)
class ChannelEvent:
    """Something that happened to one channel; `owner` is what its owner attached to it (None before)."""

    channel: int
    owner: Any


# Events a caller's side yields: answers and media for its channels, and their loss.
@dataclass(slots=True)
class Accepted(ChannelEvent):
    pass


@dataclass(slots=True)
class Rejected(ChannelEvent):
    reason: PublishRejected.Reason
    detail: str


@dataclass(slots=True)
class Ended(ChannelEvent):
    """The relay processed the publish's end: the stream is free for another publisher."""


@dataclass(slots=True)
class Header(ChannelEvent):
    header: StreamHeader


@dataclass(slots=True)
class Batch(ChannelEvent):
    batch: FrameBatch


@dataclass(slots=True)
class End(ChannelEvent):
    end: StreamEnd


@dataclass(slots=True)
class Lost(ChannelEvent):
    """The call broke under the channel."""

    why: str


# Events the relay's side yields.
@dataclass(slots=True)
class PublishOpened(ChannelEvent):
    """Decide with accept() or reject() before taking the next event."""

    open: PublishOpen


@dataclass(slots=True)
class Frames(ChannelEvent):
    batch: FrameBatch


@dataclass(slots=True)
class Unpublished(ChannelEvent):
    """The caller ended the publish (clean: the publisher unpublished); "ended" is answered already."""

    clean: bool


@dataclass(slots=True)
class SubscribeOpened(ChannelEvent):
    """Decide with start() or refuse() before taking the next event."""

    open: SubscribeOpen


@dataclass(slots=True)
class Closed(ChannelEvent):
    """The caller closed a subscription; its end (closed) is answered already."""


@dataclass(slots=True)
class Vanished(ChannelEvent):
    """The call broke under an open channel (its publisher or subscriber is gone without an end)."""


FINAL = (Rejected, Ended, End, Lost)  # the last event a caller's channel gets


@dataclass(slots=True)
class Channel:
    number: int
    state: State
    owner: Any = None


class _Message:
    __slots__ = ("items", "number", "size")

    def __init__(self, number: int) -> None:
        self.number = number
        self.items: list[Any] = []
        self.size = 0  # media bytes


class _Outbox:
    """The caller's items not yet written, gathered into numbered messages of at most MAX_MESSAGE_BYTES of
    media: whatever is sent while a write is in flight goes out together in the next message."""

    def __init__(self) -> None:
        self.messages: deque[_Message] = deque()
        self.numbers = itertools.count(1)

    def add(self, item: Any, size: int) -> int:
        """Queue `item`; the number of the message it will go out in."""
        last = self.messages[-1] if self.messages else None
        if last is None or (last.items and last.size + size > MAX_MESSAGE_BYTES):
            last = _Message(next(self.numbers))
            self.messages.append(last)
        last.items.append(item)
        last.size += size
        return last.number

    def take(self) -> tuple[int, list[Any]] | None:
        if not self.messages:
            return None
        message = self.messages.popleft()
        return message.number, message.items


class _Caller:
    """What both callers share: channels by number, the outbox, and the call's loss."""

    table: dict[tuple[State | None, str], State]

    def __init__(self) -> None:
        self.channels: dict[int, Channel] = {}
        self.numbers = itertools.count(1)
        self.outbox = _Outbox()
        self.lost = ""

    def _open(self, owner: Any) -> int:
        if self.lost:
            raise ProtocolError(f"the call is lost: {self.lost}")
        if len(self.channels) >= MAX_CHANNELS:
            raise LimitExceeded(f"more than {MAX_CHANNELS} channels on one call")
        number = next(self.numbers)
        self.channels[number] = Channel(number, _next(self.table, None, "send open", number), owner)
        return number

    def _move(self, number: int, what: str) -> Channel:
        channel = self.channels.get(number)
        if channel is None:
            raise ProtocolError(f"channel {number}: {what} when not open")
        channel.state = _next(self.table, channel.state, what, number)
        if channel.state is DONE:
            del self.channels[number]
        return channel

    def state(self, number: int) -> State:
        channel = self.channels.get(number)
        return channel.state if channel is not None else DONE

    def data_to_send(self) -> tuple[int, Any] | None:
        """The next message to write and its number, or None if nothing waits."""
        taken = None if self.lost else self.outbox.take()
        return None if taken is None else (taken[0], self.message(taken[1]))

    @staticmethod
    def message(items: list[Any]) -> Any:
        raise NotImplementedError

    def forget(self, number: int) -> None:
        """The owner stops listening: events for the channel are dropped from now on."""
        channel = self.channels.get(number)
        if channel is not None:
            channel.owner = None

    def broken(self, why: str) -> list[Lost]:
        """The call is gone: every open channel is lost, nothing more is sent."""
        if self.lost:
            return []
        self.lost = why
        lost = [Lost(c.number, c.owner, why) for c in self.channels.values()]
        self.channels.clear()
        self.outbox.messages.clear()
        return lost


class PublishClient(_Caller):
    """The caller's side of one Relay.Publish call (an ingest)."""

    table = PUBLISH_CALLER

    def open(self, opening: PublishOpen, owner: Any = None) -> tuple[int, int]:
        """Open a channel; (its number, the message number the open goes out in)."""
        number = self._open(owner)
        return number, self.outbox.add(PublishItem(channel=number, open=opening), 0)

    def batch(self, number: int, batch: FrameBatch, size: int) -> int:
        """Send frames (about `size` bytes of media); the message number they go out in."""
        channel = self.channels.get(number)
        if channel is None or channel.state is not OPEN:  # (OPEN, "send batch") -> OPEN, the one way to send
            self._move(number, "send batch")  # raises
        return self.outbox.add(PublishItem(channel=number, batch=batch), size)

    def end(self, number: int, clean: bool) -> int:
        self._move(number, "send end")
        return self.outbox.add(PublishItem(channel=number, end=PublishEnd(clean=clean)), 0)

    def abandon(self, number: int) -> None:
        """Give up on a channel: it is ended (not cleanly) if the relay may hold it, and nothing more of it is
        heard."""
        if self.state(number) in (OPENING, OPEN) and not self.lost:
            self.end(number, clean=False)
        self.forget(number)

    @staticmethod
    def message(items: list[PublishItem]) -> PublishRequest:
        return PublishRequest(items=items)

    def receive(self, response: PublishResponse) -> Iterator[Accepted | Rejected | Ended]:
        for reply in response.replies:
            body = reply.WhichOneof("body")
            channel = self._move(reply.channel, _RECV.get(body, f"recv {body}"))
            if channel.owner is None:
                continue
            if body == "accepted":
                yield Accepted(reply.channel, channel.owner)
            elif body == "rejected":
                yield Rejected(reply.channel, channel.owner, reply.rejected.reason, reply.rejected.detail)
            else:
                yield Ended(reply.channel, channel.owner)


class SubscribeClient(_Caller):
    """The caller's side of one Relay.Subscribe call (an edge or a playback node)."""

    table = SUBSCRIBE_CALLER

    def open(self, opening: SubscribeOpen, owner: Any = None) -> tuple[int, int]:
        number = self._open(owner)
        return number, self.outbox.add(SubscribeItem(channel=number, open=opening), 0)

    def close(self, number: int) -> None:
        """Stop a subscription: the relay answers with an end (the channel's last event), and what comes
        before it is dropped."""
        if self.state(number) in (OPENING, OPEN) and not self.lost:
            self._move(number, "send close")
            self.outbox.add(SubscribeItem(channel=number, close=SubscribeClose()), 0)

    @staticmethod
    def message(items: list[SubscribeItem]) -> SubscribeRequest:
        return SubscribeRequest(items=items)

    def receive(self, response: SubscribeResponse) -> Iterator[Header | Batch | End]:
        channels = self.channels
        for ev in response.events:
            body = ev.WhichOneof("body")
            channel = channels.get(ev.channel)
            if body == "batch" and channel is not None and channel.state is OPEN:
                # (OPEN, "recv batch") -> OPEN: most of what arrives, so not looked up in the table
                if channel.owner is not None:
                    yield Batch(ev.channel, channel.owner, ev.batch)
                continue
            channel = self._move(ev.channel, _RECV.get(body, f"recv {body}"))
            if channel.owner is None or (channel.state is CLOSING and body != "end"):
                continue
            if body == "batch":
                yield Batch(ev.channel, channel.owner, ev.batch)
            elif body == "header":
                yield Header(ev.channel, channel.owner, ev.header)
            else:
                yield End(ev.channel, channel.owner, ev.end)


class _Relay:
    """What both of the relay's sides share: channels by number and the answers waiting to be written."""

    table: dict[tuple[State | None, str], State | None]

    def __init__(self) -> None:
        self.channels: dict[int, Channel] = {}
        self.pending = 0  # answers waiting in the current message
        self.ignored = 0  # items for channels that cannot take them (dropped, per STYLE: counted)

    def _move(self, number: int, what: str, owner: Any = None) -> Channel:
        channel = self.channels.get(number)
        state = _next(self.table, channel.state if channel else None, what, number)
        if state is None:
            self.channels.pop(number, None)
            return channel or Channel(number, DONE)
        if channel is None:
            channel = self.channels[number] = Channel(number, state)
        channel.state = state
        if owner is not None:
            channel.owner = owner
        return channel

    def _answer(self) -> None:
        if self.pending >= MAX_PENDING:
            raise LimitExceeded(f"{self.pending} answers unread by the peer")
        self.pending += 1

    def _bad_open(self, number: int) -> str:
        """Why an open for `number` cannot be taken, or ''."""
        if number in self.channels:
            return f"channel {number} is already open"
        if len(self.channels) >= MAX_CHANNELS:
            return f"more than {MAX_CHANNELS} streams on one call"
        return ""

    def broken(self) -> list[Vanished]:
        """The call is over: every channel the relay had open lost its peer."""
        vanished = [Vanished(c.number, c.owner) for c in self.channels.values() if c.state is OPEN]
        self.channels.clear()
        return vanished


class PublishServer(_Relay):
    """The relay's side of one Relay.Publish call."""

    table = PUBLISH_RELAY

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[PublishReply] = []

    def receive(self, request: PublishRequest) -> Iterator[PublishOpened | Frames | Unpublished]:
        for item in request.items:
            body = item.WhichOneof("body")
            if body == "open":
                if why := self._bad_open(item.channel):
                    self._reply(PublishReply(channel=item.channel, rejected=PublishRejected(
                        reason=PublishRejected.REASON_BAD_REQUEST, detail=why)))
                    continue
                self._move(item.channel, "recv open")
                yield PublishOpened(item.channel, None, item.open)
                if self.channels.get(item.channel, Channel(0, DONE)).state is OPENING:
                    raise ProtocolError(f"channel {item.channel}: no decision on its open")
            elif body == "batch":
                channel = self.channels.get(item.channel)
                if channel is None or channel.state is not OPEN:
                    self.ignored += 1  # never opened, or refused: the caller did not wait for the answer
                    continue
                yield Frames(item.channel, channel.owner, item.batch)
            elif body == "end":
                # The answer first: past MAX_PENDING it raises with the channel still open, so the call's
                # end (broken()) still finds the publish, which then waits in grace like any vanished one.
                self._reply(PublishReply(channel=item.channel, ended=PublishEnded()))
                channel = self._move(item.channel, "recv end")
                if channel.state is OPEN:
                    yield Unpublished(item.channel, channel.owner, item.end.clean)

    def accept(self, number: int, owner: Any) -> None:
        self._move(number, "send accepted", owner)  # owned before the answer, which may raise: broken() finds it
        self._reply(PublishReply(channel=number, accepted=PublishAccepted()))

    def reject(self, number: int, reason: PublishRejected.Reason, detail: str) -> None:
        self._move(number, "send rejected")
        self._reply(PublishReply(channel=number, rejected=PublishRejected(reason=reason, detail=detail)))

    def _reply(self, reply: PublishReply) -> None:
        self._answer()
        self.replies.append(reply)

    def data_to_send(self) -> PublishResponse | None:
        if not self.replies:
            return None
        replies, self.replies, self.pending = self.replies, [], 0
        return PublishResponse(replies=replies)


class SubscribeServer(_Relay):
    """The relay's side of one Relay.Subscribe call. Ends for opens it refuses and for closes are kept as
    notes; the media of started channels is the owner's (its subscribers' queues), written into a response
    with `write`."""

    table = SUBSCRIBE_RELAY

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[SubscribeEvent] = []

    def receive(self, request: SubscribeRequest) -> Iterator[SubscribeOpened | Closed]:
        for item in request.items:
            body = item.WhichOneof("body")
            if body == "open":
                if why := self._bad_open(item.channel):
                    self._note(item.channel, StreamEnd(reason=StreamEnd.REASON_BAD_REQUEST, detail=why))
                    continue
                self._move(item.channel, "recv open")
                yield SubscribeOpened(item.channel, None, item.open)
                if self.channels.get(item.channel, Channel(0, DONE)).state is OPENING:
                    raise ProtocolError(f"channel {item.channel}: no decision on its open")
            elif body == "close":
                channel = self.channels.get(item.channel)
                if channel is None or channel.state is not OPEN:
                    self.ignored += 1  # already ended: the end crossed the close
                    continue
                self._note(item.channel, StreamEnd(reason=StreamEnd.REASON_CLOSED, detail="closed by the subscriber"))
                self._move(item.channel, "recv close")  # after the note: see PublishServer's end
                yield Closed(item.channel, channel.owner)

    def start(self, number: int, owner: Any) -> None:
        self._move(number, "send started", owner)

    def refuse(self, number: int, end: StreamEnd) -> None:
        self._move(number, "send end")
        self._note(number, end)

    def _note(self, number: int, end: StreamEnd) -> None:
        self._answer()
        self.notes.append(SubscribeEvent(channel=number, end=end))

    def has_notes(self) -> bool:
        return bool(self.notes)

    def response(self) -> SubscribeResponse:
        """A new response, with the notes waiting."""
        response = SubscribeResponse(events=self.notes)
        self.notes, self.pending = [], 0
        return response

    def write(self, response: SubscribeResponse, number: int, items: Sequence[StreamHeader | FrameBatch],
              end: StreamEnd | None) -> int:
        """Add a started channel's headers and frames (consecutive batches merged) and its end, if it has
        one (then the channel is over); the number of frames added."""
        channel = self.channels.get(number)
        if items and (channel is None or channel.state is not OPEN):
            self._move(number, "send media")  # raises: (OPEN, "send media") -> OPEN is the one way
        frames = 0
        batch = None
        for item in items:
            if isinstance(item, StreamHeader):
                response.events.add(channel=number).header.CopyFrom(item)
                batch = None
            else:
                if batch is None:
                    batch = response.events.add(channel=number).batch
                batch.MergeFrom(item)
                frames += len(item.frames)
        if end is not None:
            self._move(number, "send end")
            response.events.add(channel=number).end.CopyFrom(end)
        return frames


class LeaseClient:
    """Ingest's side of one Dispatch.Lease call: one question (a claim or a relocate) at a time, each
    answered granted or rejected. A reply nobody asked for is a ProtocolError."""

    def __init__(self) -> None:
        self.asking: LeaseRequest | None = None
        self.lost = ""

    def ask(self, request: LeaseRequest) -> LeaseRequest:
        """The message to write for `request`."""
        if self.lost:
            raise ProtocolError(f"the lease call is lost: {self.lost}")
        if self.asking is not None:
            raise ProtocolError("a lease question is still unanswered")
        self.asking = request
        return request

    def receive(self, reply: LeaseReply) -> LeaseReply:
        if self.asking is None:
            raise ProtocolError("a lease reply nobody asked for")
        if reply.WhichOneof("body") is None:
            raise ProtocolError("a lease reply with neither grant nor rejection")
        self.asking = None
        return reply

    def broken(self, why: str) -> bool:
        """The call ended; True if a question was waiting for its answer."""
        self.lost = self.lost or why
        waiting, self.asking = self.asking is not None, None
        return waiting
