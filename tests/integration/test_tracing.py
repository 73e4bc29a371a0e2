"""Tracing through the one setup module, checked with a real OTLP/gRPC receiver: every service exports
its gRPC calls, client and server, under its own service name; with no endpoint nothing is set up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from castmesh.mesh import tracing
from tests.cluster.harness import Cluster
from tests.integration.harness import publish, wait_live
from tests.otlp_receiver import Receiver


def test_no_endpoint_means_no_tracing() -> None:
    assert tracing.endpoint({}) == ""
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_SDK_DISABLED": "true"}) == ""
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_TRACES_EXPORTER": "none"}) == ""
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317",
                             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) == "http://t:4317"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_every_service_exports_its_grpc_calls_over_otlp(tmp_path: Path, receiver: Receiver) -> None:
    cluster = Cluster(tmp_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                     "OTEL_BSP_SCHEDULE_DELAY": "300", "OTEL_TRACES_SAMPLER": "always_on"})
    try:
        cluster.relay("origin-1")
        rtmp = cluster.ingest()
        http = cluster.playback()
        cluster.wait_registered()
        publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/traced", 6, gop=30)
        try:
            wait_live(f"http://127.0.0.1:{http}/live/traced.flv")
        finally:
            publisher.wait(30)
        deadline = time.monotonic() + 15
        short_lived = {"castmesh-dispatch", "castmesh-ingest", "castmesh-playback"}
        while time.monotonic() < deadline and not short_lived <= receiver.services():
            time.sleep(0.2)
        assert short_lived <= receiver.services(), receiver.services()  # exported while running
        lease_server = next(s for s in receiver.named("castmesh-dispatch") if s.name == "/castmesh.v1.Dispatch/Lease")
        lease_client = next(s for s in receiver.named("castmesh-ingest") if s.name == "/castmesh.v1.Dispatch/Lease")
        assert lease_server.trace_id == lease_client.trace_id  # one trace across the two processes
    finally:
        cluster.stop()  # a clean stop flushes what the batch processors hold
    # The relay's calls are long-lived media streams: today their spans end, and are exported, when they do.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "castmesh-relay" not in receiver.services():
        time.sleep(0.2)
    publish_server = [s for s in receiver.named("castmesh-relay") if s.name == "/castmesh.v1.Relay/Publish"]
    publish_client = [s for s in receiver.named("castmesh-ingest") if s.name == "/castmesh.v1.Relay/Publish"]
    assert publish_server and publish_client
    assert {s.trace_id for s in publish_server} & {s.trace_id for s in publish_client}
