"""The gateway over a real cluster: ffmpeg follows its 302 to a playback node and decodes, "which server"
answers follow the bounded-load rule, listings carry what streams hold and who watches, and errors are
problem details."""

from __future__ import annotations

import json
import math
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from castmesh.mesh.ring import BoundedRing
from castmesh.mesh.tls import self_signed
from tests.cluster.harness import Cluster
from tests.integration.harness import decode, free_port, publish, wait_live, watch_in_background


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:  # the 302 itself is what is looked at
        return None


def get(url: str) -> tuple[int, str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], json.loads(exc.read())


def test_ffmpeg_follows_the_redirect_and_listings_show_the_viewer(cluster: Cluster) -> None:
    cluster.relay("origin-1")
    rtmp = cluster.ingest()
    http = cluster.playback("playback-a")
    cluster.playback("playback-b")
    worker_http = free_port()
    cluster.worker("worker", ["--http-port", str(worker_http)])
    gateway = cluster.gateway()
    cluster.wait_registered()
    base = f"http://127.0.0.1:{gateway}"
    status, _, answer = get(f"{base}/api/v1/publish/live/gw")
    assert status == 200 and answer["url"] == f"rtmp://127.0.0.1:{rtmp}/live/gw"
    publisher = publish(answer["url"], 20, gop=30)
    try:
        wait_live(f"http://127.0.0.1:{http}/live/gw.flv")
        with ThreadPoolExecutor(2) as pool:  # a 302 to a playback node, for FLV and for HLS
            over_flv, over_hls = (pool.submit(decode, f"{base}/live/gw.{form}", timeout=40, seconds=4)
                                  for form in ("flv", "m3u8"))
            counts, errors = over_flv.result()
            assert errors == "" and counts.get(0, 0) >= 100 and counts.get(1, 0) > 100
            counts, errors = over_hls.result()
            assert errors == "" and counts.get(0, 0) >= 100
        # the thumbnail: a 302 to the worker that makes it, and from a playback node, passed on from there
        with pytest.raises(urllib.error.HTTPError) as redirect:  # not followed: raised as it is
            urllib.request.build_opener(NoRedirect).open(f"{base}/live/gw.jpg", timeout=10)
        location = f"http://127.0.0.1:{worker_http}/live/gw.jpg"
        assert redirect.value.code == 302 and redirect.value.headers["Location"] == location
        for url in (f"{base}/live/gw.jpg", f"http://127.0.0.1:{http}/live/gw.jpg"):
            with urllib.request.urlopen(url, timeout=15) as picture:
                assert picture.headers["Content-Type"] == "image/jpeg" and picture.read(3) == b"\xff\xd8\xff"

        placed = get(f"{base}/api/v1/streams/live/gw/play")[2]  # what a client app asks
        seen, viewer = watch_in_background(placed["url"], 6)
        status, _, one = 0, "", {}
        for _ in range(40):
            status, _, one = get(f"{base}/api/v1/streams/live/gw")
            if one.get("viewers"):
                break
            viewer.join(0.25)
        assert status == 200 and (one["video"], one["audio"], one["width"]) == ("H.264", "AAC", 320)
        # the FLV viewer, and for a few target durations the HLS client decoded above
        assert one["publisher"]["holder"].startswith(f"ingest-{rtmp}/") and one["viewers"] >= 1
        assert placed["node"] in one["nodes"] and all(n.startswith("playback-") for n in one["nodes"])
        viewer.join(15)
        assert seen.error == "" and seen.tags
        status, _, listing = get(f"{base}/api/v1/streams")
        assert status == 200 and [s["stream"] for s in listing["streams"]] == ["gw"]
    finally:
        publisher.kill()
        publisher.wait()
    status, _, nodes = get(f"{base}/api/v1/nodes")
    assert status == 200 and sorted(n["role"] for n in nodes["nodes"]) == ["gateway", "ingest", "origin",
                                                                          "playback", "playback", "worker"]
    assert get(f"{base}/healthz")[0] == 200


