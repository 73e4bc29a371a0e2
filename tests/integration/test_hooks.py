"""HTTP hooks, as SRS and nginx-rtmp call them: a hook that answers 403 blocks a publish (ffmpeg is told
why) or a play; on_unpublish and on_stop are told when sessions end; a hook that does not answer in time
denies."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.integration.harness import FFMPEG, http_get, publish, start_up, wait_live, watch_in_background


class HookServer:
    """Answers 403 for streams named blocked* and for plays with ?token=bad, sleeps past the timeout for
    slow*, 200 otherwise."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls.append(body)
                stream = str(body.get("stream", ""))
                if stream.startswith("slow"):
                    time.sleep(2)
                query = body.get("query") or {}
                bad_token = isinstance(query, dict) and query.get("token") == "bad"
                status = 403 if stream.startswith("blocked") or bad_token else 200
                answer = b"not on my watch" if status == 403 else b"ok"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def actions(self, stream: str) -> list[object]:
        return [c["action"] for c in self.calls if c.get("stream") == stream]


def test_hooks_allow_deny_and_are_told(tmp_path: Path) -> None:
    hooks = HookServer()
    up = start_up(tmp_path, "--on-publish", f"{hooks.url}/publish", "--on-unpublish", f"{hooks.url}/unpublish",
                  "--on-play", f"{hooks.url}/play", "--on-stop", f"{hooks.url}/stop", "--hook-timeout-ms", "1000")
    try:
        refused = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                                  "testsrc2=size=160x120:rate=10:duration=2", "-c:v", "libx264", "-f", "flv",
                                  up.rtmp("blocked-cam")], capture_output=True, text=True, timeout=30, check=False)
        assert refused.returncode != 0 and "on_publish hook answered 403: not on my watch" in refused.stderr
        slow = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                               "testsrc2=size=160x120:rate=10:duration=2", "-c:v", "libx264", "-f", "flv",
                               up.rtmp("slow-cam")], capture_output=True, text=True, timeout=30, check=False)
        assert slow.returncode != 0 and "on_publish hook did not answer" in slow.stderr

        publisher = publish(up.rtmp("allowed"), 8, gop=30)
        try:
            wait_live(up.flv("allowed"))
            seen, viewer = watch_in_background(up.flv("allowed"), 2)
            viewer.join(10)
            assert seen.tags and seen.error == ""
        finally:
            publisher.wait(30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "on_unpublish" not in hooks.actions("allowed"):
            time.sleep(0.1)
        actions = hooks.actions("allowed")
        assert {"on_publish", "on_play", "on_stop", "on_unpublish"} <= set(actions)
        assert actions.index("on_publish") < actions.index("on_unpublish")
        play = next(c for c in hooks.calls if c["action"] == "on_play")
        assert play["protocol"] == "http-flv" and play["client_ip"] == "127.0.0.1" and play["app"] == "live"

        second = publish(up.rtmp("open"), 8, gop=30)
        try:
            wait_live(up.flv("open"))
            response = http_get(up.flv("open") + "?token=bad")
            assert response.status == 403 and b"on_play hook answered 403: not on my watch" in response.read()
            rtmp = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", up.rtmp("open") + "?token=bad",
                                   "-t", "1", "-f", "null", "-"], capture_output=True, text=True, timeout=30,
                                  check=False)
            assert rtmp.returncode != 0 and "on_play hook answered 403" in rtmp.stderr
        finally:
            second.kill()
            second.wait()
    finally:
        up.process.stop()
        hooks.server.shutdown()
