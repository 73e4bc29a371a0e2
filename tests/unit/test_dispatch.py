"""Dispatch over real gRPC on loopback: leases, registration, placement, locate, watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from castmesh.media.frames import stream_key
from castmesh.proto.v1.dispatch_pb2 import (
    NODE_ROLE_EDGE,
    NODE_ROLE_ORIGIN,
    LeaseRequest,
    ListNodesRequest,
    ListStreamsRequest,
    LocateRequest,
    Node,
    NodeLoad,
    NodeReport,
    StreamChange,
)
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub, add_DispatchServicer_to_server
from services.dispatch import service as dispatch_service
from services.dispatch.directory import InMemoryDirectory
from services.dispatch.placement import pick_edge
from services.dispatch.service import DispatchService
from services.ingest import lease


async def _node_reports(node: Node, load: NodeLoad, stop: asyncio.Event) -> AsyncIterator[NodeReport]:
    yield NodeReport(hello=node)
    yield NodeReport(load=load)
    await stop.wait()


def run(scenario):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        server, port, _ = await dispatch_service.start("127.0.0.1", 0, InMemoryDirectory(affinity=5))
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            return await scenario(DispatchStub(chan))
        finally:
            await chan.close()
            await server.stop(None)

    return asyncio.run(main())


async def register(stub: DispatchStub, node: Node, streams: int = 0) -> tuple[grpc.aio.StreamStreamCall, asyncio.Event]:
    stop = asyncio.Event()
    call = stub.Register(_node_reports(node, NodeLoad(streams=streams), stop))
    assert (await call.read()).accepted
    for _ in range(50):
        nodes = (await stub.ListNodes(ListNodesRequest())).nodes
        if any(e.node.id == node.id and e.load.streams == streams for e in nodes):
            break
        await asyncio.sleep(0.01)
    return call, stop


def claim(name: str, holder: str) -> LeaseRequest:
    return LeaseRequest(claim=LeaseRequest.Claim(stream=stream_key("live", name), holder=holder))


def test_one_publisher_per_stream_and_the_lease_dies_with_its_holder() -> None:
    async def scenario(stub: DispatchStub) -> None:
        await register(stub, Node(id="o1", role=NODE_ROLE_ORIGIN, address="10.0.0.1:1"))
        first = stub.Lease()
        await first.write(claim("x", "ingest-a"))
        granted = await first.read()
        assert granted.granted.origin == "10.0.0.1:1"
        second = stub.Lease()
        await second.write(claim("x", "ingest-b"))
        refused = await second.read()
        assert refused.HasField("rejected") and refused.rejected.holder == "ingest-a"
        first.cancel()  # the holder dies
        for _ in range(100):
            if not (await stub.ListStreams(ListStreamsRequest())).streams:
                break
            await asyncio.sleep(0.01)
        third = stub.Lease()
        await third.write(claim("x", "ingest-b"))
        assert (await third.read()).HasField("granted")
        third.cancel()

    run(scenario)


def test_origins_are_chosen_by_load_and_a_relocate_avoids_the_failed_one() -> None:
    async def scenario(stub: DispatchStub) -> None:
        await register(stub, Node(id="busy", role=NODE_ROLE_ORIGIN, address="busy:1"), streams=9)
        await register(stub, Node(id="idle", role=NODE_ROLE_ORIGIN, address="idle:1"), streams=1)
        lease = stub.Lease()
        await lease.write(claim("y", "ingest"))
        assert (await lease.read()).granted.origin == "idle:1"
        await lease.write(LeaseRequest(relocate=LeaseRequest.Relocate(failed_origin="idle:1")))
        assert (await lease.read()).granted.origin == "busy:1"
        located = await stub.Locate(LocateRequest(stream=stream_key("live", "y")))
        assert located.found and located.origin == "busy:1" and located.edge == ""
        assert not (await stub.Locate(LocateRequest(stream=stream_key("live", "y"), avoid=["busy:1"]))).found
        lease.cancel()

    run(scenario)


def test_locate_gives_the_zone_edge_and_registration_dies_with_the_node() -> None:
    async def scenario(stub: DispatchStub) -> None:
        await register(stub, Node(id="o", role=NODE_ROLE_ORIGIN, address="o:1"))
        edge_call, _ = await register(stub, Node(id="e-a", role=NODE_ROLE_EDGE, address="ea:1", zone="a"))
        lease = stub.Lease()
        await lease.write(claim("z", "ingest"))
        await lease.read()
        key = stream_key("live", "z")
        assert (await stub.Locate(LocateRequest(stream=key, zone="a"))).edge == "ea:1"
        assert (await stub.Locate(LocateRequest(stream=key, zone="b"))).edge == ""  # no edge there: origin
        assert (await stub.Locate(LocateRequest(stream=key, zone="a", origin_only=True))).edge == ""
        edge_call.cancel()  # the edge dies
        for _ in range(100):
            if (await stub.Locate(LocateRequest(stream=key, zone="a"))).edge == "":
                break
            await asyncio.sleep(0.01)
        assert (await stub.Locate(LocateRequest(stream=key, zone="a"))).edge == ""
        lease.cancel()

    run(scenario)


def test_watch_streams_sees_publish_move_and_unpublish() -> None:
    async def scenario(stub: DispatchStub) -> list[int]:
        await register(stub, Node(id="o1", role=NODE_ROLE_ORIGIN, address="o1:1"))
        await register(stub, Node(id="o2", role=NODE_ROLE_ORIGIN, address="o2:1"))
        watch = stub.WatchStreams(ListStreamsRequest())
        lease = stub.Lease()
        await lease.write(claim("w", "ingest"))
        first = (await lease.read()).granted.origin
        await lease.write(LeaseRequest(relocate=LeaseRequest.Relocate(failed_origin=first)))
        await lease.read()
        lease.cancel()
        kinds = []
        for _ in range(3):
            change = await asyncio.wait_for(watch.read(), 5)
            kinds.append(change.kind)
        watch.cancel()
        return kinds

    assert run(scenario) == [StreamChange.KIND_PUBLISHED, StreamChange.KIND_MOVED, StreamChange.KIND_UNPUBLISHED]


def test_rendezvous_edges_are_stable_and_spread() -> None:
    nodes = [(Node(id=f"e{i}", role=NODE_ROLE_EDGE, address=f"e{i}:1", zone="a"), NodeLoad()) for i in range(4)]
    picks = {s: pick_edge(nodes, "a", s, set()) for s in (f"live/s{i}" for i in range(200))}
    assert all(pick_edge(nodes, "a", s, set()) == node for s, node in picks.items())  # every playback agrees
    assert len({n.id for n in picks.values() if n}) == 4
    # Losing one edge moves only its own streams.
    gone = nodes[0][0].address
    moved = [s for s, n in picks.items() if n and n.address != gone and pick_edge(nodes, "a", s, {gone}) != n]
    assert moved == []


class SilentDispatch(DispatchService):
    """Takes Lease calls and never answers (a dispatch stuck behind its directory)."""

    def __init__(self) -> None:
        super().__init__(InMemoryDirectory())
        self.ended = asyncio.Event()

    async def Lease(self, request_iterator, context):  # type: ignore[no-untyped-def, override]
        try:
            async for _ in request_iterator:
                pass
        finally:
            self.ended.set()
        return
        yield


def test_a_lease_answer_that_never_comes_is_a_refusal_and_the_call_is_dropped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(lease, "ANSWER_TIMEOUT", 0.5)

    async def main() -> str:
        silent = SilentDispatch()
        server = grpc.aio.server()
        add_DispatchServicer_to_server(silent, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            held = lease.DispatchLease(DispatchStub(chan), stream_key("live", "x"), "ingest-1/rtmp-1", "")
            try:
                await asyncio.wait_for(held.reclaim("127.0.0.1:1"), 5)
            except lease.LeaseRefused as refused:
                await asyncio.wait_for(silent.ended.wait(), 5)  # dispatch saw the call go
                return str(refused)
            return "granted"
        finally:
            await chan.close()
            await server.stop(grace=0)

    assert asyncio.run(main()) == "dispatch did not answer within 0.5s"


def test_a_restarted_dispatch_holds_a_hinted_claim_until_its_origin_registers_again() -> None:
    """After a dispatch restart ingest claims again naming the origin it publishes into; the origin may
    register a moment later. The claim waits for it (instead of "no live origin relay", or another origin
    that would list the stream where it does not run)."""

    async def scenario(stub: DispatchStub) -> str:
        await register(stub, Node(id="other", role=NODE_ROLE_ORIGIN, address="other:1"))  # back first
        lease = stub.Lease()
        hinted = LeaseRequest.Claim(stream=stream_key("live", "h"), holder="ingest", origin_hint="mine:1")
        await lease.write(LeaseRequest(claim=hinted))
        answer = asyncio.ensure_future(lease.read())
        await asyncio.sleep(0.3)
        assert not answer.done()
        await register(stub, Node(id="mine", role=NODE_ROLE_ORIGIN, address="mine:1"))
        origin = (await asyncio.wait_for(answer, 5)).granted.origin
        lease.cancel()
        return origin

    assert run(scenario) == "mine:1"


def test_a_failed_origin_is_avoided_for_a_few_seconds_not_for_the_whole_lease(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One lease, two origins that each die and come back on the same address: the third relocate may go
    back to the first origin (it restarted); with the old set of every failed origin, it was refused."""
    monkeypatch.setattr(dispatch_service, "AVOID_FOR", 0.2)

    async def scenario(stub: DispatchStub) -> list[str]:
        await register(stub, Node(id="o1", role=NODE_ROLE_ORIGIN, address="o1:1"))
        await register(stub, Node(id="o2", role=NODE_ROLE_ORIGIN, address="o2:1"), streams=5)
        lease = stub.Lease()
        await lease.write(claim("a", "ingest"))
        origins = [(await lease.read()).granted.origin]
        for _ in range(2):
            await asyncio.sleep(0.3)
            await lease.write(LeaseRequest(relocate=LeaseRequest.Relocate(failed_origin=origins[-1])))
            reply = await lease.read()
            origins.append(reply.granted.origin or reply.rejected.detail)
        lease.cancel()
        return origins

    assert run(scenario) == ["o1:1", "o2:1", "o1:1"]


