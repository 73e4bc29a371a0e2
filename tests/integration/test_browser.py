"""mpegts.js in headless Chromium plays castmesh's HTTP-FLV from another origin (so CORS is real)."""

from __future__ import annotations

import functools
import json
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from tests.integration.harness import ROOT, Up, publish, wait_live

BROWSER_DIR = ROOT / "tests" / "browser"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_mpegts_js_plays_video_and_audio_in_chromium(suite: Up) -> None:
    page_server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(BROWSER_DIR)))
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    publisher = publish(suite.rtmp("browser"), 20, fps=30, gop=30)
    try:
        wait_live(suite.flv("browser"))
        page = f"http://127.0.0.1:{page_server.server_address[1]}/flv_player.html?src={suite.flv('browser')}"
        result = subprocess.run(["node", str(BROWSER_DIR / "play.mjs"), page, "5"], capture_output=True, text=True,
                                timeout=90, check=False)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        publisher.kill()
        publisher.wait()
        page_server.shutdown()
    report, first, last = seen["report"], seen["first"], seen["last"]
    assert report["supported"] and report["errors"] == [], report
    assert report["mediaInfo"]["hasVideo"] and report["mediaInfo"]["hasAudio"]
    assert (last["width"], last["height"]) == (320, 240)
    advanced = last["t"] - first["t"]
    assert advanced >= 0.5 * seen["wall"], f"played {advanced:.2f}s in {seen['wall']:.2f}s"
    assert last["audioBytes"] > first["audioBytes"] > 0
    assert last["frames"] > first["frames"]
