"""The Dispatch gRPC service: node registration, publish leases, locating streams, listings.

Leases and registrations are held by open calls, so they die with their holder: a node or an ingest that
is killed drops its TCP connection, gRPC ends the call, and the finally blocks below clean up at once.

A restarted dispatch knows no nodes until they register again, and ingests claim their streams again with
the origin they publish into as a hint. For REJOIN seconds after start, such a claim waits for its origin
to register instead of being refused or sent elsewhere, so the stream is listed again, where it runs, as
soon as both are back. Origins that failed under a lease are avoided for a few seconds from that failure
(a restarted origin on the same address is placed on again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from castmesh.media.frames import stream_path
from castmesh.mesh import grpcutil
from castmesh.mesh.logs import event
from castmesh.mesh.retry import RecentFailures
from castmesh.proto.v1 import dispatch_pb2_grpc
from castmesh.proto.v1.dispatch_pb2 import (
    LeaseReply,
    LeaseRequest,
    ListNodesReply,
    ListNodesRequest,
    ListStreamsReply,
    ListStreamsRequest,
    LocateReply,
    LocateRequest,
    NodeReport,
    NodeRole,
    RegisterReply,
    StreamChange,
)
from services.dispatch.directory import Directory, InMemoryDirectory
from services.dispatch.placement import pick_edge, pick_origin

log = logging.getLogger("castmesh.dispatch")

REJOIN = 3.0  # seconds after start in which a claim waits for its hinted origin to register
AVOID_FOR = 5.0  # seconds an origin that failed under a lease is not placed on again by that lease


class DispatchService(dispatch_pb2_grpc.DispatchServicer):
    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.started = time.monotonic()

    async def Register(
        self, request_iterator: AsyncIterator[NodeReport], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[RegisterReply]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("hello") or not first.hello.id:
            yield RegisterReply(accepted=False, detail="the first message must be a hello naming the node")
            return
        node = first.hello
        await self.directory.add_node(node)
        event(log, "node.up", node=node.id, role=NodeRole.Name(node.role), address=node.address, zone=node.zone)
        try:
            yield RegisterReply(accepted=True)
            async for report in request_iterator:
                if report.HasField("load"):
                    await self.directory.update_load(node.id, report.load)
        finally:
            await self.directory.remove_node(node.id)
            event(log, "node.down", node=node.id, role=NodeRole.Name(node.role), address=node.address)

    async def Lease(
        self, request_iterator: AsyncIterator[LeaseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[LeaseReply]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("claim") or not first.claim.stream.name:
            yield LeaseReply(rejected=LeaseReply.Rejected(detail="the first message must claim a named stream"))
            return
        claim = first.claim
        key, holder = claim.stream, claim.holder
        path = stream_path(key)
        granted, info = await self.directory.claim(key, holder, claim.client_addr)
        if not granted:
            event(log, "lease.rejected", stream=path, holder=holder, by=info.holder)
            yield LeaseReply(rejected=LeaseReply.Rejected(detail="stream is already being published",
                                                          holder=info.holder))
            return
        try:
            avoid = RecentFailures(AVOID_FOR)
            if claim.origin_hint:
                await self._await_rejoin(claim.origin_hint)
            hint = claim.origin_hint
            request: LeaseRequest | None = first
            while request is not None:
                if request.HasField("relocate"):
                    avoid.add(request.relocate.failed_origin)
                    if request.relocate.failed_origin == hint:
                        hint = ""  # it failed under this lease: not preferred again once its avoid expires
                prefer = hint or await self.directory.recent_origin(key)
                origin = pick_origin(await self.directory.nodes(), avoid.current(), prefer=prefer)
                if origin is None:
                    yield LeaseReply(rejected=LeaseReply.Rejected(detail="no live origin relay"))
                    return
                await self.directory.set_origin(key, holder, origin.address)
                event(log, "lease.granted", stream=path, holder=holder, origin=origin.address,
                      relocated=request.HasField("relocate"))
                yield LeaseReply(granted=LeaseReply.Granted(origin=origin.address, origin_id=origin.id))
                request = await anext(request_iterator, None)
        finally:
            await self.directory.release(key, info)
            event(log, "lease.released", stream=path, holder=holder)

    async def _await_rejoin(self, origin: str) -> None:
        """Just after a restart, wait (until REJOIN after start) for `origin` to register again."""
        while time.monotonic() - self.started < REJOIN:
            if any(node.address == origin for node, _ in await self.directory.nodes()):
                return
            await asyncio.sleep(0.02)

    async def Locate(self, request: LocateRequest, context: grpc.aio.ServicerContext) -> LocateReply:
        info = await self.directory.get(request.stream)
        avoid = set(request.avoid)
        if info is None or not info.origin or info.origin in avoid:
            return LocateReply(found=False)
        reply = LocateReply(found=True, origin=info.origin, holder=info.holder)
        if not request.origin_only:
            edge = pick_edge(await self.directory.nodes(), request.zone, stream_path(request.stream), avoid)
            if edge is not None:
                reply.edge = edge.address
        return reply

    async def ListStreams(
        self, request: ListStreamsRequest, context: grpc.aio.ServicerContext
    ) -> ListStreamsReply:
        return ListStreamsReply(streams=await self.directory.streams())

    async def WatchStreams(
        self, request: ListStreamsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StreamChange]:
        async for change in self.directory.watch():
            yield change

    async def ListNodes(self, request: ListNodesRequest, context: grpc.aio.ServicerContext) -> ListNodesReply:
        return ListNodesReply(nodes=[ListNodesReply.Entry(node=n, load=load)
                                     for n, load in await self.directory.nodes()])


async def start(host: str, port: int, directory: Directory | None = None) -> tuple[grpc.aio.Server, int]:
    server = grpcutil.server()
    dispatch_pb2_grpc.add_DispatchServicer_to_server(DispatchService(directory or InMemoryDirectory()), server)
    health = grpcutil.add_health(server)
    bound = grpcutil.bind(server, host, port, "dispatch gRPC")
    await server.start()
    await grpcutil.mark_serving(health, "castmesh.v1.Dispatch")
    return server, bound
