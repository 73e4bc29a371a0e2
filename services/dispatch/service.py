"""The Dispatch gRPC service: node registration, publish leases, locating streams, listings.

Leases and registrations are held by open calls, so they die with their holder: a node or an ingest that
is killed drops its TCP connection, gRPC ends the call, and the finally blocks below clean up at once.

A restarted dispatch knows no nodes until they register again, and ingests claim their streams again with
the origin they publish into as a hint. For REJOIN seconds after start, such a claim waits for its origin
to register instead of being refused or sent elsewhere, so the stream is listed again, where it runs, as
soon as both are back. Origins that failed under a lease are avoided for a few seconds from that failure
(a restarted origin on the same address is placed on again).

Jobs (jobs.py): workers hold a Work call, on which they are given jobs and report what became of them;
the job board follows the directory's streams (rules start jobs, a source's end stops them). A job's
lease is a Lease call whose claim names the job: held like a publish lease, with no origin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from castmesh.media.frames import stream_path
from castmesh.mesh import grpcutil, runtime
from castmesh.mesh.jobs import ABR, PULL, JobError, Rule, check_spec, job_id, lease_key
from castmesh.mesh.logs import event
from castmesh.mesh.retry import RecentFailures
from castmesh.proto.v1 import dispatch_pb2_grpc
from castmesh.proto.v1.dispatch_pb2 import (
    Job,
    JobReply,
    JobSpec,
    LeaseReply,
    LeaseRequest,
    ListJobsReply,
    ListJobsRequest,
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
    WorkOrder,
    WorkReport,
)
from services.dispatch.directory import Directory, InMemoryDirectory
from services.dispatch.jobs import JobBoard
from services.dispatch.placement import pick_edge, pick_origin

log = logging.getLogger("castmesh.dispatch")

REJOIN = 3.0  # seconds after start in which a claim waits for its hinted origin to register
AVOID_FOR = 5.0  # seconds an origin that failed under a lease is not placed on again by that lease
TICK = 1.0  # seconds between the job board's looks at jobs waiting to be placed again
MAX_CAPACITY = 1000  # jobs a worker may say it takes


class DispatchService(dispatch_pb2_grpc.DispatchServicer):
    def __init__(self, directory: Directory, board: JobBoard | None = None) -> None:
        self.directory = directory
        self.board = board or JobBoard()
        self.started = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Follow the directory's streams for the job board, and place the jobs that wait."""
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._follow_streams()), loop.create_task(self._tick())]

    async def close(self) -> None:
        await runtime.cancel_all(self.tasks)

    async def _follow_streams(self) -> None:
        while True:
            # (again) from a snapshot: a stream that ended while this was cut off is not in it
            listed = {stream_path(info.stream) for info in await self.directory.streams()}
            for path, info in list(self.board.live.items()):
                if path not in listed:
                    self.board.unpublished(info)
            async for change in self.directory.watch():
                if change.kind == StreamChange.KIND_UNPUBLISHED:
                    self.board.unpublished(change.stream)
                else:
                    self.board.published(change.stream)
            await asyncio.sleep(0.1)  # cut off (it fell behind): follow again from a fresh snapshot

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.board.place()

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
        if claim.job:
            async for reply in self._job_lease(claim, request_iterator):
                yield reply
            return
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

    async def _job_lease(self, claim: LeaseRequest.Claim,
                         requests: AsyncIterator[LeaseRequest]) -> AsyncIterator[LeaseReply]:
        """A job's lease: granted (no origin) unless another worker holds it; held until the call ends."""
        key = lease_key(claim.job)
        granted, info = await self.directory.claim(key, claim.holder, claim.client_addr)
        if not granted:
            event(log, "job_lease.rejected", job=claim.job, holder=claim.holder, by=info.holder)
            yield LeaseReply(rejected=LeaseReply.Rejected(detail="the job is run by another worker",
                                                          holder=info.holder))
            return
        try:
            event(log, "job_lease.granted", job=claim.job, holder=claim.holder)
            yield LeaseReply(granted=LeaseReply.Granted())
            async for _ in requests:
                yield LeaseReply(rejected=LeaseReply.Rejected(detail="a job's lease has no origin to relocate"))
        finally:
            await self.directory.release(key, info)
            event(log, "job_lease.released", job=claim.job, holder=claim.holder)

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
            return LocateReply(found=False, pending=info is None and self.board.demand(request.stream))
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


    # Jobs -------------------------------------------------------------------------------------------------

    async def Work(self, request_iterator: AsyncIterator[WorkReport],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[WorkOrder]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("hello") or not first.hello.node.id:
            yield WorkOrder(refused="the first message must be a hello naming the worker")
            return
        hello = first.hello
        capacity = min(hello.capacity or 1, MAX_CAPACITY)
        worker = self.board.join(hello.node.id, capacity, list(hello.running))

        async def reports() -> None:
            async for report in request_iterator:
                if report.HasField("state"):
                    self.board.report(worker, report.state)
                elif report.HasField("load"):
                    worker.load = report.load
            await worker.orders.put(None)

        reader = asyncio.get_running_loop().create_task(reports())
        try:
            while (order := await worker.orders.get()) is not None:
                yield order
        finally:
            reader.cancel()
            self.board.leave(worker)

    async def StartJob(self, request: JobSpec, context: grpc.aio.ServicerContext) -> JobReply:
        spec = JobSpec()
        spec.CopyFrom(request)
        spec.kind = spec.kind or ABR
        spec.source = spec.source or "api"
        try:
            check_spec(spec)
        except JobError as exc:
            return JobReply(ok=False, detail=str(exc))
        if spec.kind == PULL and spec.on_demand:  # a rule for this one stream: a job once someone watches
            self.board.rules = [r for r in self.board.rules if r.pattern != stream_path_of(spec)]
            self.board.rules.insert(0, Rule(stream_path_of(spec), spec))
            return JobReply(ok=True, detail="added: pulled when watched", job=Job(
                id=job_id(PULL, spec.stream), spec=spec, state=Job.STATE_PENDING, detail="waiting for a viewer"))
        ok, detail, job = self.board.add(spec)
        return JobReply(ok=ok, detail=detail, job=job)

    async def StopJob(self, request: JobSpec, context: grpc.aio.ServicerContext) -> JobReply:
        ident = job_id(request.kind or ABR, request.stream)
        ruled = len(self.board.rules)
        if request.kind == PULL:  # an on-demand pull the API asked for is a rule as well
            self.board.rules = [r for r in self.board.rules
                                if not (r.spec.source == "api" and r.pattern == stream_path_of(request))]
        if not self.board.remove(ident, "stopped through the API") and ruled == len(self.board.rules):
            return JobReply(ok=False, detail=f"no job {ident}")
        return JobReply(ok=True, detail="stopped")

    async def ListJobs(self, request: ListJobsRequest, context: grpc.aio.ServicerContext) -> ListJobsReply:
        return ListJobsReply(jobs=self.board.all())


async def start(host: str, port: int, directory: Directory | None = None,
                board: JobBoard | None = None) -> tuple[grpc.aio.Server, int, DispatchService]:
    server = grpcutil.server()
    service = DispatchService(directory or InMemoryDirectory(), board)
    dispatch_pb2_grpc.add_DispatchServicer_to_server(service, server)
    health = grpcutil.add_health(server)
    bound = grpcutil.bind(server, host, port, "dispatch gRPC")
    await server.start()
    service.start()
    await grpcutil.mark_serving(health, "castmesh.v1.Dispatch")
    return server, bound, service


def stream_path_of(spec: JobSpec) -> str:
    """APP/STREAM, as a pull rule's pattern names one stream."""
    return f"{spec.stream.app}/{spec.stream.name}"
