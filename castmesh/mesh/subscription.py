"""Following a stream from upstream across failures: the loop shared by edge relays and playback nodes.

`locate(key, avoid)` names the relay to pull from (dispatch, or a fixed address). The subscription
subscribes there; if that relay fails it locates again, avoiding it, and re-subscribes. Continuity drops
what a new upstream's GOP cache repeats within the same publish session and waits for a keyframe when
the session changes, so consumers see one unbroken stream.

It ends (run() returns the StreamEnd) when the publisher unpublished, when nobody has the stream at the first
attempt (NOT_FOUND, so a viewer gets its 404 at once; unless dispatch says it is PENDING: an on-demand pull
being started for this very viewer, waited for within the retry window), or when no upstream has had it for
`retry_for` seconds (UPSTREAM_LOST, never UNPUBLISHED: an edge passes it on, and whoever follows the edge
looks elsewhere). That window counts from the loss, not from the stream's start or its last header, and is
given back once new frames flow (castmesh.mesh.retry). A relay that failed, or said it lost the stream, is
avoided for a few seconds, so one restarted on the same address is used again.

Traced as a span named `span_name` (a child of whatever span is current when it is made: the viewer or
subscription that started it), linked to the publisher's session once a header names it, with failovers
as events. Each upstream it follows is a `relay.subscribe` client span, ended at the first frames, whose
trace context goes upstream in the SubscribeOpen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from opentelemetry.trace import SpanKind

from castmesh.media.frames import detached, stream_path
from castmesh.media.timeline import Continuity
from castmesh.mesh import tracing
from castmesh.mesh.channels import Batch, End, Header
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.metrics import FAILOVERS
from castmesh.mesh.retry import Clock, RecentFailures, RetryWindow
from castmesh.mesh.tracing import SessionSpan
from castmesh.proto.v1.dispatch_pb2 import LocateRequest
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader, StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd, SubscribeOpen

log = logging.getLogger("castmesh.subscription")

Locate = Callable[[StreamKey, set[str]], Awaitable[str | None]]
PENDING = ""  # what a Locate answers for a stream not published yet but being started: ask again

RETRY_EVERY = 0.1
PENDING_EVERY = 0.25  # seconds between asking again for a stream being started
AVOID_FOR = 3.0  # seconds a relay that failed is passed over when locating
# Ends that mean "not from here", not "the stream is over": look elsewhere.
LOOK_ELSEWHERE = (StreamEnd.REASON_SHUTDOWN, StreamEnd.REASON_UPSTREAM_LOST)


def fixed_upstream(address: str) -> Locate:
    """Always the same relay (a single-relay setup, or a chain of edges configured by hand)."""

    async def locate(key: StreamKey, avoid: set[str]) -> str | None:
        return address

    return locate


def dispatch_upstream(dispatch: DispatchStub, zone: str = "", origin_only: bool = False) -> Locate:
    """Ask dispatch: the zone's edge for this stream if there is one, else its origin. One node's
    subscriptions share it: an unreachable dispatch is logged once until it answers again, not once per
    subscription every RETRY_EVERY."""
    failing = False

    async def locate(key: StreamKey, avoid: set[str]) -> str | None:
        nonlocal failing
        try:
            reply = await dispatch.Locate(LocateRequest(stream=key, zone=zone, avoid=sorted(avoid),
                                                        origin_only=origin_only), timeout=2)
        except grpc.aio.AioRpcError as exc:
            if not failing:
                event(log, "locate.failed", level=logging.WARNING, error=exc.code().name)
            failing = True
            return None
        if failing:
            event(log, "locate.recovered")
            failing = False
        if not reply.found:
            return PENDING if reply.pending else None
        return next((a for a in (reply.edge, reply.origin) if a and a not in avoid), None)

    return locate


class UpstreamSubscription:
    def __init__(self, key: StreamKey, locate: Locate, links: RelayLinks, subscriber_id: str,
                 on_header: Callable[[StreamHeader, bool], None], on_frames: Callable[[list[Frame]], None],
                 retry_for: float = 10.0, span_name: str = "upstream.follow", clock: Clock = time.monotonic) -> None:
        self.key = key
        self.path = stream_path(key)
        self.locate = locate
        self.links = links
        self.subscriber_id = subscriber_id
        self.on_header = on_header
        self.on_frames = on_frames
        self.window = RetryWindow(retry_for, clock)
        self.avoid = RecentFailures(AVOID_FOR, clock)
        self.continuity = Continuity()
        self.switches = 0
        self.live = False  # has had the stream from some upstream
        self.trace = SessionSpan(span_name, {"castmesh.stream": self.path, "castmesh.subscriber": subscriber_id},
                                 kind=SpanKind.INTERNAL, every=0)

    async def run(self) -> StreamEnd:
        end = StreamEnd(reason=StreamEnd.REASON_SHUTDOWN, detail="cancelled")
        try:
            with tracing.current(self.trace.span):  # locating calls are part of it
                end = await self._run()
            return end
        finally:
            self.trace.end(end.detail or StreamEnd.Reason.Name(end.reason), switches=self.switches,
                           repeats_dropped=self.continuity.dropped)

    async def _run(self) -> StreamEnd:
        self.window.lose()  # nothing yet: the first attempts are retries too
        while not self.window.expired():
            address = await self.locate(self.key, self.avoid.current())
            if address == PENDING:  # being started (an on-demand pull): within the window, as any retry
                await asyncio.sleep(PENDING_EVERY)
                continue
            if address is None:
                if not self.live:
                    return StreamEnd(reason=StreamEnd.REASON_NOT_FOUND, detail="nobody is publishing this stream")
                await asyncio.sleep(RETRY_EVERY)
                continue
            outcome = await self._follow(address)
            self.window.lose()
            if outcome is None or outcome.reason in LOOK_ELSEWHERE:
                self.avoid.add(address)  # that relay failed, is going away, or lost the stream itself
                self.switches += 1
                FAILOVERS.labels("upstream").inc()
                self.trace.event("failover", failed=address)
            elif outcome.reason == StreamEnd.REASON_NOT_FOUND:
                if not self.live:
                    return outcome
                self.avoid.add(address)  # mid-failover: this relay does not have the stream (yet)
            elif outcome.reason != StreamEnd.REASON_TOO_SLOW:
                return outcome  # the publisher unpublished
            await asyncio.sleep(RETRY_EVERY)
        return StreamEnd(reason=StreamEnd.REASON_UPSTREAM_LOST,
                         detail=f"no upstream had it for {self.window.span:g}s")

    def _flowing(self) -> None:
        """New frames came: whatever failed before is behind us."""
        if self.window.losing:
            self.window.recover()
            self.avoid.clear()

    async def _follow(self, address: str) -> StreamEnd | None:
        """Subscribe to one upstream; its end message, or None if the upstream failed."""
        ended: list[StreamEnd] = []
        with tracing.current(self.trace.span):
            setup = tracing.start("relay.subscribe", {"castmesh.stream": self.path, "castmesh.upstream": address},
                                  kind=SpanKind.CLIENT)

        def set_up(outcome: str) -> None:
            nonlocal setup
            setup = tracing.set_up(setup, outcome)

        def on_event(ev: Header | Batch | End) -> None:
            if isinstance(ev, Batch):
                frames = self.continuity.admit(list(detached(ev.batch).frames))
                if frames:
                    self._flowing()
                    self.on_frames(frames)
                set_up("first frames")
            elif isinstance(ev, Header):
                header = ev.header
                new_timeline = self.continuity.on_header(header.session_id, header.has_video)
                self.live = True
                self.trace.link(header.publisher_trace, "publisher")
                self.on_header(header, new_timeline)
                event(log, "upstream.header", stream=self.path, upstream=address, session=header.session_id,
                      new_timeline=new_timeline)
            else:
                ended.append(ev.end)

        with tracing.current(setup):  # the link's call, if this opens it, is a child too
            channel = self.links.subscribe(address).open(SubscribeOpen(
                stream=self.key, start=SubscribeOpen.START_GOP_CACHE, subscriber_id=self.subscriber_id,
                trace_context=tracing.carrier(setup)), on_event)
        try:
            await channel.done.wait()
        finally:
            channel.close()  # if cancelled: the relay is told
            set_up(channel.lost or (StreamEnd.Reason.Name(ended[0].reason) if ended else "cancelled"))
        if channel.lost:
            event(log, "upstream.lost", level=logging.WARNING, stream=self.path, upstream=address, error=channel.lost)
            return None
        return ended[0] if ended else None
