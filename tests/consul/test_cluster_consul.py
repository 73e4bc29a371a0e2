"""The cluster with CASTMESH_REGISTRY=consul, against the Consul agent double: every node registers in
Consul with a gRPC health check, dispatch learns the nodes from Consul's passing list, a node killed -9
leaves that list (and dispatch's), a clean stop deregisters, and a relay started later is used without
restarting anything."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from castmesh.proto.v1.dispatch_pb2 import ListNodesRequest
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from tests.cluster.harness import Cluster
from tests.consul.double import ConsulDouble
from tests.integration.harness import decode, publish, wait_live


@pytest.fixture
def consul_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, ConsulDouble]]:
    agent = ConsulDouble(tmp_path)
    env = {"CASTMESH_REGISTRY": "consul", "CONSUL_HTTP_ADDR": f"127.0.0.1:{agent.port}"}
    cluster = Cluster(tmp_path, env=env)
    yield cluster, agent
    cluster.stop()
    agent.stop()


def listed(cluster: Cluster) -> list[str]:
    with grpc.insecure_channel(cluster.dispatch) as chan:
        return sorted(e.node.id for e in DispatchStub(chan).ListNodes(ListNodesRequest(), timeout=5).nodes)


def until(probe, want, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    got = probe()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = probe()
    return got


def test_nodes_register_in_consul_and_dispatch_follows_its_passing_list(consul_cluster) -> None:
    cluster, agent = consul_cluster
    origin = cluster.relay("origin-1")
    rtmp = cluster.ingest()
    http = cluster.playback()
    port = origin.rsplit(":", 1)[1]
    origin_id, ingest_id, playback_id = f"relay-origin-{port}", f"ingest-{rtmp}", f"playback-{http}"
    assert until(lambda: agent.passing("castmesh-origin"), [origin_id]) == [origin_id]
    assert until(lambda: agent.passing("castmesh-ingest"), [ingest_id]) == [ingest_id]
    assert until(lambda: agent.passing("castmesh-playback"), [playback_id]) == [playback_id]
    entry = agent.get("/v1/health/service/castmesh-playback?passing")[0]  # type: ignore[index]
    assert entry["Service"]["Meta"]["http"] == str(http) and entry["Service"]["Meta"]["grpc"]
    assert entry["Checks"][1]["Output"].startswith("gRPC health: SERVING")
    dispatch_id = f"dispatch-{cluster.dispatch_port}"
    assert until(lambda: agent.passing("castmesh-dispatch"), [dispatch_id]) == [dispatch_id]  # it registers too
    everyone = sorted([origin_id, ingest_id, playback_id, dispatch_id])
    assert until(lambda: listed(cluster), everyone) == everyone
    assert "source=consul" in cluster.nodes["dispatch"].log()

    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/through-consul", 6, gop=30)
    try:
        url = f"http://127.0.0.1:{http}/live/through-consul.flv"
        wait_live(url)
        counts, errors = decode(url, timeout=30)
        assert errors == "" and counts.get(0, 0) > 60
    finally:
        publisher.kill()
        publisher.wait()

    cluster.nodes["playback"].stop()  # a clean stop deregisters at once, not after the critical timeout
    assert until(lambda: [e["ID"] for e in agent.get("/v1/agent/services").values()  # type: ignore[union-attr]
                          if e["Service"] == "castmesh-playback"], []) == []


def test_a_node_killed_leaves_the_passing_list_and_a_new_relay_is_used_without_restart(consul_cluster) -> None:
    cluster, agent = consul_cluster
    first = cluster.relay("origin-1")
    rtmp = cluster.ingest()
    cluster.playback()
    cluster.wait_registered()
    first_id = f"relay-origin-{first.rsplit(':', 1)[1]}"
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/early", 40, gop=30)
    try:
        assert until(lambda: cluster.origin_of("early"), first) == first
        time.sleep(3)  # let origin-1's load (one stream) reach Consul's KV and dispatch
        second = cluster.relay("origin-2")  # nothing else restarts
        second_id = f"relay-origin-{second.rsplit(':', 1)[1]}"
        assert until(lambda: agent.passing("castmesh-origin"), sorted([first_id, second_id])) == sorted(
            [first_id, second_id])
        assert until(lambda: second_id in listed(cluster), True) is True  # dispatch saw it in Consul
        late = publish(f"rtmp://127.0.0.1:{rtmp}/live/late", 10, gop=30)
        try:
            assert until(lambda: cluster.origin_of("late"), second) == second  # the least loaded origin
        finally:
            late.kill()
            late.wait()

        cluster.kill9("origin-2")
        assert until(lambda: agent.passing("castmesh-origin"), [first_id]) == [first_id]
        assert until(lambda: second_id in listed(cluster), False) is False
    finally:
        publisher.kill()
        publisher.wait()


def stream_entry(agent: ConsulDouble, path: str) -> dict | None:  # type: ignore[type-arg]
    try:
        entries = agent.get(f"/v1/kv/castmesh/streams/__defaultVhost__/{path}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    assert isinstance(entries, list)
    return entries[0]


def test_consul_releases_the_streams_of_a_dead_ingest_even_with_dispatch_dead_too(consul_cluster) -> None:
    cluster, agent = consul_cluster
    rtmp, http = cluster.simple()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/held", 30, gop=30)
    try:
        wait_live(f"http://127.0.0.1:{http}/live/held.flv")
        entry = stream_entry(agent, "live/held")
        assert entry is not None and entry["Session"]
        info = json.loads(base64.b64decode(entry["Value"]))
        assert info["holder"].startswith(f"ingest-{rtmp}/") and info["origin"]
        session = agent.get(f"/v1/session/info/{entry['Session']}")[0]  # type: ignore[index]
        assert session["Behavior"] == "delete"

        cluster.kill9("dispatch")  # nobody left to release the lease over gRPC
        cluster.kill9("ingest")
        assert until(lambda: stream_entry(agent, "live/held"), None, timeout=10) is None  # Consul did it
    finally:
        publisher.kill()
        publisher.wait()

    cluster.start("dispatch-again", ["serve", "dispatch", "--host", "127.0.0.1", "--grpc-port",
                                     str(cluster.dispatch_port)])
    rtmp2 = cluster.ingest("ingest-2")
    second = publish(f"rtmp://127.0.0.1:{rtmp2}/live/held", 20, gop=30)  # the name is free again
    try:
        def holder() -> str:
            entry = stream_entry(agent, "live/held")
            return json.loads(base64.b64decode(entry["Value"]))["holder"].split("/")[0] if entry else ""

        assert until(holder, f"ingest-{rtmp2}", timeout=15) == f"ingest-{rtmp2}"
        counts, errors = decode(f"http://127.0.0.1:{http}/live/held.flv", timeout=30, seconds=3)  # (not to its end)
        assert errors == "" and counts.get(0, 0) > 30
    finally:
        second.kill()
        second.wait()