def test_which_server_answers_follow_the_bounded_load_rule_and_errors_are_problems(cluster: Cluster) -> None:
    cluster.relay("origin-1")
    rtmp = cluster.ingest()
    ports = [cluster.playback(f"playback-{i}", rtmp_port=0 if i else free_rtmp()) for i in range(3)]
    gateway = cluster.gateway()
    cluster.wait_registered()
    base = f"http://127.0.0.1:{gateway}"
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/busy", 20, gop=30)
    try:
        wait_live(f"http://127.0.0.1:{ports[0]}/live/busy.flv")
        # The replay below assumes no node reports viewers. wait_live's own request was one, on playback-0,
        # and a load report (every second) may have caught it (CI saw that once): wait until none does.
        for _ in range(50):
            nodes = get(f"{base}/api/v1/nodes")[2]["nodes"]
            if not any(n["load"]["subscribers"] for n in nodes if n["role"] == "playback"):
                break
            time.sleep(0.1)
        answers = [get(f"{base}/api/v1/streams/live/busy/play?protocol=hls")[2] for _ in range(12)]
        assert all(a["protocol"] == "hls" and a["url"].endswith("/live/busy.m3u8") for a in answers)
        ring = BoundedRing([f"playback-{p}" for p in ports])
        loads: Counter[str] = Counter()
        for answer in answers:  # the same walk and cap, replayed: nobody reported viewers yet
            expected = ring.pick("__defaultVhost__/live/busy", loads)
            assert answer["node"] == expected
            loads[answer["node"]] += 1
        assert max(loads.values()) <= math.ceil(1.25 * 12 / 3)

        status, _, rtmp_answer = get(f"{base}/api/v1/streams/live/busy/play?protocol=rtmp&expires=1&sign=x")
        assert status == 200 and rtmp_answer["url"].startswith("rtmp://127.0.0.1:")
        assert rtmp_answer["url"].endswith("/live/busy?expires=1&sign=x")  # only one node plays RTMP
        status, _, ws = get(f"{base}/api/v1/streams/live/busy/play?protocol=ws")
        assert ws["url"].startswith("ws://") and ws["url"].endswith("/live/busy.flv")
        status, _, webrtc = get(f"{base}/api/v1/streams/live/busy/play?protocol=webrtc")
        assert status == 200 and re.fullmatch(r"http://127\.0\.0\.1:\d+/live/busy/whep", webrtc["url"])

        status, content_type, body = get(f"{base}/api/v1/streams/live/busy/play?protocol=smoke")
        assert status == 400 and content_type == "application/problem+json" and body["status"] == 400
    finally:
        publisher.kill()
        publisher.wait()
    status, content_type, body = get(f"{base}/api/v1/streams/live/nobody/play")
    assert status == 404 and content_type == "application/problem+json" and "nobody" in body["detail"]
    status, content_type, body = get(f"{base}/api/v1/streams/live/nobody")
    assert status == 404 and body["title"] == "Not Found"
    status, content_type, body = get(f"{base}/live/nobody.flv")
    assert status == 404 and content_type == "application/problem+json"


def free_rtmp() -> int:
    from tests.integration.harness import free_port

    return free_port()


