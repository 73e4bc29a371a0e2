"""Publish leases as ingest sees them: permission to publish a stream, and the origin to publish into.

DispatchLease holds a Dispatch.Lease call: one publisher per stream cluster-wide, released when the call
ends (so it dies with this process). FixedLease is for a single relay given by --relay: that relay alone
decides whether the stream is taken.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from castmesh.proto.v1.dispatch_pb2 import LeaseReply, LeaseRequest
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.media_pb2 import StreamKey


class LeaseRefused(Exception):
    pass


class Lease(Protocol):
    async def acquire(self) -> str:
        """The origin to publish into; LeaseRefused if the stream is taken or no origin is alive."""

    async def relocate(self, failed_origin: str) -> str:
        """A new origin after `failed_origin` died; LeaseRefused if there is none."""

    def release(self) -> None: ...


class FixedLease:
    def __init__(self, relay: str) -> None:
        self.relay = relay

    async def acquire(self) -> str:
        return self.relay

    async def relocate(self, failed_origin: str) -> str:
        return self.relay  # nowhere else to go: try the same relay again

    def release(self) -> None:
        pass


class DispatchLease:
    def __init__(self, dispatch: DispatchStub, key: StreamKey, holder: str, client_addr: str) -> None:
        self.call = dispatch.Lease()
        self.claim = LeaseRequest(claim=LeaseRequest.Claim(stream=key, holder=holder, client_addr=client_addr))

    async def _answer(self, request: LeaseRequest) -> str:
        try:
            await self.call.write(request)
            reply = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise LeaseRefused(f"dispatch unavailable: {exc.code().name}") from exc
        if reply is grpc.aio.EOF:
            raise LeaseRefused("dispatch ended the lease")
        assert isinstance(reply, LeaseReply)
        if reply.HasField("rejected"):
            holder = f" (held by {reply.rejected.holder})" if reply.rejected.holder else ""
            raise LeaseRefused(reply.rejected.detail + holder)
        return reply.granted.origin

    async def acquire(self) -> str:
        return await self._answer(self.claim)

    async def relocate(self, failed_origin: str) -> str:
        return await self._answer(LeaseRequest(relocate=LeaseRequest.Relocate(failed_origin=failed_origin)))

    def release(self) -> None:
        self.call.cancel()
