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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from castmesh.media.frames import stream_path
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


@dataclass(slots=True)
class _NodeEntry:
    node: Node
    load: NodeLoad


class InMemoryDirectory:
    def __init__(self, affinity: float = 10.0) -> None:
        self.affinity = affinity
        self._streams: dict[str, StreamInfo] = {}
        self._recent: dict[str, tuple[str, float]] = {}
        self._nodes: dict[str, _NodeEntry] = {}
        self._watchers: set[asyncio.Queue[StreamChange | None]] = set()

    # Streams --------------------------------------------------------------------------------------------

    async def claim(self, key: StreamKey, holder: str, client_addr: str) -> tuple[bool, StreamInfo]:
        path = stream_path(key)
        current = self._streams.get(path)
        if current is not None and current.holder != holder:
            return False, current
        info = StreamInfo(stream=key, holder=holder, client_addr=client_addr, since_us=time.time_ns() // 1000)
        self._streams[path] = info
        return True, info

    async def set_origin(self, key: StreamKey, holder: str, origin: str) -> None:
        info = self._streams.get(stream_path(key))
        if info is None or info.holder != holder:
            return
        moved = bool(info.origin)
        info.origin = origin
        self._notify(StreamChange.KIND_MOVED if moved else StreamChange.KIND_PUBLISHED, info)

    async def release(self, key: StreamKey, claim: StreamInfo) -> None:
        path = stream_path(key)
        info = self._streams.get(path)
        if info is not claim:
            return
        del self._streams[path]
        if info.origin:
            await self.remember(key, info.origin)
            self._notify(StreamChange.KIND_UNPUBLISHED, info)

    async def remember(self, key: StreamKey, origin: str) -> None:
        """Where a stream that just ended was, for `affinity` seconds (recent_origin)."""
        self._recent[stream_path(key)] = (origin, time.monotonic() + self.affinity)

    async def get(self, key: StreamKey) -> StreamInfo | None:
        return self._streams.get(stream_path(key))

    async def streams(self) -> list[StreamInfo]:
        return [info for info in self._streams.values() if info.origin]

    async def recent_origin(self, key: StreamKey) -> str | None:
        path = stream_path(key)
        entry = self._recent.get(path)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._recent[path]
            return None
        return entry[0]

    async def watch(self) -> AsyncIterator[StreamChange]:
        queue: asyncio.Queue[StreamChange | None] = asyncio.Queue(WATCH_QUEUE)
        self._watchers.add(queue)
        try:
            for info in list(self._streams.values()):
                if info.origin:
                    yield StreamChange(kind=StreamChange.KIND_PUBLISHED, stream=info)
            while (change := await queue.get()) is not None:
                yield change
        finally:
            self._watchers.discard(queue)

    def _notify(self, kind: StreamChange.Kind, info: StreamInfo) -> None:
        change = StreamChange(kind=kind, stream=info)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:  # a watcher that stopped reading is cut off, not buffered for
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

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
