"""What operators see of a running cluster: each service's /metrics has its bytes, sessions and hop
latency moving during a stream, and CASTMESH_LOG_FORMAT=json turns the session-event lines into JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.cluster.harness import Cluster
from tests.integration.harness import free_port, publish, scrape, total, wait_live, watch_in_background


def test_each_services_metrics_move_during_a_stream(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, env={"CASTMESH_LOG_FORMAT": "json"})
    relay_metrics, ingest_metrics = free_port(), free_port()
    try:
        cluster.relay("origin-1", extra=["--metrics-port", str(relay_metrics)])
        rtmp = free_port()
        cluster.start("ingest", ["serve", "ingest", "--host", "127.0.0.1", "--rtmp-port", str(rtmp), "--dispatch",
                                 cluster.dispatch, "--metrics-port", str(ingest_metrics)], rtmp)
        http = cluster.playback()
        cluster.wait_registered()
        publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/watched", 12, gop=30)
        try:
            wait_live(f"http://127.0.0.1:{http}/live/watched.flv")
            seen, viewer = watch_in_background(f"http://127.0.0.1:{http}/live/watched.flv", 6)
            time.sleep(2)
            first = {name: scrape(port) for name, port in
                     (("relay", relay_metrics), ("ingest", ingest_metrics), ("playback", http))}
            time.sleep(2)
            second = {name: scrape(port) for name, port in
                      (("relay", relay_metrics), ("ingest", ingest_metrics), ("playback", http))}
            viewer.join(15)
        finally:
            publisher.kill()
            publisher.wait()
        moving = [("ingest", "castmesh_ingest_bytes_in_total"), ("ingest", "castmesh_ingest_frames_in_total"),
                  ("relay", "castmesh_relay_frames_in_total"), ("relay", "castmesh_relay_bytes_in_total"),
                  ("relay", "castmesh_relay_frames_out_total"), ("relay", "castmesh_relay_bytes_out_total"),
                  ("playback", "castmesh_playback_bytes_out_total"), ("playback", "castmesh_playback_frames_out_total")]
        for name, metric in moving:
            assert total(second[name], metric) > total(first[name], metric) > 0, (name, metric)
        for name, histogram in (("relay", "castmesh_relay_frame_age_seconds_count"),
                                ("playback", "castmesh_playback_frame_age_seconds_count")):
            assert total(second[name], histogram) > total(first[name], histogram) > 0, (name, histogram)
        assert total(second["ingest"], "castmesh_ingest_publishing") == 1
        assert second["ingest"]['castmesh_connections{protocol="rtmp",service="ingest"}'] == 1
        assert second["playback"]['castmesh_playback_viewers{protocol="http-flv"}'] == 1  # sessions by protocol
        assert second["playback"]['castmesh_connections{protocol="http",service="playback"}'] >= 1
        assert total(second["relay"], "castmesh_relay_subscribers") >= 1
        # Queue depths are there (near zero for a viewer that keeps up), and each node opened one call per peer.
        for name, gauge in (("relay", "castmesh_relay_subscriber_queued_bytes"),
                            ("relay", "castmesh_relay_subscriber_lag_max_seconds"),
                            ("ingest", "castmesh_ingest_relay_queue_batches"),
                            ("playback", "castmesh_playback_viewer_buffered_bytes")):
            assert gauge in second[name], gauge
        assert second["ingest"]['castmesh_link_calls_opened_total{call="publish"}'] == 1
        assert second["playback"]['castmesh_link_calls_opened_total{call="subscribe"}'] == 1
        assert seen.tags
    finally:
        cluster.stop()
    lines = [line for line in cluster.nodes["ingest"].log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    start = next(r for r in records if r.get("event") == "publish.start")
    assert start["stream"] == "live/watched" and start["level"] == "INFO" and start["logger"] == "castmesh.ingest"
    assert sum(1 for r in records if r.get("event") == "publish.start") == 1  # per session, not per frame