def test_openapi_document_validates_and_schemathesis_finds_no_server_errors(cluster: Cluster) -> None:
    import subprocess
    import sys

    from openapi_spec_validator import validate

    cluster.relay("origin-1")
    cluster.ingest()
    cluster.playback()
    gateway = cluster.gateway()
    cluster.wait_registered()
    base = f"http://127.0.0.1:{gateway}"
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=10) as answer:
        document = json.loads(answer.read())
    validate(document)
    with urllib.request.urlopen(f"{base}/docs", timeout=10) as answer:
        assert b"/api/v1/streams/{app}/{stream}/play" in answer.read()
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--request-timeout", "5", "--no-color"],
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def request(method: str, url: str, token: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers), timeout=10) as a:
            return a.status, json.loads(a.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_kicks_need_the_admin_token_and_end_a_viewer_or_a_publish(cluster: Cluster) -> None:
    cluster.relay("origin-1")
    rtmp = cluster.ingest()
    http = cluster.playback()
    gateway = cluster.gateway(extra=["--admin-token", "s3cret"])
    cluster.wait_registered()
    base = f"http://127.0.0.1:{gateway}"
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/kickme", 30, gop=30)
    try:
        wait_live(f"http://127.0.0.1:{http}/live/kickme.flv")
        seen, viewer = watch_in_background(get(f"{base}/api/v1/streams/live/kickme/play")[2]["url"], 25)
        clients: list[Any] = []
        for _ in range(40):
            clients = get(f"{base}/api/v1/streams/live/kickme")[2].get("clients", [])
            if clients:
                break
            viewer.join(0.25)
        assert len(clients) == 1 and clients[0]["protocol"] == "http-flv"
        status, body = request("DELETE", f"{base}/api/v1/clients/{clients[0]['id']}")
        assert status == 401 and body["status"] == 401
        status, body = request("DELETE", f"{base}/api/v1/clients/{clients[0]['id']}", "wrong")
        assert status == 401
        status, body = request("DELETE", f"{base}/api/v1/clients/{clients[0]['id']}", "s3cret")
        assert status == 200 and body["kicked"] == 1
        viewer.join(10)
        assert not viewer.is_alive() and seen.ended_cleanly and seen.tags  # it watched, then was let go
        assert request("DELETE", f"{base}/api/v1/clients/{clients[0]['id']}", "s3cret")[0] == 404

        status, body = request("DELETE", f"{base}/api/v1/streams/live/kickme", "s3cret")
        assert status == 200 and body["kicked"] == 1 and body["node"] == f"ingest-{rtmp}"
        assert publisher.wait(10) is not None  # ffmpeg's connection was closed under it
        listed = [1]
        for _ in range(40):
            listed = get(f"{base}/api/v1/streams")[2]["streams"]
            if not listed:
                break
            time.sleep(0.25)  # listings are up to a second old
        assert listed == []
        assert request("DELETE", f"{base}/api/v1/streams/live/kickme", "s3cret")[0] == 404
    finally:
        publisher.kill()
        publisher.wait()


def test_gateway_over_https_and_http2_sends_tls_callers_to_https(cluster: Cluster, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's HTTPS port speaks HTTP/2 and HTTP/1.1 (ALPN); a caller on it is answered with https://
    and wss:// URLs of a playback node that has an HTTPS port, a caller on plain HTTP with http://; ffmpeg
    follows the gateway's HTTPS redirect and decodes; a failed handshake is a log line with its reason."""
    cert, key = self_signed(tmp_path)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--handshake-timeout-ms", "1500"]
    cluster.relay("origin-1")
    rtmp = cluster.ingest()
    secure_https, gateway_https = free_port(), free_port()
    cluster.playback("playback-plain")
    cluster.playback("playback-tls", extra=[*tls, "--https-port", str(secure_https)])
    gateway = cluster.gateway(extra=[*tls, "--https-port", str(gateway_https)])
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/sec", 30, gop=30)
    try:
        wait_live(f"http://127.0.0.1:{cluster.ports['playback-plain']}/live/sec.flv")
        trust = ssl.create_default_context(cafile=str(cert))
        base = f"https://127.0.0.1:{gateway_https}"
        with httpx.Client(http2=True, verify=trust, timeout=10) as client:
            for protocol, url in (("flv", f"https://127.0.0.1:{secure_https}/live/sec.flv"),
                                  ("ws", f"wss://127.0.0.1:{secure_https}/live/sec.flv"),
                                  ("hls", f"https://127.0.0.1:{secure_https}/live/sec.m3u8"),
                                  ("webrtc", f"https://127.0.0.1:{secure_https}/live/sec/whep")):
                answer = client.get(f"{base}/api/v1/streams/live/sec/play", params={"protocol": protocol})
                assert answer.http_version == "HTTP/2" and answer.status_code == 200, answer.text
                assert answer.json()["url"] == url, answer.json()
            moved = client.get(f"{base}/live/sec.m3u8")
            assert moved.http_version == "HTTP/2" and moved.status_code == 302
            assert moved.headers["location"] == f"https://127.0.0.1:{secure_https}/live/sec.m3u8"
            missing = client.get(f"{base}/api/v1/streams/live/nobody/play")
            assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
        with httpx.Client(http2=False, verify=trust, timeout=10) as client:
            listing = client.get(f"{base}/api/v1/streams")
            assert listing.http_version == "HTTP/1.1" and [s["stream"] for s in listing.json()["streams"]] == ["sec"]
        plain = get(f"http://127.0.0.1:{gateway}/api/v1/streams/live/sec/play?protocol=hls")[2]
        assert plain["url"].startswith("http://127.0.0.1:"), plain
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # ffmpeg checks the certificates, the gateway's and the node's
        counts, errors = decode(f"{base}/live/sec.flv", timeout=40, seconds=3)  # the 302, then TLS to the node
        assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) > 60
    finally:
        publisher.kill()
        publisher.wait()
    garbage = socket.create_connection(("127.0.0.1", gateway_https), timeout=5)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP on the HTTPS port
    assert garbage.recv(100) == b""
    garbage.close()
    deadline = time.monotonic() + 5
    while "tls.handshake_failed" not in cluster.nodes["gateway"].log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r'tls.handshake_failed service=gateway peer=127\.0\.0\.1:\d+ reason="\[SSL: HTTP_REQUEST\]',
                     cluster.nodes["gateway"].log())
