"""Tracing through the one setup module, checked with a real OTLP/gRPC receiver: every service exports
its gRPC calls, client and server, under its own service name; with no endpoint nothing is set up."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from castmesh.mesh import tracing
from tests.cluster.harness import Cluster
from tests.integration.harness import publish, start_up, stop_publish, wait_live, watch_in_background
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


def attribute(span: Span, key: str) -> str | int:
    found = next((a.value for a in span.attributes if a.key == key), None)
    assert found is not None, f"{span.name} has no {key}"
    return found.string_value or found.int_value


def test_a_viewers_trace_leads_hop_by_hop_to_the_publishers_session(tmp_path: Path, receiver: Receiver) -> None:
    """ffmpeg publishes through ingest into an origin; an HTTP-FLV client plays 10 s from playback, through
    an edge. Every process exports to the receiver."""
    cluster = traced(tmp_path, receiver, CASTMESH_TRACE_PROGRESS_S="1")
    try:
        cluster.relay("origin-1")
        cluster.relay("edge-1", role="edge")
        rtmp, http = cluster.ingest(), cluster.playback()
        cluster.wait_registered()
        flv = f"http://127.0.0.1:{http}/live/traced.flv"
        publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/traced", 18, gop=30, stoppable=True)
        started = time.monotonic()
        try:
            wait_live(flv)  # a first, short viewer: it starts the stream's feed on the playback node
            seen, viewer = watch_in_background(flv, 10)
            # Spans arrive while the stream runs: each hop's setup spans and each session's progress spans.
            live = {("castmesh-ingest", "rtmp.publish.progress"), ("castmesh-relay", "relay.publish"),
                    ("castmesh-relay", "relay.subscribe"), ("castmesh-relay", "/castmesh.v1.Relay/Subscribe"),
                    ("castmesh-playback", "http-flv.play.progress"), ("castmesh-playback", "relay.subscribe")}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not live <= receiver.arrived():
                time.sleep(0.2)
            assert publisher.poll() is None and viewer.is_alive()  # both still running
            assert live <= receiver.arrived(), live - receiver.arrived()
            viewer.join(20)
            assert seen.tags
        finally:
            stop_publish(publisher)  # (its checks done: an unpublish now, not at its 18th second)
        lasted = time.monotonic() - started
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {"rtmp.publish", "playback.feed"} <= receiver.names():
            time.sleep(0.2)
    finally:
        cluster.stop()
    spans = {s.span_id: (service, s) for service, s in receiver.all()}

    def named(service: str, name: str) -> list[Span]:
        return [s for svc, s in spans.values() if svc == service and s.name == name]

    def chain(span: Span) -> list[tuple[str, str]]:
        """(service, name) from `span` up through its parents, as far as they were exported."""
        found = []
        while span.span_id in spans:
            service, span = spans[span.span_id]
            found.append((service, span.name))
            if span.parent_span_id not in spans:
                break
            span = spans[span.parent_span_id][1]
        return found

    # The publisher's session: ingest's span, with the lease and the origin's publish span as children.
    session = next(s for s in named("castmesh-ingest", "rtmp.publish")
                   if attribute(s, "castmesh.stream") == "live/traced")
    events = [e.name for e in session.events]
    assert "first keyframe" in events and "end" in events
    assert int(attribute(session, "frames")) > 400  # ~10 s of video and audio, counted, not a span each
    lease = next(s for s in named("castmesh-dispatch", "/castmesh.v1.Dispatch/Lease") if s.trace_id == session.trace_id)
    assert chain(lease)[-1] == ("castmesh-ingest", "rtmp.publish")
    origin_publish = next(s for s in named("castmesh-relay", "relay.publish") if s.trace_id == session.trace_id)
    assert chain(origin_publish) == [("castmesh-relay", "relay.publish"), ("castmesh-ingest", "rtmp.publish")]
    assert "first frames" in [e.name for e in origin_publish.events]

    # The 10 s viewer: its span links to the publisher's session, and to the feed it joined...
    play = max(named("castmesh-playback", "http-flv.play"), key=lambda s: s.end_time_unix_nano - s.start_time_unix_nano)
    assert (play.end_time_unix_nano - play.start_time_unix_nano) / 1e9 > 8
    linked = {spans[link.span_id][1].name: spans[link.span_id][1] for link in play.links if link.span_id in spans}
    assert linked["rtmp.publish"].span_id == session.span_id
    feed = linked["playback.feed"]
    # ...whose trace goes playback -> edge -> origin, where the origin's subscription links to the session.
    origin_subscribe = [s for s in named("castmesh-relay", "relay.subscribe")
                        if s.trace_id == feed.trace_id and s.kind == Span.SPAN_KIND_SERVER
                        and chain(s)[1] == ("castmesh-relay", "relay.subscribe")
                        and ("castmesh-relay", "relay.pull") in chain(s)]
    assert origin_subscribe, "no subscription at the origin in the feed's trace"
    path = chain(origin_subscribe[0])
    assert path[:6] == [("castmesh-relay", "relay.subscribe"),    # origin, server
                        ("castmesh-relay", "relay.subscribe"),    # edge, client
                        ("castmesh-relay", "relay.pull"),         # the edge's one pull for the stream
                        ("castmesh-relay", "relay.subscribe"),    # edge, server
                        ("castmesh-playback", "relay.subscribe"),  # playback, client
                        ("castmesh-playback", "playback.feed")], path
    assert any(link.span_id == session.span_id for link in origin_subscribe[0].links)
    for subscription in (origin_subscribe[0], spans[origin_subscribe[0].parent_span_id][1]):
        assert "first frames" in [e.name for e in subscription.events]  # ended once set up, not with the stream
        assert subscription.end_time_unix_nano < play.end_time_unix_nano
    # The media calls between nodes: spans ended when the call was set up, not hours later.
    for name in ("/castmesh.v1.Relay/Publish", "/castmesh.v1.Relay/Subscribe"):
        calls = named("castmesh-relay", name)
        assert calls and all("set up" in [e.name for e in c.events] for c in calls), name

    # No span per frame: the count follows the duration (progress spans once a second), not the ~1300 frames.
    media = [s for svc, s in spans.values() if not s.name.startswith("/")]
    assert len(media) < 6 * lasted, (len(media), lasted)


def test_hls_and_gateway_requests_are_spans(tmp_path: Path, receiver: Receiver) -> None:
    """In `castmesh up` (one process, one HTTP port): an API call carrying a traceparent continues the
    caller's trace, with the gRPC calls made for it as children; HLS playlist and segment requests are spans."""
    up = start_up(tmp_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"})
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    try:
        publisher = publish(up.rtmp("hlsspans"), 12, gop=30)
        try:
            wait_live(up.flv("hlsspans"))
            listing = urllib.request.Request(f"http://127.0.0.1:{up.http_port}/api/v1/streams",
                                             headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
            with urllib.request.urlopen(listing, timeout=10) as answer:
                assert answer.status == 200
            with urllib.request.urlopen(up.hls("hlsspans"), timeout=15) as answer:
                playlist = answer.read().decode()
            segment = next(line for line in playlist.splitlines() if line and not line.startswith("#"))
            with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}/live/{segment}", timeout=10) as answer:
                assert answer.status == 200 and answer.read()
        finally:
            publisher.kill()
            publisher.wait()
        wanted = {"GET /api/v1/streams", "GET /{app}/{stream}.m3u8", "GET /{app}/{stream}/hls/{muxer}/{segment}"}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not wanted <= receiver.names():
            time.sleep(0.2)
    finally:
        up.process.stop()
    spans = {s.span_id: s for _, s in receiver.all()}
    by_name = {s.name: s for s in spans.values()}
    api = by_name["GET /api/v1/streams"]
    assert api.trace_id.hex() == caller_trace and api.parent_span_id.hex() == caller_span
    assert attribute(api, "http.response.status_code") == 200
    assert any(s.parent_span_id == api.span_id and s.name.startswith("/castmesh.v1.") for s in spans.values())
    playlist_span = by_name["GET /{app}/{stream}.m3u8"]
    assert attribute(playlist_span, "http.response.status_code") == 200
    segment_span = by_name["GET /{app}/{stream}/hls/{muxer}/{segment}"]
    assert attribute(segment_span, "http.response.status_code") == 200
    assert attribute(segment_span, "url.path") == f"/live/{segment}"


def test_a_republish_is_a_span_event_for_the_viewer_and_the_origin(tmp_path: Path, receiver: Receiver) -> None:
    """The publisher vanishes (kill -9) and another takes the stream within the grace period: the viewer,
    who keeps watching, gets a republish event, and so does the origin's new relay.publish."""
    up = start_up(tmp_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"})
    try:
        first = publish(up.rtmp("again"), 30, gop=30)
        second = None
        try:
            wait_live(up.flv("again"))
            seen, viewer = watch_in_background(up.flv("again"), 9)
            time.sleep(3)
            first.kill()
            first.wait()
            second = publish(up.rtmp("again"), 30, gop=30)
            viewer.join(20)
            assert seen.tags
        finally:
            for publisher in (first, second):
                if publisher is not None:
                    publisher.kill()
                    publisher.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "http-flv.play" not in receiver.names():
            time.sleep(0.2)
    finally:
        up.process.stop()
    spans = [s for _, s in receiver.all()]
    play = max((s for s in spans if s.name == "http-flv.play"),
               key=lambda s: s.end_time_unix_nano - s.start_time_unix_nano)
    assert "republish" in [e.name for e in play.events], [e.name for e in play.events]
    sessions = [s for s in spans if s.name == "rtmp.publish"]
    assert len(sessions) == 2 and len({s.trace_id for s in sessions}) == 2
    assert len({link.span_id for link in play.links} & {s.span_id for s in sessions}) == 2  # linked to both
    taken_over = [s for s in spans if s.name == "relay.publish" and "republish" in [e.name for e in s.events]]
    assert len(taken_over) == 1 and taken_over[0].trace_id != play.trace_id


def test_an_origin_failover_is_a_span_event_at_every_hop_that_moved(tmp_path: Path, receiver: Receiver) -> None:
    """The origin carrying a stream is killed with -9 under a viewer: ingest's publish session, the
    playback node's feed and the viewer each get a failover event."""
    cluster = traced(tmp_path, receiver)
    try:
        cluster.relay("origin-1")
        cluster.relay("origin-2")
        rtmp, http = cluster.ingest(), cluster.playback()
        cluster.wait_registered()
        url = f"http://127.0.0.1:{http}/live/moved.flv"
        publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/moved", 12, gop=30, stoppable=True)
        try:
            wait_live(url)
            seen, viewer = watch_in_background(url, 8)
            time.sleep(3)
            cluster.kill9(cluster.name_at(cluster.origin_of("moved")))
            viewer.join(20)
            assert seen.error == "" and seen.tags  # it watched through the failover
        finally:
            stop_publish(publisher)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {"rtmp.publish", "playback.feed"} <= receiver.names():
            time.sleep(0.2)
    finally:
        cluster.stop()
    spans = [s for _, s in receiver.all()]

    def events(name: str) -> list[str]:
        found = [s for s in spans if s.name == name]
        assert found, name
        return [e.name for s in found for e in s.events]

    assert "failover" in events("rtmp.publish")  # ingest moved the publish to the other origin
    assert "failover" in events("playback.feed")  # the feed followed the stream there
    assert "failover" in events("http-flv.play")  # and the viewer, who kept its connection, is told
