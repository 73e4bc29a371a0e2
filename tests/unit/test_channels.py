"""The relay channel protocol with no gRPC: a caller's side and a relay's side wired back to back in
memory, driven through every order of what can happen to one channel (the owner's open, batch, end or
close; the relay's decision; each side reading; the call breaking), and the limits."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

import pytest

from castmesh.media.frames import VIDEO, make_frame, stream_key
from castmesh.mesh import channels
from castmesh.mesh.channels import (
    DONE,
    OPEN,
    OPENING,
    Accepted,
    Batch,
    Closed,
    End,
    Ended,
    Frames,
    Header,
    LeaseClient,
    LimitExceeded,
    Lost,
    ProtocolError,
    PublishClient,
    PublishOpened,
    PublishServer,
    Rejected,
    SubscribeClient,
    SubscribeOpened,
    SubscribeServer,
    Unpublished,
    Vanished,
)
from castmesh.proto.v1.dispatch_pb2 import LeaseReply, LeaseRequest
from castmesh.proto.v1.media_pb2 import FrameBatch, StreamHeader
from castmesh.proto.v1.relay_pb2 import (
    PublishItem,
    PublishOpen,
    PublishRejected,
    PublishRequest,
    PublishResponse,
    StreamEnd,
    SubscribeEvent,
    SubscribeItem,
    SubscribeOpen,
    SubscribeRequest,
    SubscribeResponse,
)

KEY = stream_key("live", "x")


def batch(ts: int = 0) -> FrameBatch:
    return FrameBatch(frames=[make_frame(VIDEO, ts, b"\x17\x01frame")])


class PublishPair:
    """An ingest's PublishClient and a relay's PublishServer, messages carried by hand."""

    def __init__(self, accept: bool) -> None:
        self.caller, self.relay = PublishClient(), PublishServer()
        self.accept = accept
        self.to_relay: deque[PublishRequest] = deque()
        self.to_caller: deque[PublishResponse] = deque()
        self.heard: list[Any] = []  # the caller's owner's events
        self.relay_events: list[Any] = []
        self.number = 0
        self.sent_batches = 0
        self.sent_end = False
        self.broken = False
        self.open_at_break = False

    def do(self, step: str) -> None:
        if self.broken and step not in ("break",):
            return  # after the break nothing moves; the owner's actions see a lost call
        if step == "open":
            self.number, _ = self.caller.open(PublishOpen(stream=KEY, session_id="s"), owner="ingest")
        elif step == "batch" and self.number and self.caller.state(self.number) is OPEN:
            self.caller.batch(self.number, batch(), 10)
            self.sent_batches += 1
        elif step == "end" and self.number and self.caller.state(self.number) in (OPENING, OPEN):
            self.caller.end(self.number, clean=True)
            self.sent_end = True
        elif step == "write":
            while (out := self.caller.data_to_send()) is not None:
                self.to_relay.append(out[1])
        elif step == "relay reads":
            while self.to_relay:
                for ev in self.relay.receive(self.to_relay.popleft()):
                    self.relay_events.append(ev)
                    if isinstance(ev, PublishOpened):
                        if self.accept:
                            self.relay.accept(ev.channel, owner="stream")
                        else:
                            self.relay.reject(ev.channel, PublishRejected.REASON_ALREADY_PUBLISHED, "taken")
            if (response := self.relay.data_to_send()) is not None:
                self.to_caller.append(response)
        elif step == "caller reads":
            while self.to_caller:
                self.heard += self.caller.receive(self.to_caller.popleft())
        elif step == "break" and not self.broken:
            self.broken = True
            self.open_at_break = bool(self.number) and self.caller.state(self.number) is not DONE
            self.heard += self.caller.broken("the call broke")
            self.relay_events += self.relay.broken()

    def settle(self) -> None:
        for step in ("write", "relay reads", "caller reads") * 2:
            self.do(step)


PUBLISH_STEPS = ["open", "batch", "end", "write", "relay reads", "caller reads", "break"]


def _orders(steps: list[str]) -> list[tuple[str, ...]]:
    """Every order of `steps` in which the channel is opened before the owner acts on it."""
    return [order for order in itertools.permutations(steps) if order.index("open") == 0
            or all(order.index("open") < order.index(s) for s in ("batch", "end", "close") if s in order)]


@pytest.mark.parametrize("accept", [True, False], ids=["accepted", "rejected"])
def test_every_order_of_a_publish_channel_ends_in_exactly_one_outcome_on_each_side(accept: bool) -> None:
    orders = _orders(PUBLISH_STEPS)
    assert len(orders) > 800
    for order in orders:
        pair = PublishPair(accept)
        for step in order:
            pair.do(step)  # a ProtocolError here fails the test: neither side broke the rules
        pair.settle()
        kinds = [type(ev) for ev in pair.heard]
        relay_kinds = [type(ev) for ev in pair.relay_events]
        opened = PublishOpened in relay_kinds
        # The caller hears its answer before anything else, and at most one loss, which comes last.
        assert kinds.count(Lost) <= 1 and (Lost not in kinds or kinds[-1] is Lost), (order, kinds)
        assert (Lost in kinds) == pair.open_at_break, (order, kinds)  # a channel the break caught hears it
        assert set(kinds) <= {Accepted, Rejected, Ended, Lost}, (order, kinds)
        if not pair.broken:
            answer = Accepted if accept else Rejected
            assert kinds == [answer, *([Ended] if pair.sent_end else [])], (order, kinds)
            assert pair.caller.state(pair.number) is (DONE if pair.sent_end or not accept else OPEN)
        # The relay: frames only after it accepted; the publish ends once, cleanly or by vanishing.
        if accept and opened:
            ends = relay_kinds.count(Unpublished) + relay_kinds.count(Vanished)
            assert ends == (1 if pair.broken or pair.sent_end else 0), (order, relay_kinds)
            frames = relay_kinds.count(Frames)
            assert frames <= pair.sent_batches
            if frames:
                assert relay_kinds.index(PublishOpened) < relay_kinds.index(Frames)
        else:
            assert Frames not in relay_kinds and Unpublished not in relay_kinds and Vanished not in relay_kinds
        # Nothing is left behind on either side once the channel is over.
        if pair.broken or pair.sent_end:
            assert pair.relay.channels == {} and pair.caller.channels == {}
        assert pair.relay.pending == 0 or pair.relay.replies


class SubscribePair:
    """A playback node's SubscribeClient and a relay's SubscribeServer."""

    def __init__(self, start: bool) -> None:
        self.caller, self.relay = SubscribeClient(), SubscribeServer()
        self.start = start
        self.to_relay: deque[SubscribeRequest] = deque()
        self.to_caller: deque[SubscribeResponse] = deque()
        self.heard: list[Any] = []
        self.relay_events: list[Any] = []
        self.number = 0
        self.started: int | None = None
        self.closed = False
        self.unpublished = False
        self.broken = False
        self.open_at_break = False
        self.heard_at_close = -1

    def do(self, step: str) -> None:
        if self.broken:
            return
        if step == "open":
            self.number, _ = self.caller.open(SubscribeOpen(stream=KEY), owner="viewer")
        elif step == "close" and self.number and self.caller.state(self.number) in (OPENING, OPEN):
            self.caller.close(self.number)
            self.closed = True
            self.heard_at_close = len(self.heard)
        elif step == "write":
            while (out := self.caller.data_to_send()) is not None:
                self.to_relay.append(out[1])
        elif step == "relay reads":
            while self.to_relay:
                for ev in self.relay.receive(self.to_relay.popleft()):
                    self.relay_events.append(ev)
                    if isinstance(ev, SubscribeOpened):
                        if self.start:
                            self.relay.start(ev.channel, owner="subscriber")
                            self.started = ev.channel
                        else:
                            self.relay.refuse(ev.channel, StreamEnd(reason=StreamEnd.REASON_NOT_FOUND))
                    elif isinstance(ev, Closed):
                        self.started = None
        elif step in ("media", "unpublish") and self.started is not None:
            response = self.relay.response()
            end = StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED) if step == "unpublish" else None
            self.relay.write(response, self.started, [StreamHeader(session_id="s"), batch(), batch(40)], end)
            if end is not None:
                self.started, self.unpublished = None, True
            self.to_caller.append(response)
        elif step == "relay writes" and self.relay.has_notes():
            self.to_caller.append(self.relay.response())
        elif step == "caller reads":
            while self.to_caller:
                self.heard += self.caller.receive(self.to_caller.popleft())
        elif step == "break":
            self.broken = True
            self.open_at_break = bool(self.number) and self.caller.state(self.number) is not DONE
            self.heard += self.caller.broken("the call broke")
            self.relay_events += self.relay.broken()

    def settle(self) -> None:
        for step in ("write", "relay reads", "relay writes", "caller reads") * 2:
            self.do(step)


SUBSCRIBE_STEPS = ["open", "close", "write", "relay reads", "media", "unpublish", "relay writes", "caller reads",
                   "break"]


@pytest.mark.parametrize("start", [True, False], ids=["started", "refused"])
def test_every_order_of_a_subscribe_channel_gives_the_caller_one_end_and_nothing_after_it(start: bool) -> None:
    orders = _orders(SUBSCRIBE_STEPS)
    assert len(orders) > 40_000
    for order in orders[::7]:  # a seventh of them (about 6,000 orders): every step still comes in every place
        pair = SubscribePair(start)
        for step in order:
            pair.do(step)
        pair.settle()
        kinds = [type(ev) for ev in pair.heard]
        finals = [k for k in kinds if k in (End, Lost)]
        assert len(finals) <= 1 and (not finals or kinds[-1] in (End, Lost)), (order, kinds)
        assert (Lost in kinds) == pair.open_at_break, (order, kinds)
        if pair.closed:  # after its close the owner hears nothing but the end
            assert {type(e) for e in pair.heard[pair.heard_at_close:]} <= {End, Lost}, (order, kinds)
        if Batch in kinds:  # a header always comes before frames
            assert kinds.index(Header) < kinds.index(Batch), (order, kinds)
        if not pair.broken:
            assert len(finals) == 1, (order, kinds)  # refused, closed or unpublished: the caller heard how
            end = pair.heard[-1].end.reason
            if not start:
                assert end == StreamEnd.REASON_NOT_FOUND and kinds == [End]
            elif pair.closed:
                # Closed: nothing after the close reached the owner but the end itself.
                assert end in (StreamEnd.REASON_CLOSED, StreamEnd.REASON_UNPUBLISHED)
            else:
                assert end == StreamEnd.REASON_UNPUBLISHED
            assert pair.caller.channels == {} and pair.relay.channels == {}
        relay_kinds = [type(ev) for ev in pair.relay_events]
        assert relay_kinds.count(Closed) + relay_kinds.count(Vanished) <= 1
        if not start:
            assert Closed not in relay_kinds and Vanished not in relay_kinds


def test_a_call_that_breaks_with_writes_in_flight_sends_nothing_more_and_tells_every_channel() -> None:
    caller = PublishClient()
    first, _ = caller.open(PublishOpen(stream=KEY), owner="a")
    second, _ = caller.open(PublishOpen(stream=stream_key("live", "y")), owner="b")
    in_flight = caller.data_to_send()  # taken by the writer, not yet written
    assert in_flight is not None and [i.channel for i in in_flight[1].items] == [first, second]
    assert [type(e) for e in caller.receive(PublishResponse(replies=[{"channel": first, "accepted": {}}]))] == [
        Accepted]  # type: ignore[list-item]
    waiting = caller.batch(first, batch(), 10)
    assert waiting > in_flight[0]  # it goes in the next message
    lost = caller.broken("UNAVAILABLE")
    assert sorted((ev.channel, ev.owner, ev.why) for ev in lost) == [(first, "a", "UNAVAILABLE"),
                                                                      (second, "b", "UNAVAILABLE")]
    assert caller.data_to_send() is None and caller.broken("again") == []
    with pytest.raises(ProtocolError):
        caller.batch(first, batch(), 10)
    with pytest.raises(ProtocolError):
        caller.open(PublishOpen(stream=KEY))


def test_the_owner_cannot_do_what_the_protocol_does_not_allow() -> None:
    caller = PublishClient()
    number, _ = caller.open(PublishOpen(stream=KEY), owner="o")
    with pytest.raises(ProtocolError, match="send batch when opening"):
        caller.batch(number, batch(), 10)  # before the relay accepted
    caller.end(number, clean=True)
    with pytest.raises(ProtocolError, match="send end when closing"):
        caller.end(number, clean=True)
    relay = PublishServer()
    with pytest.raises(ProtocolError):
        relay.accept(7, owner="x")  # no open for it
    events = relay.receive(PublishRequest(items=[PublishItem(channel=1, open=PublishOpen(stream=KEY)),
                                                 PublishItem(channel=1, batch=batch())]))
    assert isinstance(next(events), PublishOpened)
    with pytest.raises(ProtocolError, match="no decision"):
        next(events)  # the owner must accept or reject before the next item is looked at


def test_a_relay_that_breaks_the_protocol_breaks_the_callers_call() -> None:
    caller = SubscribeClient()
    number, _ = caller.open(SubscribeOpen(stream=KEY), owner="o")
    with pytest.raises(ProtocolError, match="recv batch when opening"):
        list(caller.receive(SubscribeResponse(events=[SubscribeEvent(channel=number, batch=batch())])))
    with pytest.raises(ProtocolError, match="channel 99"):
        list(PublishClient().receive(PublishResponse(replies=[{"channel": 99, "ended": {}}])))  # type: ignore[list-item]


def test_bad_opens_are_answered_per_channel_and_stray_items_are_dropped_and_counted() -> None:
    relay = PublishServer()
    events = []
    for ev in relay.receive(PublishRequest(items=[
        PublishItem(channel=1, open=PublishOpen(stream=KEY)),
        PublishItem(channel=1, open=PublishOpen(stream=KEY)),  # in use
        PublishItem(channel=9, batch=batch()),  # never opened
        PublishItem(channel=5, end={}),  # type: ignore[arg-type]  # never opened: answered "ended"
    ])):
        events.append(ev)
        if isinstance(ev, PublishOpened):
            relay.accept(ev.channel, owner="stream")
    assert [type(e) for e in events] == [PublishOpened]
    response = relay.data_to_send()
    assert response is not None
    assert [(r.channel, r.WhichOneof("body")) for r in response.replies] == [(1, "accepted"), (1, "rejected"),
                                                                           (5, "ended")]
    assert response.replies[1].rejected.reason == PublishRejected.REASON_BAD_REQUEST
    assert relay.ignored == 1 and relay.pending == 0
    sub = SubscribeServer()
    assert list(sub.receive(SubscribeRequest(items=[SubscribeItem(channel=3, close={})]))) == []  # type: ignore[arg-type]
    assert sub.ignored == 1 and not sub.has_notes()


@pytest.mark.parametrize("side", ["publish", "subscribe"])
def test_no_more_channels_than_the_limit_on_one_call(side: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "MAX_CHANNELS", 3)
    if side == "publish":
        relay = PublishServer()
        request = PublishRequest(items=[PublishItem(channel=n, open=PublishOpen(stream=KEY)) for n in range(1, 6)])
        for ev in relay.receive(request):
            relay.accept(ev.channel, owner=ev.channel)
        response = relay.data_to_send()
        assert response is not None
        assert [r.WhichOneof("body") for r in response.replies] == ["accepted"] * 3 + ["rejected"] * 2
        assert "more than 3" in response.replies[-1].rejected.detail
    else:
        sub = SubscribeServer()
        request = SubscribeRequest(items=[SubscribeItem(channel=n, open=SubscribeOpen(stream=KEY))
                                          for n in range(1, 6)])
        for opened in sub.receive(request):
            sub.start(opened.channel, owner=opened.channel)
        notes = sub.response()
        assert [(e.channel, e.end.reason) for e in notes.events] == [(4, StreamEnd.REASON_BAD_REQUEST),
                                                                     (5, StreamEnd.REASON_BAD_REQUEST)]
    caller = PublishClient()
    for _ in range(3):
        caller.open(PublishOpen(stream=KEY))
    with pytest.raises(LimitExceeded):
        caller.open(PublishOpen(stream=KEY))


@pytest.mark.parametrize("side", ["publish", "subscribe"])
def test_answers_a_peer_leaves_unread_stop_at_the_limit(side: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "MAX_PENDING", 50)
    relay: PublishServer | SubscribeServer = PublishServer() if side == "publish" else SubscribeServer()
    with pytest.raises(LimitExceeded, match="50 answers unread"):
        for n in range(1, 1000):
            if isinstance(relay, PublishServer):
                list(relay.receive(PublishRequest(items=[PublishItem(channel=n, end={})])))  # type: ignore[arg-type]
            else:
                for ev in relay.receive(SubscribeRequest(items=[SubscribeItem(channel=n, open=SubscribeOpen())])):
                    relay.refuse(ev.channel, StreamEnd(reason=StreamEnd.REASON_NOT_FOUND))
    pending = relay.replies if isinstance(relay, PublishServer) else relay.notes
    assert len(pending) == 50
    if isinstance(relay, PublishServer):
        assert relay.data_to_send() is not None and relay.pending == 0  # written: room again
    else:
        assert relay.response().events and relay.pending == 0


def test_a_burst_goes_out_as_several_messages_under_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "MAX_MESSAGE_BYTES", 1000)
    caller = PublishClient()
    number, _ = caller.open(PublishOpen(stream=KEY))
    list(caller.receive(PublishResponse(replies=[{"channel": number, "accepted": {}}])))  # type: ignore[list-item]
    numbers = [caller.batch(number, batch(i), 400) for i in range(5)]
    assert numbers == [1, 1, 2, 2, 3]  # two of 400 bytes fit in 1000 (the open has no media), a third does not
    sizes = []
    while (out := caller.data_to_send()) is not None:
        sizes.append(len(out[1].items))
    assert sizes == [3, 2, 1]


def test_subscribe_media_is_merged_per_channel_and_its_end_frees_the_number() -> None:
    relay = SubscribeServer()
    for ev in relay.receive(SubscribeRequest(items=[SubscribeItem(channel=4, open=SubscribeOpen(stream=KEY))])):
        relay.start(ev.channel, owner="sub")
    response = relay.response()
    frames = relay.write(response, 4, [StreamHeader(session_id="a"), batch(0), batch(40), StreamHeader(), batch(80)],
                         StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED))
    assert frames == 3
    assert [e.WhichOneof("body") for e in response.events] == ["header", "batch", "header", "batch", "end"]
    assert len(response.events[1].batch.frames) == 2
    assert relay.channels == {}
    with pytest.raises(ProtocolError):
        relay.write(relay.response(), 4, [batch(120)], None)  # over: nothing more may go out on it
    # The number is free again: a new open on it is a new subscription.
    reopened = relay.receive(SubscribeRequest(items=[SubscribeItem(channel=4, open=SubscribeOpen())]))
    assert isinstance(next(reopened), SubscribeOpened)


def test_a_lease_call_asks_one_question_at_a_time() -> None:
    lease = LeaseClient()
    claim = LeaseRequest(claim=LeaseRequest.Claim(stream=KEY, holder="ingest"))
    assert lease.ask(claim) is claim
    with pytest.raises(ProtocolError, match="still unanswered"):
        lease.ask(claim)
    granted = LeaseReply(granted=LeaseReply.Granted(origin="o:1"))
    assert lease.receive(granted) is granted
    with pytest.raises(ProtocolError, match="nobody asked"):
        lease.receive(granted)
    lease.ask(LeaseRequest(relocate=LeaseRequest.Relocate(failed_origin="o:1")))
    with pytest.raises(ProtocolError, match="neither"):
        lease.receive(LeaseReply())
    assert lease.broken("UNAVAILABLE") is True  # a question was waiting: its asker must hear it
    assert lease.broken("again") is False
    with pytest.raises(ProtocolError, match="lost"):
        lease.ask(claim)


@pytest.mark.parametrize("side", ["publish", "subscribe"])
def test_an_end_or_close_past_the_limit_leaves_the_channel_for_the_calls_end(side: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The call is being ended for its unread answers: the stream it published (or the subscriber it had)
    must still be let go by broken(), not forgotten with the answer that did not fit."""
    monkeypatch.setattr(channels, "MAX_PENDING", 2)
    if side == "publish":
        relay = PublishServer()
        for ev in relay.receive(PublishRequest(items=[PublishItem(channel=1, open=PublishOpen(stream=KEY))])):
            relay.accept(ev.channel, owner="stream")
        list(relay.receive(PublishRequest(items=[PublishItem(channel=9, end={})])))  # type: ignore[arg-type]
        with pytest.raises(LimitExceeded):
            list(relay.receive(PublishRequest(items=[PublishItem(channel=1, end={"clean": True})])))  # type: ignore[arg-type]
        assert [(v.channel, v.owner) for v in relay.broken()] == [(1, "stream")]
    else:
        sub = SubscribeServer()
        for opened in sub.receive(SubscribeRequest(items=[SubscribeItem(channel=1, open=SubscribeOpen(stream=KEY)),
                                                         SubscribeItem(channel=2, open=SubscribeOpen(stream=KEY))])):
            if opened.channel == 1:
                sub.start(opened.channel, owner="subscriber")
            else:
                sub.refuse(opened.channel, StreamEnd(reason=StreamEnd.REASON_NOT_FOUND))
        # One note waits (channel 2's end); a second open of channel 1 (in use) fills the cap.
        list(sub.receive(SubscribeRequest(items=[SubscribeItem(channel=1, open=SubscribeOpen())])))
        with pytest.raises(LimitExceeded):
            list(sub.receive(SubscribeRequest(items=[SubscribeItem(channel=1, close={})])))  # type: ignore[arg-type]
        assert [(v.channel, v.owner) for v in sub.broken()] == [(1, "subscriber")]
