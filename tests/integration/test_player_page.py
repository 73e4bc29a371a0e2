"""The player page at / in headless Chromium (Debian's chromium, driven by playwright-core): the stream
shows up in the list with what it carries, a click plays it over HTTP-FLV, and the protocol switch plays
it over WebSocket-FLV and then HLS, all with the players the page serves itself (no CDN)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from services.worker.thumbs import REFRESH
from tests.integration.harness import FFMPEG, ROOT, Up, http_get, publish, wait_live

BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "test-artifacts"


def test_page_lists_streams_and_exposes_them_as_json(suite: Up) -> None:
    publisher = publish(suite.rtmp("listed"), 15, gop=30, size="640x360")
    try:
        wait_live(suite.flv("listed"))
        page = http_get(f"http://127.0.0.1:{suite.http_port}/")
        assert page.status == 200 and b"/vendor/mpegts.js" in page.read()
        for asset in ("/vendor/mpegts.js", "/vendor/hls.js", "/player.js"):
            response = http_get(f"http://127.0.0.1:{suite.http_port}{asset}")
            assert response.status == 200 and len(response.read()) > 1000, asset
        deadline = time.monotonic() + 5
        while True:  # the bitrate is measured over the last seconds: give it a moment
            listed = json.loads(http_get(f"http://127.0.0.1:{suite.http_port}/api/streams").read())["streams"]
            entry = next(s for s in listed if s["path"] == "live/listed")
            if entry["bitrate_kbps"] or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert (entry["video"], entry["audio"], entry["width"], entry["height"]) == ("H.264", "AAC", 640, 360)
        assert entry["fps"] == 30 and 100 < entry["bitrate_kbps"] < 20_000 and entry["publishing"]
        # its thumbnail (the page shows it in the list): a JPEG of the latest keyframe, 16:9 like the stream,
        # made again from a later keyframe once the first is REFRESH old
        first = thumbnail(suite, "listed")
        time.sleep(REFRESH + 1.5)  # the next keyframe after the refresh time (GOP: 1 s)
        second = thumbnail(suite, "listed")
        assert first != second
    finally:
        publisher.kill()
        publisher.wait()


def thumbnail(suite: Up, name: str) -> bytes:
    response = http_get(f"http://127.0.0.1:{suite.http_port}/live/{name}.jpg", timeout=10)
    body = response.read()
    assert response.status == 200 and response.getheader("Content-Type") == "image/jpeg", (response.status, body)
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "level+info", "-f", "image2pipe", "-i", "-",
                             "-vf", "showinfo", "-f", "null", "-"], input=body, capture_output=True, timeout=30,
                            check=False)
    text = result.stderr.decode(errors="replace")
    assert "[error]" not in text and " s:640x360 " in text, text  # decodes, with the stream's aspect ratio
    return body


def play_in_chromium(suite: Up, stream: str, shots: str, *protocols: str, page: str = "") -> dict[str, Any]:
    """The player page (at `page`, by default the suite's HTTP port) in headless Chromium plays `stream` over
    each protocol in turn, 5 s each; what it saw (tests/browser/page.mjs), with the checks every protocol
    shares done."""
    ARTIFACTS.mkdir(exist_ok=True)
    page = page or f"http://127.0.0.1:{suite.http_port}/"
    result = subprocess.run(["node", str(BROWSER_DIR / "page.mjs"), page, stream, str(ARTIFACTS / shots), "5",
                             *protocols], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["consoleErrors"] == [], seen["failures"]
    assert set(seen["requests"]) <= {page.split("/")[2], ""}, seen["requests"]  # "": blob: workers
    assert [phase["protocol"] for phase in seen["phases"]] == list(protocols)
    for phase in seen["phases"]:
        first, last, report = phase["first"], phase["last"], phase["report"]
        assert report["errors"] == [], phase
        assert last["width"] == 320 and last["height"] == 240, phase
        advanced = last["t"] - first["t"]
        assert advanced >= 0.5 * phase["wall"], f"{phase['protocol']}: played {advanced:.2f}s in {phase['wall']:.2f}s"
        assert last["frames"] > first["frames"], phase
        if phase["protocol"] == "llhls":  # now minus the program date time (ingest's clock) of the playhead
            assert report["latency"] is not None and 0 < report["latency"] < 2.0, phase
        if phase["protocol"] == "webrtc":  # the audio reaches the browser as Opus, and is decoded
            before, after = first["stats"]["audio"], last["stats"]["audio"]
            assert after["packets"] > before["packets"] + 100 and after["samples"] > before["samples"], phase
            assert after["concealed"] - before["concealed"] < 0.2 * (after["samples"] - before["samples"]), phase
            assert report["connectionState"] == "connected", phase
        else:
            assert last["audioBytes"] > first["audioBytes"], phase
        assert (ARTIFACTS / f"{shots}-{phase['protocol']}.png").stat().st_size > 10_000
    return seen


def test_chromium_plays_from_the_page_over_https_flv_websocket_flv_hls_ll_hls_then_webrtc(suite: Up) -> None:
    """Over HTTPS (HTTP/2 for the page, the FLV body, HLS and the WHEP exchange; HTTP/1.1 for wss://): the
    plain-HTTP paths are the same router, which the other tests exercise."""
    # B-frames are refused by WebRTC; a keyframe every 0.5 s: hls.js starts LL-HLS on one, PART-HOLD-BACK behind
    publisher = publish(suite.rtmp("page"), 80, gop=15, extra=["-bf", "0"])
    try:
        wait_live(suite.flv("page"))
        seen = play_in_chromium(suite, "live/page", "player", "flv", "ws", "hls", "llhls", "webrtc",
                                page=f"https://127.0.0.1:{suite.https_port}/")
    finally:
        publisher.kill()
        publisher.wait()
    assert seen["row"].split("\t")[1:4] == ["live/page", "H.264", "AAC"], seen["row"]
    assert seen["thumb"] == [320, 240], seen["thumb"]  # the list's thumbnail: the stream's picture, its size
