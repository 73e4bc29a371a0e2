"""The Consul backend of the registry (CASTMESH_REGISTRY=consul, agent at CONSUL_HTTP_ADDR), on py-consul's
asyncio client.

ConsulRegistry registers a node as a Consul service named after its role (castmesh-origin,
castmesh-edge, castmesh-ingest, castmesh-playback, castmesh-dispatch, castmesh-gateway, castmesh-worker),
with its public ports, role and zone in the service metadata and a gRPC health check on its own gRPC health
service (a relay's gRPC address; for ingest and
playback the port in meta["grpc"], where they serve only health); a node whose check
stays critical is deregistered by Consul after `deregister_after`, and a clean close deregisters at once.
Its load goes to the KV store (castmesh/load/{node id}) every `every` seconds.

ConsulNodes is what dispatch uses to know the nodes: blocking queries (index/wait) on the passing
instances of every castmesh service, compared by content (an index can move for unrelated reasons),
reconciled into the directory within a second or two of a change, and the loads read back from KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio

from castmesh.mesh import runtime
from castmesh.mesh.logs import event
from castmesh.proto.v1.dispatch_pb2 import (
    NODE_ROLE_DISPATCH,
    NODE_ROLE_EDGE,
    NODE_ROLE_GATEWAY,
    NODE_ROLE_INGEST,
    NODE_ROLE_ORIGIN,
    NODE_ROLE_PLAYBACK,
    NODE_ROLE_WORKER,
    Node,
    NodeLoad,
)

log = logging.getLogger("castmesh.consul")

SERVICE_NAMES = {NODE_ROLE_ORIGIN: "castmesh-origin", NODE_ROLE_EDGE: "castmesh-edge",
                 NODE_ROLE_INGEST: "castmesh-ingest", NODE_ROLE_PLAYBACK: "castmesh-playback",
                 NODE_ROLE_DISPATCH: "castmesh-dispatch", NODE_ROLE_GATEWAY: "castmesh-gateway",
                 NODE_ROLE_WORKER: "castmesh-worker"}
LOAD_PREFIX = "castmesh/load/"
WATCH_WAIT = "10s"
ERRORS = (consul.ConsulException, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)


def client_from_env(environ: dict[str, str] | None = None) -> consul.aio.Consul:
    """A client for the agent at CONSUL_HTTP_ADDR (host:port or a URL; default 127.0.0.1:8500)."""
    env = os.environ if environ is None else environ
    address = env.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    parts = urlsplit(address if "://" in address else f"http://{address}")
    return consul.aio.Consul(host=parts.hostname or "127.0.0.1", port=parts.port or 8500,
                             scheme=parts.scheme or "http", token=env.get("CONSUL_HTTP_TOKEN") or None)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class ConsulRegistry:
    def __init__(self, client: consul.aio.Consul, every: float = 2.0, interval: str = "1s",
                 deregister_after: str = "1m") -> None:
        self.client = client
        self.every = every
        self.interval = interval
        self.deregister_after = deregister_after
        self.nodes: list[Node] = []
        self.tasks: list[asyncio.Task[None]] = []

    def register(self, node: Node, load: Callable[[], NodeLoad]) -> None:
        self.nodes.append(node)
        self.tasks.append(asyncio.get_running_loop().create_task(self._hold(node, load)))

    async def _hold(self, node: Node, load: Callable[[], NodeLoad]) -> None:
        host, port = _host_port(node.address)
        meta = {**node.meta, "role": str(node.role), "zone": node.zone, "address": node.address}
        # the check calls the node's gRPC health service: its own address for gRPC nodes, meta["grpc"] for the rest
        health = f"{host}:{node.meta['grpc']}" if node.meta.get("grpc") else node.address
        check = consul.Check.grpc(health, self.interval, timeout="2s", deregister=self.deregister_after)
        registered = False
        while True:
            try:
                if not registered:
                    await self.client.agent.service.register(SERVICE_NAMES[node.role], service_id=node.id,
                                                             address=host, port=port, meta=meta, check=check,
                                                             tags=[node.zone] if node.zone else None)
                    registered = True
                    event(log, "consul.registered", node=node.id, service=SERVICE_NAMES[node.role])
                current = load()
                await self.client.kv.put(LOAD_PREFIX + node.id, json.dumps(
                    {"streams": current.streams, "subscribers": current.subscribers, "cpu": current.cpu}))
            except ERRORS as exc:
                registered = False  # the agent may have restarted and forgotten us: register again
                event(log, "consul.unreachable", level=logging.WARNING, node=node.id, error=str(exc)[:200])
            await asyncio.sleep(self.every)

    async def close(self) -> None:
        await runtime.cancel_all(self.tasks)
        for node in self.nodes:
            with contextlib.suppress(*ERRORS):
                await self.client.agent.service.deregister(node.id)
                await self.client.kv.delete(LOAD_PREFIX + node.id)
                event(log, "consul.deregistered", node=node.id)
        await self.client.close()


def node_of(entry: dict[str, object]) -> Node | None:
    """The Node a health entry describes, from the service's metadata; None if it is not one of ours."""
    service = entry.get("Service")
    if not isinstance(service, dict):
        return None
    meta = dict(service.get("Meta") or {})
    try:
        role = int(meta.pop("role"))
        address = meta.pop("address")
    except (KeyError, ValueError):
        return None
    zone = meta.pop("zone", "")
    return Node(id=service["ID"], role=role, address=address, zone=zone, meta=meta)  # type: ignore[arg-type]


