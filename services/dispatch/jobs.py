"""Dispatch's job board: which jobs the cluster should run (rules applied to the published streams, and
jobs asked for through the API), and on which worker each runs.

Workers hold a Dispatch.Work call (service.py); a job goes to the worker with the fewest jobs among those
with room (a worker's capacity is in ABR ladders; LIGHT_PER_SLOT times as many of the other kinds), then
the least CPU, and back to the board the moment its worker's call ends, to be placed on
another at once. A worker runs a job only under the job's lease in the directory (a claim like a
publish's), so two dispatches, or a dispatch that restarted and lost its board, never get one job run
twice: the second worker is refused the lease and says so, and the job waits for the holder to let go.

Jobs are ABR ladders, recordings, forwards and pulls (castmesh.mesh.jobs), a stream having at most one of
each. A job ends with its source stream (unpublished after its grace), or when the API stops it. The streams
a job publishes (an ABR ladder's renditions) never match a rule themselves; a pulled stream does, like any
published one.

A pull is the other way round: its stream is what it publishes, so it does not end with it. An always-on
pull (a rule naming one stream, or the API) is a job from the start; an on-demand one (a rule with a
pattern) becomes a job when a viewer's Locate finds its stream unpublished (demand()), and ends by itself
once nobody has watched for its idle time (its worker reports it DONE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from castmesh.media.frames import path_of, stream_key, stream_path
from castmesh.mesh.jobs import ABR, PULL, STREAM_KINDS, Rule, job_id, matching, outputs, spec_for
from castmesh.mesh.logs import event
from castmesh.mesh.retry import Clock
from castmesh.proto.v1.dispatch_pb2 import Job, JobSpec, NodeLoad, StreamInfo, WorkOrder
from castmesh.proto.v1.media_pb2 import StreamKey

log = logging.getLogger("castmesh.dispatch")

RETRY_FAILED = 5.0  # seconds before a job that failed on a worker is placed again
REJOIN = 10.0  # seconds a job a worker still runs may wait for its source to be listed after a dispatch restart
AVOID_FAILED = 60.0  # seconds a worker a job failed on is passed over for it while another has room
ORDERS = 256  # orders a worker may have unread before its call is ended
LIGHT_PER_SLOT = 50  # recordings, forwards and pulls a worker takes per ladder it may run (they copy media,
# they do not encode it: docs/BENCHMARKS.md measures ~400 recordings and ~330 forwards per core)


@dataclass(eq=False)
class WorkerEntry:
    id: str
    capacity: int
    orders: asyncio.Queue[WorkOrder | None] = field(default_factory=lambda: asyncio.Queue(ORDERS))
    jobs: set[str] = field(default_factory=set)
    load: NodeLoad = field(default_factory=NodeLoad)

    def send(self, order: WorkOrder) -> bool:
        """Queue an order; a worker that has ORDERS unread has its call ended instead (its next hello says
        what it runs, and the board sorts that out), so no order is lost unseen."""
        try:
            self.orders.put_nowait(order)
            return True
        except asyncio.QueueFull:
            while not self.orders.empty():
                self.orders.get_nowait()
            self.orders.put_nowait(None)
            return False


@dataclass(eq=False)
class JobEntry:
    job: Job
    avoid: dict[str, float] = field(default_factory=dict)  # worker -> until when it is not given the job again
    retry_at: float = 0.0
    # adopted from a worker before its source was listed again (a dispatch restart): until when the source
    # may take to be listed before the job is stopped; 0: its source is listed
    provisional_until: float = 0.0


class JobBoard:
    def __init__(self, rules: list[Rule] | None = None, clock: Clock = time.monotonic) -> None:
        self.rules = rules or []
        self.clock = clock
        self.jobs: dict[str, JobEntry] = {}
        self.workers: dict[str, WorkerEntry] = {}
        self.live: dict[str, StreamInfo] = {}  # published streams by path
        self.made: set[str] = set()  # paths of streams that jobs publish
        for rule in self.rules:
            if rule.spec.kind == PULL and not rule.spec.on_demand:
                app, _, name = rule.pattern.partition("/")
                self.add(spec_for(rule, stream_key(app, name)))

    # Streams ----------------------------------------------------------------------------------------------

    def published(self, info: StreamInfo) -> None:
        path = stream_path(info.stream)
        self.live[path] = info
        for entry in self.jobs.values():
            if entry.provisional_until and stream_path(entry.job.spec.stream) == path:
                entry.provisional_until = 0.0  # its source is back: the adopted job stays
        if path in self.made:
            return
        for kind in STREAM_KINDS:
            rule = matching(self.rules, info.stream.app, kind)
            if rule is not None:
                self.add(spec_for(rule, info.stream))

    def demand(self, key: StreamKey) -> bool:
        """A viewer wants a stream nobody publishes: True if a pull is making it (started now if an
        on-demand rule names it), so the viewer waits for it."""
        if job_id(PULL, key) in self.jobs:
            return True
        rule = matching(self.rules, key.app, PULL, key.name)
        if rule is None or not rule.spec.on_demand:
            return False
        return self.add(spec_for(rule, key))[0]

    def unpublished(self, info: StreamInfo) -> None:
        path = stream_path(info.stream)
        self.live.pop(path, None)
        for entry in [e for e in self.jobs.values()
                      if stream_path(e.job.spec.stream) == path and e.job.spec.kind != PULL]:
            self.remove(entry.job.id, "the source stream ended")

    # Jobs -------------------------------------------------------------------------------------------------

    def add(self, spec: JobSpec) -> tuple[bool, str, Job | None]:
        """A job for `spec` (placed now if a worker has room); (False, why) if its source is not live."""
        path = stream_path(spec.stream)
        if path not in self.live and spec.kind != PULL:
            return False, f"{path} is not being published", None
        if path in self.made:
            return False, f"{path} is made by a job itself", None
        ident = job_id(spec.kind, spec.stream)
        entry = self.jobs.get(ident)
        if entry is not None:
            return True, "running already", entry.job
        job = Job(id=ident, spec=spec, state=Job.STATE_PENDING, outputs=outputs(spec))
        self.jobs[ident] = JobEntry(job)
        self._outputs_changed()
        event(log, "job.added", job=ident, source=spec.source)
        self.place()
        return True, "added", job

    def remove(self, ident: str, reason: str) -> bool:
        entry = self.jobs.pop(ident, None)
        if entry is None:
            return False
        worker = self.workers.get(entry.job.worker)
        if worker is not None:
            worker.jobs.discard(ident)
            worker.send(WorkOrder(stop=ident))
        self._outputs_changed()
        event(log, "job.removed", job=ident, worker=entry.job.worker, reason=reason)
        return True

    def all(self) -> list[Job]:
        return [entry.job for entry in self.jobs.values()]

    def _outputs_changed(self) -> None:
        self.made = {path_of(e.job.spec.stream.app, name, e.job.spec.stream.vhost)
                     for e in self.jobs.values() for name in e.job.outputs}

    # Workers ----------------------------------------------------------------------------------------------

    def join(self, worker_id: str, capacity: int, running: list[Job]) -> WorkerEntry:
        """A worker's Work call opened: it keeps the jobs it already runs that nobody else has (a dispatch
        restart; one whose source is not listed yet waits REJOIN for it), and is told to stop the others."""
        worker = WorkerEntry(worker_id, capacity)
        superseded = self.workers.get(worker_id)  # the same worker's old call, not yet seen to end
        self.workers[worker_id] = worker
        if superseded is not None:
            self._orphan(superseded, "its worker called again")
        for job in running:
            entry = self.jobs.get(job.id)
            if entry is None:  # a restarted dispatch: the worker knows; its source may not be listed yet
                listed = stream_path(job.spec.stream) in self.live or job.spec.kind == PULL
                entry = self.jobs[job.id] = JobEntry(Job(id=job.id, spec=job.spec, outputs=job.outputs),
                                                     provisional_until=0.0 if listed else self.clock() + REJOIN)
                self._outputs_changed()
            if entry is not None and not entry.job.worker:
                self._assign(entry, worker, job.state or Job.STATE_RUNNING)
                entry.job.detail = job.detail
            else:
                worker.send(WorkOrder(stop=job.id))
        event(log, "worker.up", worker=worker_id, capacity=capacity, adopted=len(worker.jobs))
        self.place()
        return worker

    def leave(self, worker: WorkerEntry) -> None:
        """Its call ended: its jobs are placed again, now (unless the worker has called again meanwhile: its
        new call took them over)."""
        if self.workers.get(worker.id) is not worker:
            return
        del self.workers[worker.id]
        event(log, "worker.down", worker=worker.id, jobs=len(worker.jobs))
        self._orphan(worker, "its worker left")
        self.place()

    def _orphan(self, worker: WorkerEntry, why: str) -> None:
        for ident in worker.jobs:
            entry = self.jobs.get(ident)
            if entry is not None and entry.job.worker == worker.id:
                entry.job.worker, entry.job.state, entry.job.detail = "", Job.STATE_PENDING, why
        worker.jobs.clear()

    def report(self, worker: WorkerEntry, job: Job) -> None:
        """What a worker says became of a job."""
        entry = self.jobs.get(job.id)
        if job.state == Job.STATE_DONE:  # (an on-demand pull nobody watched)
            if entry is not None and entry.job.worker == worker.id:
                worker.jobs.discard(job.id)
                entry.job.worker = ""
                self.remove(job.id, job.detail or "done")
            return
        if job.state == Job.STATE_FAILED:
            worker.send(WorkOrder(stop=job.id))  # whatever is left of it there ends: its lease is let go
        if entry is None or entry.job.worker != worker.id or self.workers.get(worker.id) is not worker:
            if job.state in (Job.STATE_RUNNING, Job.STATE_STARTING, Job.STATE_WAITING):
                worker.send(WorkOrder(stop=job.id))  # not (or no longer) its job
            return
        entry.job.state, entry.job.detail = job.state, job.detail
        if job.outputs:
            del entry.job.outputs[:]
            entry.job.outputs.extend(job.outputs)
        if job.targets:  # a forward's destinations, each with its state
            del entry.job.targets[:]
            entry.job.targets.extend(job.targets)
        if job.state == Job.STATE_FAILED:
            worker.jobs.discard(job.id)
            entry.job.worker = ""
            entry.avoid[worker.id] = self.clock() + AVOID_FAILED
            entry.retry_at = self.clock() + RETRY_FAILED
            event(log, "job.failed", level=logging.WARNING, job=job.id, worker=worker.id, detail=job.detail)
            self.place()

    def place(self) -> None:
        """Every job without a worker goes to the least loaded worker with room, if there is one. A job that
        failed waits RETRY_FAILED, and goes elsewhere if another worker has room (for AVOID_FAILED)."""
        now = self.clock()
        for entry in [e for e in self.jobs.values() if e.provisional_until and e.provisional_until < now]:
            self.remove(entry.job.id, "its source was not listed again after the restart")
        for entry in self.jobs.values():
            if entry.job.worker or entry.retry_at > now:
                continue
            if entry.avoid:
                entry.avoid = {w: until for w, until in entry.avoid.items() if until > now}
            open_ = [w for w in self.workers.values() if self._room(w, entry.job.spec.kind)]
            fresh = [w for w in open_ if entry.avoid.get(w.id, 0.0) <= now]
            choice = min(fresh or open_, key=lambda w: (len(w.jobs), w.load.cpu, w.id), default=None)
            if choice is None:
                entry.job.state = Job.STATE_PENDING
                entry.job.detail = "no worker has room" if self.workers else "no worker is alive"
                continue
            self._assign(entry, choice, Job.STATE_STARTING)
            job = Job()
            job.CopyFrom(entry.job)
            if not choice.send(WorkOrder(start=job)):
                entry.job.worker = ""
                choice.jobs.discard(entry.job.id)

    @staticmethod
    def _room(worker: WorkerEntry, kind: str) -> bool:
        """Whether a worker takes one more job of `kind`: its capacity counts ABR ladders (an encoder
        each); the other kinds have LIGHT_PER_SLOT times as many places."""
        ladders = sum(1 for ident in worker.jobs if ident.startswith(f"{ABR}:"))
        if kind == ABR:
            return ladders < worker.capacity
        return len(worker.jobs) - ladders < worker.capacity * LIGHT_PER_SLOT

    def _assign(self, entry: JobEntry, worker: WorkerEntry, state: int) -> None:
        entry.job.worker = worker.id
        entry.job.state = state  # type: ignore[assignment]
        entry.job.detail = ""
        entry.job.since_us = time.time_ns() // 1000
        worker.jobs.add(entry.job.id)

    def source_of(self, key: StreamKey) -> list[Job]:
        path = stream_path(key)
        return [e.job for e in self.jobs.values() if stream_path(e.job.spec.stream) == path]
