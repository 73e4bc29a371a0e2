"""The Relay gRPC service: Relay.Publish feeds a stream, Relay.Subscribe reads one, Relay.Stats reports.

An origin accepts publishes. An edge accepts none: on the first Subscribe for a stream it starts one
UpstreamPull, and every later subscriber shares it.

Both streaming handlers are async generators (grpc's route_guide style); the OpenTelemetry server
interceptor breaks handlers that call `await context.write()` (opentelemetry-python-contrib #3066).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from castmesh.mesh import grpcutil
from castmesh.mesh.logs import event
from castmesh.proto.v1 import relay_pb2_grpc
from castmesh.proto.v1.media_pb2 import StreamHeader
from castmesh.proto.v1.relay_pb2 import (
    PublishAccepted,
    PublishRejected,
    PublishRequest,
    PublishResponse,
    StatsReply,
    StatsRequest,
    StreamEnd,
    SubscribeOpen,
    SubscribeRequest,
    SubscribeResponse,
)
from services.relay.fanout import RelayStream, StreamTable
from services.relay.upstream import Locate, UpstreamPull

log = logging.getLogger("castmesh.relay")

READY_TIMEOUT = 10.0
PULL_LINGER = 5.0


class RelayService(relay_pb2_grpc.RelayServicer):
    def __init__(self, max_lag: float = 3.0, grace: float = 10.0, role: str = "origin",
                 locate: Locate | None = None, node_id: str = "relay") -> None:
        self.table = StreamTable(grace=grace)
        self.max_lag = max_lag
        self.role = role
        self.locate = locate
        self.node_id = node_id
        self.channels = grpcutil.ChannelPool()
        self.pulls: dict[str, UpstreamPull] = {}

    async def Publish(
        self, request_iterator: AsyncIterator[PublishRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[PublishResponse]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("open") or not first.open.stream.name:
            yield PublishResponse(rejected=PublishRejected(
                reason=PublishRejected.REASON_BAD_REQUEST, detail="the first message must open a named stream"))
            return
        if self.role != "origin":
            yield PublishResponse(rejected=PublishRejected(
                reason=PublishRejected.REASON_BAD_REQUEST, detail="this relay is an edge; publish to an origin"))
            return
        opening = first.open
        stream = self.table.claim(opening.stream, opening.session_id)
        if stream is None:
            event(log, "publish.rejected", stream=f"{opening.stream.app}/{opening.stream.name}",
                  session=opening.session_id, reason="already published")
            yield PublishResponse(rejected=PublishRejected(
                reason=PublishRejected.REASON_ALREADY_PUBLISHED, detail="stream is already being published"))
            return
        event(log, "publish.start", stream=stream.path, session=opening.session_id, client=opening.client_addr,
              subscribers=len(stream.subscribers))
        clean, reason = False, "publish call ended without an end"
        try:
            yield PublishResponse(accepted=PublishAccepted())
            async for request in request_iterator:
                if request.HasField("batch"):
                    if request.batch.frames:
                        stream.publish(request.batch)
                elif request.HasField("end"):
                    clean = request.end.clean
                    reason = "publisher unpublished" if clean else "publisher vanished"
                    break
        except BaseException as exc:  # cancelled by a vanished ingest, or shutdown
            reason = f"publish call ended: {type(exc).__name__}"
            raise
        finally:
            self._unpublished(stream, opening.session_id, clean, reason)

    def _unpublished(self, stream: RelayStream, session_id: str, clean: bool, reason: str) -> None:
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
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("open"):
            yield SubscribeResponse(end=StreamEnd(reason=StreamEnd.REASON_NOT_FOUND,
                                                  detail="the first message must open a stream"))
            return
        opening = first.open
        stream = self.table.get(opening.stream)
        if stream is None and self.locate is not None:
            stream = self._pull(opening)
        if stream is None:
            yield SubscribeResponse(end=StreamEnd(reason=StreamEnd.REASON_NOT_FOUND,
                                                  detail="nobody is publishing this stream"))
            return
        sub = stream.subscribe(opening.subscriber_id, self.max_lag,
                               from_gop=opening.start != SubscribeOpen.START_LIVE)
        task = asyncio.current_task()
        if task is not None:
            sub.on_drop = task.cancel
        event(log, "subscribe.start", stream=stream.path, subscriber=sub.id)
        outcome = "cancelled"
        try:
            if not stream.ready.is_set():
                try:
                    await asyncio.wait_for(stream.ready.wait(), READY_TIMEOUT)
                except TimeoutError:
                    yield SubscribeResponse(end=StreamEnd(reason=StreamEnd.REASON_NOT_FOUND,
                                                          detail=f"upstream gave nothing in {READY_TIMEOUT:g}s"))
                    return
            if sub.end is None and not (sub.queue and stream.pulled):
                yield SubscribeResponse(header=stream.header())  # a pulled stream announces it in-band
            while True:
                item = await sub.next()
                if isinstance(item, StreamEnd):
                    outcome = StreamEnd.Reason.Name(item.reason)
                    yield SubscribeResponse(end=item)
                    return
                if isinstance(item, StreamHeader):
                    yield SubscribeResponse(header=item)
                else:
                    yield SubscribeResponse(batch=item)
        finally:
            if sub.end is not None:
                outcome = StreamEnd.Reason.Name(sub.end.reason)
            stream.unsubscribe(sub)
            if stream.pulled and not stream.subscribers:
                asyncio.get_running_loop().call_later(PULL_LINGER, self._maybe_stop_pull, stream)
            event(log, "subscribe.stop", stream=stream.path, subscriber=sub.id, outcome=outcome, skips=sub.skips)

    def _pull(self, opening: SubscribeOpen) -> RelayStream:
        assert self.locate is not None
        stream = self.table.add_pulled(opening.stream)
        pull = self.pulls[stream.path] = UpstreamPull(self.table, stream, self.locate, self.channels,
                                                      subscriber_id=self.node_id)
        pull.task.add_done_callback(lambda _: self._forget_pull(pull))
        return stream

    def _forget_pull(self, pull: UpstreamPull) -> None:
        # Only this pull: a newer one for the same stream may have started since this one's stream ended.
        if self.pulls.get(pull.stream.path) is pull:
            del self.pulls[pull.stream.path]

    def _maybe_stop_pull(self, stream: RelayStream) -> None:
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
