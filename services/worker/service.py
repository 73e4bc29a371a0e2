"""The worker service: jobs for streams (ABR ladders, recordings, forwards), given by dispatch on a held
Dispatch.Work call, and thumbnails of live streams on request (services.worker.thumbs).

A job runs only under its lease (a Dispatch.Lease call whose claim names the job: one worker per job
cluster-wide, gone the moment this process is). The worker subscribes to the source like a playback node
(castmesh.mesh.subscription) and publishes what it makes like an ingest (services.ingest.session: its own
publish side, whose sessions are named after this worker).

If the Work call breaks (dispatch restarted), the jobs go on under their leases and the call is opened
again, naming them, so the new dispatch adopts them. If a job's lease breaks, the job claims it again for
RECLAIM_FOR seconds; refused (another worker has the job now) or out of time, it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc
from prometheus_client import Gauge

from castmesh.media.frames import stream_path
from castmesh.mesh import grpcutil, runtime
from castmesh.mesh.jobs import ABR, FORWARD, PULL, RECORD
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.subscription import Locate, UpstreamSubscription
from castmesh.proto.v1.dispatch_pb2 import Job, Node, NodeLoad, WorkOrder, WorkReport
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader, StreamKey
from castmesh.proto.v1.relay_pb2 import StatsRequest, StreamEnd
from castmesh.proto.v1.relay_pb2_grpc import RelayStub
from services.ingest.lease import DispatchLease, LeaseRefused
from services.ingest.session import Ingest
from services.worker.abr import AbrJob
from services.worker.forward import ForwardJob
from services.worker.pull import PullJob
from services.worker.record import Recordings, RecordJob
from services.worker.thumbs import Thumbnails

log = logging.getLogger("castmesh.worker")

RECLAIM_FOR = 10.0
HOLDER_PATIENCE = 3.0  # seconds a job's claim refused by a holder is made again (its last worker just died)
REPORT_EVERY = 1.0  # seconds between load reports
RETRY_FOR = 10.0  # how long a job looks for its source after losing it, as playback does

JOBS = Gauge("castmesh_worker_jobs", "Jobs this worker runs", ["state"])


def process_cpu(pid: int) -> float:
    """CPU seconds a live process has used (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Work(Protocol):
    """What a job of any kind is to the worker."""

    outputs: Any  # what it publishes (sized)

    async def run(self) -> StreamEnd: ...  # follows the source until it ends

    def close(self, clean: bool, reason: str) -> None: ...

    def pids(self) -> list[int]: ...  # children whose CPU counts as the worker's


class RunningJob:
    def __init__(self, job: Job, work: Work, lease: DispatchLease) -> None:
        self.job = job
        self.work = work
        self.lease = lease
        self.task: asyncio.Task[None] | None = None


class Worker:
    def __init__(self, dispatch: DispatchStub, node: Node, ingest: Ingest, locate: Locate, ffmpeg: str,
                 capacity: int = 4, recordings: Recordings | None = None) -> None:
        self.dispatch = dispatch
        self.node = node
        self.ingest = ingest
        self.locate = locate
        self.ffmpeg = ffmpeg
        self.capacity = capacity
        self.recordings = recordings  # None: this worker records nothing
        self.links = RelayLinks()
        self.stats_channels = grpcutil.ChannelPool()  # to ask origins who watches a pulled stream
        self.jobs: dict[str, RunningJob] = {}
        self.outbox: asyncio.Queue[WorkReport] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.thumbnails = Thumbnails(self._follow("thumbnail"))
        self.cpu_seen = (time.monotonic(), self._cpu())
        JOBS.labels("running").set_function(lambda: sum(
            1 for j in self.jobs.values() if j.job.state == Job.STATE_RUNNING))
        JOBS.labels("all").set_function(lambda: len(self.jobs))

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._hold())

    def load(self) -> NodeLoad:
        """Jobs, renditions published, and the CPU this worker and its children used since the last report
        (a fraction of one core: dispatch places jobs on the least loaded worker)."""
        now, spent = time.monotonic(), self._cpu()
        cpu = max(0.0, spent - self.cpu_seen[1]) / max(1e-3, now - self.cpu_seen[0])
        self.cpu_seen = (now, spent)
        return NodeLoad(streams=len(self.jobs), subscribers=sum(len(j.work.outputs) for j in self.jobs.values()),
                        cpu=round(cpu, 3))

    def _cpu(self) -> float:
        """CPU seconds of this process, its children that ended, and its live ffmpeg children."""
        own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        total = own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime
        for running in self.jobs.values():
            total += sum(process_cpu(pid) for pid in running.work.pids())
        return total

    async def close(self) -> None:
        await self.thumbnails.close()
        if self.task is not None:
            await runtime.cancel_all([self.task])
        for ident in list(self.jobs):
            self._stop(ident, "the worker is stopping")
        await asyncio.gather(*(j.task for j in self.jobs.values() if j.task is not None), return_exceptions=True)
        await self.links.close()
        await self.stats_channels.close()

    # The Work call ----------------------------------------------------------------------------------------

    async def _reports(self, outbox: asyncio.Queue[WorkReport]) -> AsyncIterator[WorkReport]:
        running = [j.job for j in self.jobs.values()]
        yield WorkReport(hello=WorkReport.Hello(node=self.node, capacity=self.capacity, running=running))
        while True:
            try:
                yield await asyncio.wait_for(outbox.get(), REPORT_EVERY)
            except TimeoutError:
                yield WorkReport(load=self.load())

    async def _hold(self) -> None:
        backoff = 0.2
        while True:
            outbox: asyncio.Queue[WorkReport] = asyncio.Queue()
            self.outbox = outbox
            try:
                call = self.dispatch.Work(self._reports(outbox), wait_for_ready=True)
                async for order in call:
                    backoff = 0.2
                    if order.HasField("refused"):
                        event(log, "work.refused", level=logging.ERROR, worker=self.node.id, detail=order.refused)
                        return
                    self._order(order)
            except grpc.aio.AioRpcError as exc:
                event(log, "work.lost", level=logging.WARNING, worker=self.node.id, error=exc.code().name)
            except Exception as exc:  # a bug in handling an order must not end the worker's call for good
                event(log, "work.error", level=logging.ERROR, worker=self.node.id, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _order(self, order: WorkOrder) -> None:
        if order.HasField("start"):
            self._start(order.start)
        elif order.HasField("stop"):
            self._stop(order.stop, "dispatch stopped it")

    def _tell(self, job: Job) -> None:
        report = Job()
        report.CopyFrom(job)
        self.outbox.put_nowait(WorkReport(state=report))

    # Jobs -------------------------------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        if job.id in self.jobs:
            self._tell(self.jobs[job.id].job)
            return
        work: Work
        if job.spec.kind == ABR:
            work = AbrJob(job, self._follow(job.id), self.ingest, self.ffmpeg, self._tell)
        elif job.spec.kind == RECORD and self.recordings is not None:
            work = RecordJob(job, self._follow(job.id), self.recordings, self._tell)
        elif job.spec.kind == FORWARD:
            work = ForwardJob(job, self._follow(job.id), self._tell)
        elif job.spec.kind == PULL:
            work = PullJob(job, self.ingest, self.ffmpeg, self._tell, self._watchers)
        else:
            job.state, job.detail = Job.STATE_FAILED, f"this worker runs no {job.spec.kind!r} jobs"
            self._tell(job)
            return
        lease = DispatchLease(self.dispatch, job.spec.stream, f"{self.node.id}/{job.id}", self.node.address,
                              job=job.id)
        running = self.jobs[job.id] = RunningJob(job, work, lease)
        running.task = asyncio.get_running_loop().create_task(self._run(running))

    def _follow(self, purpose: str) -> Callable[..., UpstreamSubscription]:
        """How this worker follows a stream (a job's source, a stream to take thumbnails of), as playback does;
        its span is named by the job's kind (span names stay few), its subscriber id by the job."""
        kind = purpose.partition(":")[0]
        def subscribe(key: StreamKey, on_header: Callable[[StreamHeader, bool], None],
                      on_frames: Callable[[list[Frame]], None]) -> UpstreamSubscription:
            return UpstreamSubscription(key, self.locate, self.links, f"{self.node.id}/{purpose}", on_header,
                                        on_frames, retry_for=RETRY_FOR, span_name=f"worker.{kind}")
        return subscribe

    async def _run(self, running: RunningJob) -> None:
        job = running.job
        clean, reason = False, "stopped"
        loop = asyncio.get_running_loop()
        work: asyncio.Task[StreamEnd] | None = None
        keeper: asyncio.Task[str] | None = None
        try:
            refused = await self._claim(running)
            if refused:
                job.state, job.detail = Job.STATE_FAILED, f"no lease: {refused}"
                self._tell(job)
                return
            event(log, "job.start", job=job.id, worker=self.node.id)
            job.state = Job.STATE_STARTING
            self._tell(job)
            work = loop.create_task(running.work.run())
            keeper = loop.create_task(self._keep_lease(running))
            done, _ = await asyncio.wait((work, keeper), return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                try:
                    end = work.result()
                    clean = end.reason == StreamEnd.REASON_UNPUBLISHED
                    reason = end.detail or StreamEnd.Reason.Name(end.reason)
                except Exception as exc:  # a bug, not the source: said, and the job stops here
                    reason = f"the job failed: {type(exc).__name__}: {exc}"
                    event(log, "job.error", level=logging.ERROR, job=job.id, error=reason)
                if job.state != Job.STATE_DONE:  # (done: it ended by itself, as it should)
                    job.state, job.detail = Job.STATE_FAILED, f"the source ended: {reason}"
                self._tell(job)
            else:
                reason = keeper.result()
        except asyncio.CancelledError:
            clean = True
            raise
        finally:
            # whatever ended the job (a stop order cancels this task), its source, its child and its lease
            # keeper end with it, before its lease is let go
            for task in (work, keeper):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (work, keeper) if t is not None), return_exceptions=True)
            running.work.close(clean, reason)
            running.lease.release()
            if self.jobs.get(job.id) is running:
                del self.jobs[job.id]
            event(log, "job.stop", job=job.id, worker=self.node.id, reason=reason)

    async def _claim(self, running: RunningJob) -> str:
        """The job's lease; why not, if it cannot be had. A job is given to this worker the moment its last
        worker's Work call ends, which may be a moment before that worker's lease call is seen to end (in
        Consul, its session destroyed): refused by a holder, the claim is made again for HOLDER_PATIENCE."""
        deadline = asyncio.get_running_loop().time() + HOLDER_PATIENCE
        while True:
            try:
                await running.lease.acquire()
                return ""
            except LeaseRefused as exc:
                if "held by" not in str(exc) or asyncio.get_running_loop().time() > deadline:
                    return str(exc)
            await asyncio.sleep(0.2)

    async def _keep_lease(self, running: RunningJob) -> str:
        """Hold the job's lease; claim it again when its call breaks. Returns why the job must stop."""
        while True:
            await running.lease.lost.wait()
            loop = asyncio.get_running_loop()
            until = loop.time() + RECLAIM_FOR
            while True:
                try:
                    await running.lease.reclaim("")
                    break
                except LeaseRefused as exc:
                    if "held by" in str(exc) or loop.time() > until:
                        return f"lost its lease: {exc}"
                    await asyncio.sleep(0.5)

    async def _watchers(self, key: StreamKey) -> int | None:
        """Who watches a stream: its origin's subscribers, thumbnail takers aside; None if unknown."""
        address = await self.locate(key, set())
        if not address:
            return 0
        try:
            reply = await RelayStub(self.stats_channels.get(address)).Stats(StatsRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            self.stats_channels.forget(address)
            return None
        path = stream_path(key)
        stats = next((s for s in reply.streams if stream_path(s.stream) == path), None)
        return 0 if stats is None else sum(1 for who in stats.subscribers if not who.endswith("/thumbnail"))

    def _stop(self, ident: str, reason: str) -> None:
        running = self.jobs.get(ident)
        if running is not None and running.task is not None:
            event(log, "job.stopping", job=ident, reason=reason)
            running.task.cancel()
