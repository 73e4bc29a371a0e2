"""The Relay gRPC service: Relay.Publish feeds streams, Relay.Subscribe reads them, Relay.Stats reports.
Each call carries many streams, one per channel (services.relay.calls holds a call's channels).

An origin accepts publishes. An edge accepts none: on the first subscription to a stream it starts one
UpstreamPull, and every later subscriber shares it.

Both streaming handlers are async generators (grpc's route_guide style); the OpenTelemetry server
interceptor breaks handlers that call `await context.write()` (opentelemetry-python-contrib #3066). They
make their call's span themselves and end it at their first response (castmesh.mesh.tracing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from castmesh.mesh import grpcutil, tracing
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.proto.v1 import relay_pb2_grpc
from castmesh.proto.v1.relay_pb2 import (
    PublishRequest,
    PublishResponse,
    StatsReply,
    StatsRequest,
    StreamEnd,
    SubscribeOpen,
    SubscribeRequest,
    SubscribeResponse,
)
from services.relay.calls import PublishCall, SubscribeCall
from services.relay.fanout import RelayStream, StreamTable, Subscriber
from services.relay.upstream import Locate, UpstreamPull

log = logging.getLogger("castmesh.relay")

PULL_LINGER = 5.0


class RelayService(relay_pb2_grpc.RelayServicer):
    def __init__(self, max_lag: float = 3.0, grace: float = 10.0, role: str = "origin",
                 locate: Locate | None = None, node_id: str = "relay") -> None:
        self.table = StreamTable(grace=grace)
        self.max_lag = max_lag
        self.role = role
        self.locate = locate
        self.node_id = node_id
        self.links = RelayLinks()
        self.pulls: dict[str, UpstreamPull] = {}
        self.lingers: dict[str, asyncio.TimerHandle] = {}  # pulls with no subscriber left, by stream path

    async def Publish(
        self, request_iterator: AsyncIterator[PublishRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[PublishResponse]:
        call = PublishCall(self)
        span = tracing.media_call_served("/castmesh.v1.Relay/Publish", context)
        reader = asyncio.get_running_loop().create_task(call.read(request_iterator))
        try:
            while (response := await call.next_response()) is not None:
                span = tracing.set_up(span)
                yield response
        finally:
            tracing.set_up(span, "ended before any response")
            reader.cancel()
            call.vanished()

    def unpublished(self, stream: RelayStream, session_id: str, clean: bool, reason: str) -> None:
        if stream.session_id != session_id:
            return  # a newer publish session already took the stream over
        end = StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED, detail=reason)
        if clean:
            self.table.release(stream, end)
            event(log, "publish.stop", stream=stream.path, session=session_id, reason=reason)
            return

        def expire() -> None:
            if not stream.publishing and stream.session_id == session_id:
                self.table.release(stream, StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED,
                                                     detail=f"{reason}; no publisher came back"))
                event(log, "publish.expired", stream=stream.path, session=session_id)

        self.table.hold(stream, expire)
        event(log, "publish.lost", stream=stream.path, session=session_id, reason=reason,
              grace_s=self.table.grace, subscribers=len(stream.subscribers))

    async def Subscribe(
        self, request_iterator: AsyncIterator[SubscribeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[SubscribeResponse]:
        call = SubscribeCall(self)
        span = tracing.media_call_served("/castmesh.v1.Relay/Subscribe", context)
        reader = asyncio.get_running_loop().create_task(call.read(request_iterator))
        try:
            while (response := await call.next_response()) is not None:
                span = tracing.set_up(span)
                call.writing_since = time.monotonic()
                yield response
                call.writing_since = 0.0
        finally:
            tracing.set_up(span, "ended before any response")
            reader.cancel()
            call.close_all()

    def subscribe(self, opening: SubscribeOpen, sub: Subscriber) -> RelayStream | StreamEnd:
        """Attach `sub` to the stream `opening` names (pulling it from upstream on an edge); the end to send
        instead if there is no such stream."""
        if not opening.stream.name:
            return StreamEnd(reason=StreamEnd.REASON_BAD_REQUEST, detail="open named no stream")
        stream = self.table.get(opening.stream)
        if stream is None and self.locate is not None:
            stream = self._pull(opening)
        if stream is None:
            return StreamEnd(reason=StreamEnd.REASON_NOT_FOUND, detail="nobody is publishing this stream")
        stream.subscribe(sub, from_gop=opening.start != SubscribeOpen.START_LIVE)
        event(log, "subscribe.start", stream=stream.path, subscriber=sub.id)
        return stream

    def unsubscribe(self, stream: RelayStream, sub: Subscriber, outcome: str) -> None:
        stream.unsubscribe(sub)
        if stream.pulled and not stream.subscribers:  # PULL_LINGER from the last subscriber's leaving
            if (old := self.lingers.pop(stream.path, None)) is not None:
                old.cancel()
            self.lingers[stream.path] = asyncio.get_running_loop().call_later(PULL_LINGER, self._maybe_stop_pull,
                                                                              stream)
        event(log, "subscribe.stop", stream=stream.path, subscriber=sub.id, outcome=outcome, skips=sub.skips)

    def _pull(self, opening: SubscribeOpen) -> RelayStream:
        assert self.locate is not None
        stream = self.table.add_pulled(opening.stream)
        pull = self.pulls[stream.path] = UpstreamPull(self.table, stream, self.locate, self.links,
                                                      subscriber_id=self.node_id)
        pull.task.add_done_callback(lambda _: self._forget_pull(pull))
        return stream

    def _forget_pull(self, pull: UpstreamPull) -> None:
        # Only this pull: a newer one for the same stream may have started since this one's stream ended.
        if self.pulls.get(pull.stream.path) is pull:
            del self.pulls[pull.stream.path]

    def _maybe_stop_pull(self, stream: RelayStream) -> None:
        self.lingers.pop(stream.path, None)
        pull = self.pulls.get(stream.path)
        if pull is not None and pull.stream is stream and not stream.subscribers:
            pull.task.cancel()

    async def Stats(self, request: StatsRequest, context: grpc.aio.ServicerContext) -> StatsReply:
        return StatsReply(role=self.role, streams=[s.stats() for s in self.table.streams.values()])


async def start(host: str, port: int, service: RelayService) -> tuple[grpc.aio.Server, int]:
    """Start a relay gRPC server for `service`; return it and the port it listens on."""
    server = grpcutil.server()
    relay_pb2_grpc.add_RelayServicer_to_server(service, server)
    health = grpcutil.add_health(server)
    bound = grpcutil.bind(server, host, port, "relay gRPC")
    await server.start()
    await grpcutil.mark_serving(health, "castmesh.v1.Relay")
    return server, bound