def test_the_same_holder_claiming_again_takes_over_and_the_old_call_does_not_release_it() -> None:
    """Ingest re-opens its lease while dispatch is still tearing the old call down: the new claim wins, and
    the old call's end must not remove it."""

    async def scenario(stub: DispatchStub) -> list[str]:
        await register(stub, Node(id="o1", role=NODE_ROLE_ORIGIN, address="o1:1"))
        old = stub.Lease()
        await old.write(claim("t", "ingest-1/rtmp-7"))
        assert (await old.read()).HasField("granted")
        new = stub.Lease()
        await new.write(claim("t", "ingest-1/rtmp-7"))
        assert (await new.read()).HasField("granted")
        old.cancel()
        await asyncio.sleep(0.3)  # the old call's release has run by now
        listed = [info.holder for info in (await stub.ListStreams(ListStreamsRequest())).streams]
        new.cancel()
        return listed

    assert run(scenario) == ["ingest-1/rtmp-7"]


def test_an_origin_that_dies_while_dispatch_restarts_is_still_replaced() -> None:
    """Ingest's relocate on a lease whose call broke (dispatch restarted) claims again, at the new
    dispatch, for an origin other than the failed one; it used to be refused until the keeper had
    re-claimed, which it could not do for the dead origin."""

    async def main() -> str:
        server, port, _ = await dispatch_service.start("127.0.0.1", 0, InMemoryDirectory())
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = DispatchStub(chan)
        try:
            await register(stub, Node(id="o1", role=NODE_ROLE_ORIGIN, address="o1:1"))
            held = lease.DispatchLease(stub, stream_key("live", "r"), "ingest-1/rtmp-1", "")
            assert await held.acquire() == "o1:1"
            await server.stop(None)  # dispatch goes away...
            await asyncio.wait_for(held.lost.wait(), 5)
            server, _, _ = await dispatch_service.start("127.0.0.1", port, InMemoryDirectory())  # ...and comes back
            await register(stub, Node(id="o1", role=NODE_ROLE_ORIGIN, address="o1:1"))  # still registered there
            await register(stub, Node(id="o2", role=NODE_ROLE_ORIGIN, address="o2:1"), streams=3)
            origin = await asyncio.wait_for(held.relocate("o1:1"), 5)  # o1 died meanwhile
            listed = (await stub.ListStreams(ListStreamsRequest())).streams
            assert [info.origin for info in listed] == ["o2:1"]
            held.release()
            return origin
        finally:
            await chan.close()
            await server.stop(None)

    assert asyncio.run(main()) == "o2:1"
