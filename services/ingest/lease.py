"""Publish leases as ingest sees them: permission to publish a stream, and the origin to publish into.

DispatchLease holds a Dispatch.Lease call: one publisher per stream cluster-wide, released when the call
ends (so it dies with this process). If the call breaks on dispatch's side (dispatch restarted), `lost`
is set and the owner re-claims with `reclaim(origin_hint)`, so the stream is listed again where it runs.
A claim made again waits for dispatch to be reachable (gRPC wait_for_ready, within ANSWER_TIMEOUT), so it
goes out the moment dispatch is back. A relocate on a lost lease claims again first, so an origin that
dies while dispatch restarts is still replaced. One request at a time: the keeper's reclaim and a
failover's relocate never interleave on the call.
An answer that does not come within ANSWER_TIMEOUT is a refusal (and the call is dropped), so a dispatch
that accepted a call but never answers cannot hold a publish or its failover for ever.
FixedLease is for a single relay given by --relay: that relay alone decides whether the stream is taken.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc

from castmesh.mesh.channels import LeaseClient, ProtocolError
from castmesh.proto.v1.dispatch_pb2 import LeaseReply, LeaseRequest
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.media_pb2 import StreamKey

ANSWER_TIMEOUT = 5.0  # a claim at a Consul-backed dispatch is a few Consul round trips

class LeaseRefused(Exception):
    pass


class Lease(Protocol):
    lost: asyncio.Event

    async def acquire(self) -> str:
        """The origin to publish into; LeaseRefused if the stream is taken or no origin is alive."""

    async def relocate(self, failed_origin: str) -> str:
        """A new origin after `failed_origin` died; LeaseRefused if there is none."""

    async def reclaim(self, origin_hint: str) -> str:
        """Claim again after the lease was lost; the origin granted (the hint, if it is alive)."""

    def release(self) -> None: ...


class FixedLease:
    def __init__(self, relay: str) -> None:
        self.relay = relay
        self.lost = asyncio.Event()  # never set: there is no lease to lose

    async def acquire(self) -> str:
        return self.relay

    async def relocate(self, failed_origin: str) -> str:
        return self.relay  # nowhere else to go: try the same relay again

    async def reclaim(self, origin_hint: str) -> str:
        return self.relay

    def release(self) -> None:
        pass


class DispatchLease:
    """The asyncio adapter of a Dispatch.Lease call around its sans-IO side (castmesh.mesh.channels.LeaseClient):
    one question at a time, one reader per call."""

    def __init__(self, dispatch: DispatchStub, key: StreamKey, holder: str, client_addr: str, job: str = "") -> None:
        self.dispatch = dispatch
        # job: a worker's lease on a job (its id), not a publish: granted with no origin
        self.claim = LeaseRequest.Claim(stream=key, holder=holder, client_addr=client_addr, job=job)
        self.lost = asyncio.Event()
        self.call: grpc.aio.StreamStreamCall | None = None
        self.protocol = LeaseClient()
        self.answer: asyncio.Future[LeaseReply | None] | None = None  # the question being asked
        self.reader: asyncio.Task[None] | None = None
        self.released = False
        self.busy = asyncio.Lock()

    def _open(self, wait_for_ready: bool = False) -> grpc.aio.StreamStreamCall:
        if self.released:
            raise LeaseRefused("the lease was let go")  # a late reclaim never takes it again
        if self.reader is not None:
            self.reader.cancel()
        if self.call is not None:
            self.call.cancel()
        self.lost.clear()
        self.protocol = LeaseClient()
        self.call = self.dispatch.Lease(wait_for_ready=wait_for_ready)
        self.reader = asyncio.get_running_loop().create_task(self._read(self.call, self.protocol))
        return self.call

    async def _read(self, call: grpc.aio.StreamStreamCall, protocol: LeaseClient) -> None:
        """The one reader of the call: answers go to the question asked; the call's end sets `lost`."""

        def answer(reply: LeaseReply | None) -> None:
            if call is self.call and self.answer is not None and not self.answer.done():
                self.answer.set_result(reply)  # not a newer call's question: that one has its own reader

        why = "dispatch unavailable or ended the lease"
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                answer(protocol.receive(reply))
        except grpc.aio.AioRpcError:
            pass
        except ProtocolError as exc:
            why = f"dispatch broke the lease protocol: {exc}"
            call.cancel()
        finally:
            if protocol.broken(why):
                answer(None)
        if call is self.call and not self.released:
            self.lost.set()

    async def _answer(self, call: grpc.aio.StreamStreamCall, request: LeaseRequest) -> str:
        try:
            message = self.protocol.ask(request)
        except ProtocolError as exc:
            raise LeaseRefused(f"dispatch unavailable: {exc}") from None
        self.answer = answer = asyncio.get_running_loop().create_future()

        async def ask() -> LeaseReply | None:
            await call.write(message)
            return await answer

        try:
            reply = await asyncio.wait_for(ask(), ANSWER_TIMEOUT)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise LeaseRefused(f"dispatch unavailable: {exc}") from exc
        except TimeoutError:
            call.cancel()
            raise LeaseRefused(f"dispatch did not answer within {ANSWER_TIMEOUT:g}s") from None
        if reply is None:
            raise LeaseRefused("dispatch unavailable or ended the lease")
        if reply.HasField("rejected"):
            holder = f" (held by {reply.rejected.holder})" if reply.rejected.holder else ""
            raise LeaseRefused(reply.rejected.detail + holder)
        return reply.granted.origin

    async def acquire(self) -> str:
        async with self.busy:
            return await self._answer(self._open(), LeaseRequest(claim=self.claim))

    async def relocate(self, failed_origin: str) -> str:
        async with self.busy:
            if self.call is None or self.lost.is_set():  # dispatch restarted: claim again, anywhere
                origin = await self._claim_again("")
                if origin != failed_origin:
                    return origin
            assert self.call is not None
            request = LeaseRequest(relocate=LeaseRequest.Relocate(failed_origin=failed_origin))
            return await self._answer(self.call, request)

    async def reclaim(self, origin_hint: str) -> str:
        async with self.busy:
            return await self._claim_again(origin_hint)

    async def _claim_again(self, origin_hint: str) -> str:
        claim = LeaseRequest.Claim()
        claim.CopyFrom(self.claim)
        claim.origin_hint = origin_hint
        return await self._answer(self._open(wait_for_ready=True), LeaseRequest(claim=claim))

    def release(self) -> None:
        self.released = True
        if self.call is not None:
            self.call.cancel()
        if self.reader is not None:
            self.reader.cancel()
