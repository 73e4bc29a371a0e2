"""The Relay gRPC service: Relay.Publish feeds a stream, Relay.Subscribe reads one.

Both handlers are async generators (grpc's route_guide style); the OpenTelemetry server interceptor
breaks handlers that call `await context.write()` (opentelemetry-python-contrib #3066).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from castmesh.mesh import grpcutil
from castmesh.mesh.logs import event
from castmesh.proto.v1 import relay_pb2_grpc
from castmesh.proto.v1.relay_pb2 import (
    PublishAccepted,
    PublishRejected,
    PublishRequest,
    PublishResponse,
    StreamEnd,
    SubscribeOpen,
    SubscribeRequest,
    SubscribeResponse,
)
from services.relay.fanout import StreamTable

log = logging.getLogger("castmesh.relay")


class RelayService(relay_pb2_grpc.RelayServicer):
    def __init__(self, max_lag: float = 3.0) -> None:
        self.table = StreamTable()
        self.max_lag = max_lag

    async def Publish(
        self, request_iterator: AsyncIterator[PublishRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[PublishResponse]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("open") or not first.open.stream.name:
            yield PublishResponse(rejected=PublishRejected(
                reason=PublishRejected.REASON_BAD_REQUEST, detail="the first message must open a named stream"))
            return
        opening = first.open
        stream = self.table.claim(opening.stream, opening.session_id)
        if stream is None:
            event(log, "publish.rejected", stream=f"{opening.stream.app}/{opening.stream.name}",
                  session=opening.session_id, reason="already published")
            yield PublishResponse(rejected=PublishRejected(
                reason=PublishRejected.REASON_ALREADY_PUBLISHED, detail="stream is already being published"))
            return
        event(log, "publish.start", stream=stream.path, session=opening.session_id, client=opening.client_addr)
        reason, end = "publisher closed", StreamEnd.REASON_UNPUBLISHED
        try:
            yield PublishResponse(accepted=PublishAccepted())
            async for request in request_iterator:
                if request.HasField("batch"):
                    stream.publish(request.batch)
        except BaseException as exc:  # cancelled by a vanished ingest, or shutdown
            reason = f"publish call ended: {type(exc).__name__}"
            raise
        finally:
            self.table.release(stream, StreamEnd(reason=end, detail=reason))
            event(log, "publish.stop", stream=stream.path, session=opening.session_id, reason=reason,
                  subscribers=len(stream.subscribers))

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
        if stream is None:
            yield SubscribeResponse(end=StreamEnd(reason=StreamEnd.REASON_NOT_FOUND,
                                                  detail="nobody is publishing this stream"))
            return
        sub = stream.subscribe(opening.subscriber_id, self.max_lag,
                               from_gop=opening.start != SubscribeOpen.START_LIVE)
        event(log, "subscribe.start", stream=stream.path, subscriber=sub.id)
        outcome = "cancelled"
        try:
            yield SubscribeResponse(header=stream.cache.header())
            while True:
                item = await sub.next()
                if isinstance(item, StreamEnd):
                    outcome = StreamEnd.Reason.Name(item.reason)
                    yield SubscribeResponse(end=item)
                    return
                yield SubscribeResponse(batch=item)
        finally:
            stream.unsubscribe(sub)
            event(log, "subscribe.stop", stream=stream.path, subscriber=sub.id, outcome=outcome, skips=sub.skips)


async def start(host: str, port: int, max_lag: float) -> tuple[grpc.aio.Server, int, RelayService]:
    """Start a relay gRPC server; return it, the port it listens on, and the service."""
    server = grpcutil.server()
    service = RelayService(max_lag=max_lag)
    relay_pb2_grpc.add_RelayServicer_to_server(service, server)
    health = grpcutil.add_health(server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (relay gRPC): address in use or not available")
    await server.start()
    await grpcutil.mark_serving(health, "castmesh.v1.Relay")
    return server, bound, service
