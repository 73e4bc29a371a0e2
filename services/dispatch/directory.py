"""Dispatch's state: live nodes with their load, and streams with their publish lease and origin.

Directory is the one interface; InMemoryDirectory backs `castmesh up` and clusters without Consul;
ConsulDirectory (consul_directory.py: KV entries held by sessions) backs clusters with Consul.

Invariants: one holder per stream path; a stream leaves when its holder releases it. After a release,
the stream's origin is remembered for `affinity` seconds, so a publisher that reconnects is placed on the
relay where its viewers are still waiting. The same holder claiming again takes its entry over (its ingest
re-opened the lease while the old call was still being torn down), and a release ends only the claim it
names: the old call's release never removes the claim that replaced it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from castmesh.media.frames import stream_path
from castmesh.mesh.retry import Clock
from castmesh.proto.v1.dispatch_pb2 import Node, NodeLoad, StreamChange, StreamInfo
from castmesh.proto.v1.media_pb2 import StreamKey

WATCH_QUEUE = 1024  # changes a watcher may have unread before it is cut off


class Directory(Protocol):
    async def claim(self, key: StreamKey, holder: str, client_addr: str) -> tuple[bool, StreamInfo]: ...
    async def set_origin(self, key: StreamKey, holder: str, origin: str) -> None: ...
    async def release(self, key: StreamKey, claim: StreamInfo) -> None:
        """End `claim` (what claim() granted), unless another claim has replaced it since."""
    async def get(self, key: StreamKey) -> StreamInfo | None: ...
    async def streams(self) -> list[StreamInfo]: ...
    def watch(self) -> AsyncIterator[StreamChange]: ...
    async def recent_origin(self, key: StreamKey) -> str | None: ...
    async def add_node(self, node: Node) -> None: ...
    async def update_load(self, node_id: str, load: NodeLoad) -> None: ...
    async def remove_node(self, node_id: str) -> None: ...
    async def nodes(self) -> list[tuple[Node, NodeLoad]]: ...


class WatchHub:
    """Stream changes for every watcher (WatchStreams), each behind a bounded queue: a watcher that stops
    reading is cut off (its iterator ends, so its call ends) instead of being buffered for."""

    def __init__(self, limit: int = WATCH_QUEUE) -> None:
        self.limit = limit
        self.queues: set[asyncio.Queue[StreamChange | None]] = set()

    async def watch(self, current: Callable[[], Iterable[StreamInfo]]) -> AsyncIterator[StreamChange]:
        """The published streams of `current()` first, then every change."""
        queue: asyncio.Queue[StreamChange | None] = asyncio.Queue(self.limit)
        self.queues.add(queue)  # before the snapshot, so no change falls between the two
        try:
            for info in list(current()):
                if info.origin:
                    yield StreamChange(kind=StreamChange.KIND_PUBLISHED, stream=info)
            while (change := await queue.get()) is not None:
                yield change
        finally:
            self.queues.discard(queue)

    def notify(self, kind: StreamChange.Kind, info: StreamInfo) -> None:
        change = StreamChange(kind=kind, stream=info)
        for queue in list(self.queues):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:  # cut off: the sentinel takes the oldest change's place
                self.queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)


@dataclass(slots=True)
class _NodeEntry:
    node: Node
    load: NodeLoad


class InMemoryDirectory:
    def __init__(self, affinity: float = 10.0, clock: Clock = time.monotonic) -> None:
        self.affinity = affinity
        self.clock = clock
        self._streams: dict[str, StreamInfo] = {}
        self._recent: dict[str, tuple[str, float]] = {}  # path -> (origin, until), oldest first
        self._nodes: dict[str, _NodeEntry] = {}
        self.hub = WatchHub()

    # Streams --------------------------------------------------------------------------------------------

    async def claim(self, key: StreamKey, holder: str, client_addr: str) -> tuple[bool, StreamInfo]:
        path = stream_path(key)
        current = self._streams.get(path)
        if current is not None and current.holder != holder:
            return False, current
        info = StreamInfo(stream=key, holder=holder, client_addr=client_addr, since_us=time.time_ns() // 1000)
        if current is not None:  # the same holder again: it takes its entry over, still listed where it runs
            info.origin, info.since_us = current.origin, current.since_us
        self._streams[path] = info
        return True, info

    async def set_origin(self, key: StreamKey, holder: str, origin: str) -> None:
        info = self._streams.get(stream_path(key))
        if info is None or info.holder != holder:
            return
        if info.origin == origin:
            return  # a takeover where it already ran: nothing changed for watchers
        moved = bool(info.origin)
        info.origin = origin
        self.hub.notify(StreamChange.KIND_MOVED if moved else StreamChange.KIND_PUBLISHED, info)

    async def release(self, key: StreamKey, claim: StreamInfo) -> None:
        path = stream_path(key)
        info = self._streams.get(path)
        if info is not claim:
            return
        del self._streams[path]
        if info.origin:
            await self.remember(key, info.origin)
            self.hub.notify(StreamChange.KIND_UNPUBLISHED, info)

    async def remember(self, key: StreamKey, origin: str) -> None:
        """Where a stream that just ended was, for `affinity` seconds (recent_origin). Each release also
        forgets the releases older than that, so the memory holds one affinity period of them."""
        now = self.clock()
        path = stream_path(key)
        recent = self._recent
        recent.pop(path, None)  # insertion order is expiry order: every entry lives `affinity`
        recent[path] = (origin, now + self.affinity)
        while (oldest := next(iter(recent))) != path and recent[oldest][1] < now:
            del recent[oldest]

    async def get(self, key: StreamKey) -> StreamInfo | None:
        return self._streams.get(stream_path(key))

    async def streams(self) -> list[StreamInfo]:
        return [info for info in self._streams.values() if info.origin]

    async def recent_origin(self, key: StreamKey) -> str | None:
        path = stream_path(key)
        entry = self._recent.get(path)
        if entry is None:
            return None
        if entry[1] < self.clock():
            del self._recent[path]
            return None
        return entry[0]

    def watch(self) -> AsyncIterator[StreamChange]:
        return self.hub.watch(self._streams.values)

    # Nodes ----------------------------------------------------------------------------------------------

    async def add_node(self, node: Node) -> None:
        self._nodes[node.id] = _NodeEntry(node, NodeLoad())

    async def update_load(self, node_id: str, load: NodeLoad) -> None:
        entry = self._nodes.get(node_id)
        if entry is not None:
            entry.load = load

    async def remove_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    async def nodes(self) -> list[tuple[Node, NodeLoad]]:
        return [(e.node, e.load) for e in self._nodes.values()]
