"""Service registration: the one Registry interface, and the backend for clusters without Consul, which
registers with the dispatch service over Dispatch.Register.

A registration is a held call: the node is listed while the call is open and reports its load every
`every` seconds. If dispatch goes away, the registration is made again until it is closed: the call waits
for the channel to connect (gRPC wait_for_ready), so it goes out as soon as the channel reaches a restarted
dispatch (within the reconnect backoff set in grpcutil). The backoff here only spaces out registrations
that dispatch refused or that broke after connecting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from castmesh.mesh import runtime
from castmesh.mesh.logs import event
from castmesh.proto.v1.dispatch_pb2 import Node, NodeLoad, NodeReport
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub

log = logging.getLogger("castmesh.registry")


class Registry(Protocol):
    def register(self, node: Node, load: Callable[[], NodeLoad]) -> None:
        """Keep `node` registered, reporting `load()`, until close()."""

    async def close(self) -> None: ...


class DispatchRegistry:
    def __init__(self, dispatch: DispatchStub, every: float = 1.0) -> None:
        self.dispatch = dispatch
        self.every = every
        self.tasks: list[asyncio.Task[None]] = []

    def register(self, node: Node, load: Callable[[], NodeLoad]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self._hold(node, load)))

    async def _reports(self, node: Node, load: Callable[[], NodeLoad]) -> AsyncIterator[NodeReport]:
        yield NodeReport(hello=node)
        while True:
            await asyncio.sleep(self.every)
            yield NodeReport(load=load())

    async def _hold(self, node: Node, load: Callable[[], NodeLoad]) -> None:
        backoff = 0.2
        while True:
            try:
                call = self.dispatch.Register(self._reports(node, load), wait_for_ready=True)
                async for reply in call:
                    if not reply.accepted:
                        event(log, "register.refused", level=logging.ERROR, node=node.id, detail=reply.detail)
                        return
                    backoff = 0.2
            except grpc.aio.AioRpcError as exc:
                event(log, "register.lost", level=logging.WARNING, node=node.id, error=exc.code().name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self) -> None:
        await runtime.cancel_all(self.tasks)