class ConsulNodes:
    """Keeps a directory's nodes in step with Consul's passing instances (dispatch, with Consul)."""

    def __init__(self, client: consul.aio.Consul, add: Callable[[Node], Awaitable[None]],
                 remove: Callable[[str], Awaitable[None]], update_load: Callable[[str, NodeLoad], Awaitable[None]],
                 load_every: float = 1.0) -> None:
        self.client = client
        self.add, self.remove, self.update_load = add, remove, update_load
        self.load_every = load_every
        self.known: dict[str, dict[str, Node]] = {name: {} for name in SERVICE_NAMES.values()}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._watch(name)) for name in SERVICE_NAMES.values()]
        self.tasks.append(loop.create_task(self._loads()))

    async def _watch(self, name: str) -> None:
        index = None
        while True:
            try:
                index, entries = await self.client.health.service(name, passing=True, index=index, wait=WATCH_WAIT)
            except ERRORS as exc:
                event(log, "consul.watch_failed", level=logging.WARNING, service=name, error=str(exc)[:200])
                index = None
                await asyncio.sleep(1.0)
                continue
            nodes = {n.id: n for n in (node_of(e) for e in entries) if n is not None}
            await self._reconcile(name, nodes)

    async def _reconcile(self, name: str, nodes: dict[str, Node]) -> None:
        known = self.known[name]
        for node_id in [i for i in known if i not in nodes]:
            del known[node_id]
            await self.remove(node_id)
            event(log, "node.down", node=node_id, source="consul")
        for node_id, node in nodes.items():
            if known.get(node_id) != node:
                known[node_id] = node
                await self.add(node)
                event(log, "node.up", node=node_id, address=node.address, zone=node.zone, source="consul")

    async def _loads(self) -> None:
        while True:
            await asyncio.sleep(self.load_every)
            try:
                _, entries = await self.client.kv.get(LOAD_PREFIX, recurse=True)
            except ERRORS:
                continue
            for entry in entries or []:
                try:
                    load = json.loads(entry["Value"] or b"{}")
                    await self.update_load(entry["Key"][len(LOAD_PREFIX):], NodeLoad(
                        streams=int(load.get("streams", 0)), subscribers=int(load.get("subscribers", 0)),
                        cpu=float(load.get("cpu", 0.0))))
                except (ValueError, TypeError, AttributeError):
                    continue

    async def close(self) -> None:
        await runtime.cancel_all(self.tasks)
        await self.client.close()
