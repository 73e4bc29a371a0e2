"""What operators see of a running cluster: each service's /metrics has its bytes, sessions and hop
latency moving during a stream, and CASTMESH_LOG_FORMAT=json turns the session-event lines into JSON."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.cluster.harness import Cluster
from tests.integration.harness import free_port, http_get, publish, wait_live, watch_in_background


def scrape(port: int) -> dict[str, float]:
    text = http_get(f"http://127.0.0.1:{port}/metrics").read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def total(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


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
        for name, metric in (("ingest", "castmesh_ingest_bytes_in_total"), ("relay", "castmesh_relay_frames_in_total"),
                             ("playback", "castmesh_playback_bytes_out_total")):
            assert total(second[name], metric) > total(first[name], metric) > 0, (name, metric)
        for name, histogram in (("relay", "castmesh_relay_frame_age_seconds_count"),
                                ("playback", "castmesh_playback_frame_age_seconds_count")):
            assert total(second[name], histogram) > total(first[name], histogram) > 0, (name, histogram)
        assert total(second["ingest"], "castmesh_ingest_publishing") == 1
        assert total(second["playback"], "castmesh_playback_viewers") == 1
        assert total(second["relay"], "castmesh_relay_subscribers") >= 1
        assert seen.tags
    finally:
        cluster.stop()
    lines = [line for line in cluster.nodes["ingest"].log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    start = next(r for r in records if r.get("event") == "publish.start")
    assert start["stream"] == "live/watched" and start["level"] == "INFO" and start["logger"] == "castmesh.ingest"
    assert sum(1 for r in records if r.get("event") == "publish.start") == 1  # per session, not per frame
