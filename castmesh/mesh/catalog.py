"""The live streams, for listings (the player page): which streams are published (dispatch's directory,
or the one relay when there is no dispatch) and what they carry (their origin relay's Stats: codecs,
size, bitrate), and the jobs that make streams of others (ABR ladders). One Stats call per origin, however
many streams it holds, and at most one listing a second (LISTING_TTL): every caller meanwhile, however
many player pages poll, shares the last one or the one in flight."""

from __future__ import annotations

import asyncio
import logging

import grpc
from async_lru import alru_cache

from castmesh.media.frames import stream_path
from castmesh.mesh import grpcutil
from castmesh.mesh.logs import event
from castmesh.proto.v1.dispatch_pb2 import (
    NODE_ROLE_WORKER,
    Job,
    ListJobsRequest,
    ListNodesRequest,
    ListStreamsRequest,
    Node,
)
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.relay_pb2 import StatsRequest, StreamStats
from castmesh.proto.v1.relay_pb2_grpc import RelayStub

log = logging.getLogger("castmesh.catalog")
TIMEOUT = 2.0
LISTING_TTL = 1.0


class Catalog:
    def __init__(self, dispatch: DispatchStub | None, relay: str = "") -> None:
        self.dispatch = dispatch
        self.relay = relay
        self.channels = grpcutil.ChannelPool()
        self.streams = alru_cache(maxsize=1, ttl=LISTING_TTL)(self._streams)
        self.jobs = alru_cache(maxsize=1, ttl=LISTING_TTL)(self._jobs)
        self.workers = alru_cache(maxsize=1, ttl=LISTING_TTL)(self._workers)

    async def _workers(self) -> list[Node]:
        """The live workers (they make thumbnails)."""
        if self.dispatch is None:
            return []
        try:
            reply = await self.dispatch.ListNodes(ListNodesRequest(), timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            event(log, "catalog.nodes_failed", level=logging.WARNING, error=exc.code().name)
            return []
        return [e.node for e in reply.nodes if e.node.role == NODE_ROLE_WORKER]

    async def _jobs(self) -> list[Job]:
        """The cluster's jobs (ABR ladders): which streams have renditions, and which streams are them."""
        if self.dispatch is None:
            return []
        try:
            return list((await self.dispatch.ListJobs(ListJobsRequest(), timeout=TIMEOUT)).jobs)
        except grpc.aio.AioRpcError as exc:
            event(log, "catalog.jobs_failed", level=logging.WARNING, error=exc.code().name)
            return []

    async def _streams(self) -> list[StreamStats]:
        """Every published stream (waiting for its publisher to come back included), sorted by path."""
        wanted: set[str] | None = None
        origins = {self.relay} if self.relay else set()
        if self.dispatch is not None:
            listed = await self.dispatch.ListStreams(ListStreamsRequest(), timeout=TIMEOUT)
            wanted = {stream_path(s.stream) for s in listed.streams}
            origins = {s.origin for s in listed.streams if s.origin}
        replies = await asyncio.gather(*(self._stats(origin) for origin in sorted(origins)))
        found = {stream_path(s.stream): s for reply in replies for s in reply
                 if not s.pulled and (wanted is None or stream_path(s.stream) in wanted)}
        return [found[path] for path in sorted(found)]

    async def _stats(self, origin: str) -> list[StreamStats]:
        try:
            return list((await RelayStub(self.channels.get(origin)).Stats(StatsRequest(), timeout=TIMEOUT)).streams)
        except grpc.aio.AioRpcError as exc:
            event(log, "catalog.stats_failed", level=logging.WARNING, relay=origin, error=exc.code().name)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.channels.forget(origin)
            return []

    async def close(self) -> None:
        await self.streams.cache_close()
        await self.jobs.cache_close()
        await self.workers.cache_close()
        await self.channels.close()
