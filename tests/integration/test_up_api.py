"""`castmesh up` serves the gateway's API on its one HTTP port, next to playback and the player page."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tests.integration.harness import Up, publish, wait_live, watch_in_background


def call(method: str, url: str) -> tuple[int, str, Any]:
    """Status, content type, and the body (parsed when it is JSON)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as answer:
            status, content_type, body = answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as exc:
        status, content_type, body = exc.code, exc.headers["Content-Type"], exc.read()
    return status, content_type, json.loads(body) if "json" in content_type else body


def test_one_port_for_playback_the_page_and_the_api(suite: Up) -> None:
    base = f"http://127.0.0.1:{suite.http_port}"
    publisher = publish(suite.rtmp("api"), 20, gop=30)
    try:
        wait_live(suite.flv("api"))
        status, _, placed = call("GET", f"{base}/api/v1/streams/live/api/play?protocol=ws")
        assert status == 200 and placed["url"] == f"ws://127.0.0.1:{suite.http_port}/live/api.flv"
        status, _, publish_at = call("GET", f"{base}/api/v1/publish/live/other")
        assert publish_at["url"] == f"rtmp://127.0.0.1:{suite.rtmp_port}/live/other"
        seen, viewer = watch_in_background(suite.flv("api"), 20)
        clients: list[Any] = []
        for _ in range(40):
            clients = call("GET", f"{base}/api/v1/streams/live/api")[2].get("clients", [])
            if clients:
                break
            viewer.join(0.25)
        assert clients, "the viewer is listed"
        status, _, kicked = call("DELETE", f"{base}/api/v1/clients/{clients[0]['id']}")  # no token configured
        assert status == 200 and kicked["kicked"] == 1
        viewer.join(10)
        assert not viewer.is_alive() and seen.tags
    finally:
        publisher.kill()
        publisher.wait()
    status, content_type, problem = call("GET", f"{base}/api/v1/streams/live/nobody")
    assert status == 404 and content_type == "application/problem+json" and problem["status"] == 404
    assert call("GET", f"{base}/healthz")[0] == 200
    assert call("GET", f"{base}/openapi.json")[2]["openapi"].startswith("3.1")
    status, _, _ = call("DELETE", f"{base}/live/api.flv")  # DELETE means nothing outside the API
    assert status == 405
