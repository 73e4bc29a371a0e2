"""Dispatch's stream directory in Consul (CASTMESH_REGISTRY=consul): one KV entry per stream
(castmesh/streams/{vhost/app/name}, the StreamInfo as JSON), held by a Consul session per publish lease.

The session is bound to the publishing ingest's own Consul check (service:{ingest node id}) as well as to
a TTL that this dispatch renews, with Behavior "delete": if the ingest dies, Consul deletes its streams by
itself, even when no dispatch is alive to notice; if this dispatch dies, its sessions expire. A holder
that claims again after a dispatch restart (the same ingest session) takes its entry over.

Consul is the source of truth for streams: a blocking query on the prefix keeps a local copy, and every
difference it sees (whoever made it) becomes a StreamChange for watchers. Nodes, loads and the recent
origins used for affinity stay in memory (InMemoryDirectory), fed by ConsulNodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import consul
import consul.aio
from google.protobuf import json_format

from castmesh.media.frames import stream_path
from castmesh.mesh import runtime
from castmesh.mesh.consul import ERRORS
from castmesh.mesh.logs import event
from castmesh.proto.v1.dispatch_pb2 import Node, NodeLoad, StreamChange, StreamInfo
from castmesh.proto.v1.media_pb2 import StreamKey
from services.dispatch.directory import InMemoryDirectory, WatchHub

log = logging.getLogger("castmesh.dispatch")

PREFIX = "castmesh/streams/"
SESSION_TTL = 15  # seconds; renewed every third of it


def _encode(info: StreamInfo) -> str:
    return json_format.MessageToJson(info, indent=None)


def _decode(value: bytes | None) -> StreamInfo | None:
    try:
        return json_format.Parse(value or b"", StreamInfo())
    except json_format.ParseError:
        return None


class ConsulDirectory:
    def __init__(self, client: consul.aio.Consul, affinity: float = 10.0) -> None:
        self.client = client
        self.memory = InMemoryDirectory(affinity)  # nodes, loads, recent origins
        # stream path -> the Consul session holding it for this dispatch, and the claim it holds
        self.sessions: dict[str, tuple[str, StreamInfo]] = {}
        self.cache: dict[str, StreamInfo] = {}
        self.hub = WatchHub()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._follow()), loop.create_task(self._renew())]

    # Streams --------------------------------------------------------------------------------------------

    async def claim(self, key: StreamKey, holder: str, client_addr: str) -> tuple[bool, StreamInfo]:
        path = stream_path(key)
        info = StreamInfo(stream=key, holder=holder, client_addr=client_addr, since_us=_now_us())
        session = await self._session(holder)
        if await self.client.kv.put(PREFIX + path, _encode(info), acquire=session):
            self.sessions[path] = (session, info)
            return True, info
        _, entry = await self.client.kv.get(PREFIX + path)
        current = _decode(entry["Value"]) if entry else None
        if current is not None and current.holder == holder and entry.get("Session"):
            # the same publish session claiming again (this dispatch restarted): it takes its entry over,
            # where it runs, so the stream stays listed until the claim names its origin again
            info.origin = current.origin
            await self.client.session.destroy(entry["Session"])
            if await self.client.kv.put(PREFIX + path, _encode(info), acquire=session):
                self.sessions[path] = (session, info)
                event(log, "lease.taken_over", stream=path, holder=holder)
                return True, info
        await self.client.session.destroy(session)
        return False, current or StreamInfo(stream=key)

    async def _session(self, holder: str) -> str:
        """A session for `holder`, bound to its ingest's Consul check when that check exists and passes."""
        ingest = holder.split("/", 1)[0]
        try:
            return await self.client.session.create(name=f"castmesh lease {holder}", behavior="delete",
                                                    ttl=SESSION_TTL, lock_delay=0,
                                                    checks=["serfHealth", f"service:{ingest}"])
        except consul.ConsulException:  # that ingest is not in Consul (or not passing): TTL only
            return await self.client.session.create(name=f"castmesh lease {holder}", behavior="delete",
                                                    ttl=SESSION_TTL, lock_delay=0)

    async def set_origin(self, key: StreamKey, holder: str, origin: str) -> None:
        path = stream_path(key)
        held = self.sessions.get(path)
        info = await self.get(key)
        if held is None or info is None or info.holder != holder:
            return
        info.origin = origin
        await self.client.kv.put(PREFIX + path, _encode(info), acquire=held[0])
        self._apply(path, info)

    async def release(self, key: StreamKey, claim: StreamInfo) -> None:
        path = stream_path(key)
        held = self.sessions.get(path)
        if held is None or held[1] is not claim:
            return  # released already, or taken over by a newer claim of the same holder
        session = self.sessions.pop(path)[0]
        info = self.cache.get(path)
        with contextlib.suppress(*ERRORS):
            await self.client.session.destroy(session)  # Behavior "delete": the entry goes with it
        if info is not None and info.origin:
            await self.memory.remember(key, info.origin)
        self._apply(path, None)

    async def get(self, key: StreamKey) -> StreamInfo | None:
        _, entry = await self.client.kv.get(PREFIX + stream_path(key))
        return _decode(entry["Value"]) if entry else None

    async def streams(self) -> list[StreamInfo]:
        _, entries = await self.client.kv.get(PREFIX, recurse=True)
        found = [_decode(e["Value"]) for e in entries or []]
        return [info for info in found if info is not None and info.origin]

    async def recent_origin(self, key: StreamKey) -> str | None:
        return await self.memory.recent_origin(key)

    def watch(self) -> AsyncIterator[StreamChange]:
        return self.hub.watch(self.cache.values)

    async def _follow(self) -> None:
        """Keep the local copy in step with Consul, whoever changes it (this dispatch, another, Consul)."""
        index = None
        while True:
            try:
                index, entries = await self.client.kv.get(PREFIX, recurse=True, index=index, wait="10s")
            except ERRORS as exc:
                event(log, "consul.watch_failed", level=logging.WARNING, prefix=PREFIX, error=str(exc)[:200])
                index = None
                await asyncio.sleep(1.0)
                continue
            now = {e["Key"][len(PREFIX):]: info for e in entries or [] if (info := _decode(e["Value"])) is not None}
            for path in [p for p in self.cache if p not in now]:
                self._apply(path, None)
            for path, info in now.items():
                self._apply(path, info)

    def _apply(self, path: str, info: StreamInfo | None) -> None:
        """Record what Consul says of `path` and tell watchers what changed."""
        before = self.cache.get(path)
        if info is None:
            if before is None:
                return
            del self.cache[path]
            if before.origin:
                self.hub.notify(StreamChange.KIND_UNPUBLISHED, before)
            if path in self.sessions:  # Consul ended a lease this dispatch held (its ingest died)
                # The session itself is forgotten by _renew when Consul says it is gone: this answer may
                # predate a claim that just took the entry over (destroy, then acquire anew).
                event(log, "lease.released_by_consul", stream=path, holder=before.holder)
            return
        if before == info:
            return
        self.cache[path] = info
        if info.origin and (before is None or not before.origin):
            self.hub.notify(StreamChange.KIND_PUBLISHED, info)
        elif info.origin and before is not None and before.origin != info.origin:
            self.hub.notify(StreamChange.KIND_MOVED, info)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(SESSION_TTL / 3)
            for path, (session, _) in list(self.sessions.items()):
                try:
                    await self.client.session.renew(session)
                except consul.NotFound:  # invalidated by Consul: the watch reports the release
                    if self.sessions.get(path, ("",))[0] == session:  # not a newer claim's session
                        del self.sessions[path]
                except ERRORS as exc:
                    event(log, "consul.renew_failed", level=logging.WARNING, stream=path, error=str(exc)[:200])

    # Nodes ----------------------------------------------------------------------------------------------

    async def add_node(self, node: Node) -> None:
        await self.memory.add_node(node)

    async def update_load(self, node_id: str, load: NodeLoad) -> None:
        await self.memory.update_load(node_id, load)

    async def remove_node(self, node_id: str) -> None:
        await self.memory.remove_node(node_id)

    async def nodes(self) -> list[tuple[Node, NodeLoad]]:
        return await self.memory.nodes()

    async def close(self) -> None:
        await runtime.cancel_all(self.tasks)
        for session, _ in list(self.sessions.values()):
            with contextlib.suppress(*ERRORS):
                await self.client.session.destroy(session)
        await self.client.close()


def _now_us() -> int:
    return time.time_ns() // 1000
