"""Tracing through the one setup module, checked with a real OTLP/gRPC receiver: every service exports
its gRPC calls, client and server, under its own service name; with no endpoint nothing is set up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from castmesh.mesh import tracing
from tests.cluster.harness import Cluster
from tests.integration.harness import publish, wait_live, watch_in_background
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


def traced(tmp_path: Path, receiver: Receiver, **env: str) -> Cluster:
    """A cluster whose every process exports its spans to `receiver`, quickly."""
    return Cluster(tmp_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
                                  **env})


def test_every_service_exports_its_grpc_calls_over_otlp(tmp_path: Path, receiver: Receiver) -> None:
    cluster = traced(tmp_path, receiver, OTEL_TRACES_SAMPLER="always_on")
    try:
        rtmp, http = cluster.simple()
        publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/traced", 6, gop=30)
        try:
            wait_live(f"http://127.0.0.1:{http}/live/traced.flv")
        finally:
            publisher.wait(30)
        deadline = time.monotonic() + 15
        short_lived = {"castmesh-dispatch", "castmesh-ingest", "castmesh-playback"}

        def leases() -> list[str]:
            return [r.service for r in receiver.spans if r.span.name == "/castmesh.v1.Dispatch/Lease"]

        while time.monotonic() < deadline and not (short_lived <= receiver.services() and len(set(leases())) == 2):
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


def test_media_sessions_are_spans_that_show_up_while_they_run(tmp_path: Path, receiver: Receiver) -> None:
    cluster = traced(tmp_path, receiver, CASTMESH_TRACE_PROGRESS_S="1")
    try:
        rtmp, http = cluster.simple()
        publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/spans", 10, gop=30)
        try:
            wait_live(f"http://127.0.0.1:{http}/live/spans.flv")
            _, viewer = watch_in_background(f"http://127.0.0.1:{http}/live/spans.flv", 5)
            deadline = time.monotonic() + 6
            names: set[str] = set()
            while time.monotonic() < deadline and not {"rtmp.publish.progress", "http-flv.play.progress"} <= names:
                time.sleep(0.2)
                names = {s.name for s in receiver.named("castmesh-ingest") + receiver.named("castmesh-playback")}
            assert publisher.poll() is None  # still publishing: the progress spans came while it ran
            assert {"rtmp.publish.progress", "http-flv.play.progress"} <= names, names
            viewer.join(15)
        finally:
            publisher.wait(30)
        deadline = time.monotonic() + 5
        ended = {"http-flv.play"}
        while time.monotonic() < deadline and not ended <= {s.name for s in receiver.named("castmesh-playback")}:
            time.sleep(0.2)
    finally:
        cluster.stop()
    ingest = receiver.named("castmesh-ingest")
    session = next(s for s in ingest if s.name == "rtmp.publish")
    assert "first keyframe" in [e.name for e in session.events] and "end" in [e.name for e in session.events]
    frames = next(a.value.int_value for a in session.attributes if a.key == "frames")
    assert frames > 250  # ~10 s of 30 fps video plus audio, counted, not one span each
    progress = [s for s in ingest if s.name == "rtmp.publish.progress"]
    assert progress and all(link.span_id == session.span_id for s in progress for link in s.links)
    assert len(ingest) < 60  # bounded by the duration (about one progress span a second), not by frames
    play = next(s for s in receiver.named("castmesh-playback") if s.name == "http-flv.play")
    assert any(a.key == "castmesh.stream" and a.value.string_value == "live/spans" for a in play.attributes)
