"""Pulled sources in `castmesh up`, from real servers: Debian's rtsp-server-perl (RTSP) and nginx-rtmp (RTMP)
fed by ffmpeg, ffmpeg's HLS written to a directory a Python HTTP server serves, and ffmpeg listening on
srt://. Each pulled stream plays over HTTP-FLV and HLS. On demand: the first viewer starts the pull (it
waits instead of getting a 404), and it stops its idle time after the last viewer left. A source that dies
(after running past every retry window, and again right after it came back) is read again with backoff and
the stream plays on. Bad input: a source nobody answers at, one that sends garbage, a rule that cannot be
met: clear errors and counters, and the other pulls unharmed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    FFMPEG,
    ROOT,
    decode,
    free_port,
    http_get,
    log_has,
    scrape,
    start_up,
    total,
    wait_live,
)
from tests.integration.test_forward import Nginx

SOURCE = ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=15", "-f", "lavfi", "-i",
          "sine=frequency=440:sample_rate=44100", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
          "-g", "15", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "48k"]
IDLE = 3


def ffmpeg(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", *SOURCE, "-t", "400", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


class Sources:
    """The far ends a pull reads from, all fed by ffmpeg."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nginx = Nginx(tmp)
        self.nginx.start()
        self.rtsp_client, rtsp_source = free_port(), free_port()
        self.procs.append(subprocess.Popen(
            ["rtsp-server-perl", "--clientport", str(self.rtsp_client), "--serverport", str(rtsp_source),
             "--client_listen_address", "127.0.0.1", "--source_listen_address", "127.0.0.1",
             "--rtp_start_port", str(20000 + free_port() % 20000), "--loglevel", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(rtsp_source)
        self.hls_dir = tmp / "hls"
        self.hls_dir.mkdir()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(self.hls_dir)))
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.srt = free_port()
        # one encoder for RTMP, RTSP and HLS (tee), one for SRT (its listener waits for its caller), one for the
        # source that a test kills and starts again, one with a camera's G.711 audio (which FLV carries)
        outputs = "|".join([
            f"[f=flv:onfail=ignore]{self.nginx.url('src')}", f"[f=flv:onfail=ignore]{self.nginx.url('od1')}",
            f"[f=rtsp:rtsp_transport=udp:onfail=ignore]rtsp://127.0.0.1:{rtsp_source}/cam",  # (UDP only there)
            f"[f=hls:hls_time=1:hls_list_size=6:hls_flags=delete_segments:onfail=ignore]{self.hls_dir}/live.m3u8"])
        self.procs.append(ffmpeg("-map", "0:v", "-map", "1:a", "-f", "tee", outputs))
        self.procs.append(ffmpeg("-f", "mpegts", f"srt://127.0.0.1:{self.srt}?mode=listener"))
        self.procs.append(ffmpeg("-c:a", "pcm_mulaw", "-ar", "8000", "-ac", "1", "-f", "flv", self.nginx.url("g711")))
        self.flaky: subprocess.Popen[bytes] | None = None
        self.start_flaky()
        deadline = time.monotonic() + 15
        while not (self.hls_dir / "live.m3u8").exists():
            assert time.monotonic() < deadline, "ffmpeg made no HLS"
            time.sleep(0.1)

    def start_flaky(self) -> None:
        self.flaky = ffmpeg("-f", "flv", self.nginx.url("flaky"))

    def kill_flaky(self) -> None:
        assert self.flaky is not None
        self.flaky.kill()
        self.flaky.wait()

    def rules(self) -> str:
        return ";".join([
            f"cams/rtsp=rtsp://127.0.0.1:{self.rtsp_client}/cam",
            f"cams/rtmp={self.nginx.url('src')}",
            f"cams/hls=http://127.0.0.1:{self.http.server_port}/live.m3u8",
            f"cams/srt=srt://127.0.0.1:{self.srt}",
            f"cams/flaky={self.nginx.url('flaky')}",
            f"cams/g711={self.nginx.url('g711')}",
            f"od/*=rtmp://127.0.0.1:{self.nginx.port}/live/{{name}} ondemand={IDLE}"])

    def stop(self) -> None:
        for proc in [*self.procs, *([self.flaky] if self.flaky else [])]:
            proc.kill()
            proc.wait()
        self.http.shutdown()
        self.nginx.stop()


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Sources]]:
    assert shutil.which("rtsp-server-perl"), "Debian's rtsp-server-perl: make peers installs it"
    tmp = tmp_path_factory.mktemp("pull")
    sources = Sources(tmp)
    up = start_up(tmp, "--pull", sources.rules())
    try:
        yield up, sources
    finally:
        up.process.stop()
        sources.stop()


def jobs(up: Any) -> dict[str, dict[str, Any]]:
    listed = json.loads(http_get(f"http://127.0.0.1:{up.http_port}/api/v1/jobs").read())["jobs"]
    return {f"{j['app']}/{j['stream']}": j for j in listed if j["kind"] == "pull"}


def flv(up: Any, path: str) -> str:
    return f"http://127.0.0.1:{up.http_port}/{path}.flv"


@pytest.mark.parametrize("name", ["rtsp", "rtmp", "hls", "srt"])
def test_each_kind_of_source_plays_over_http_flv_and_hls(pulled, name: str) -> None:  # type: ignore[no-untyped-def]
    up, _ = pulled
    wait_live(flv(up, f"cams/{name}"), timeout=25)
    counts, errors = decode(flv(up, f"cams/{name}"), seconds=2)
    assert counts.get(0, 0) >= 15 and counts.get(1, 0) > 0 and errors == "", (name, counts, errors)
    counts, errors = decode(f"http://127.0.0.1:{up.http_port}/cams/{name}.m3u8", seconds=1)
    assert counts.get(0, 0) >= 10 and errors == "", (name, counts, errors)
    job = jobs(up)[f"cams/{name}"]
    assert job["state"] == "running" and job["detail"] == "" and not job["on_demand"], job


def test_audio_hls_and_webrtc_cannot_carry_is_made_aac(pulled) -> None:  # type: ignore[no-untyped-def]
    """A source with G.711 audio (as many IP cameras send): its first audio tag replaces the child with one
    that makes the audio AAC (not a failure, no backoff); HLS then carries both tracks."""
    up, _ = pulled
    assert log_has(up, "pull.audio_to_aac", seconds=25)  # (then the stream is the AAC child's: no race with the first)
    wait_live(flv(up, "cams/g711"), timeout=25)
    probe = subprocess.run([FFMPEG, "-hide_banner", "-i", flv(up, "cams/g711"), "-t", "1", "-f", "null", "-"],
                           capture_output=True, timeout=30, check=False).stderr.decode(errors="replace")
    assert re.search(r"Audio: aac", probe), probe[-1500:]
    counts, errors = decode(f"http://127.0.0.1:{up.http_port}/cams/g711.m3u8", seconds=2)
    assert counts.get(0, 0) >= 20 and counts.get(1, 0) >= 10 and errors == "", (counts, errors)  # (8 kHz: 128 ms)
    assert re.search(r'pull\.audio_to_aac job=\S*cams/g711 .*codec="G\.711 mu-law"', up.process.log())
    # the switch is not taken for a failure (a retry before it is the source not up yet when the pull began)
    assert not re.search(r"pull\.retry job=\S*cams/g711 .*audio in", up.process.log())
    job = jobs(up)["cams/g711"]
    assert job["state"] == "running" and job["detail"] == "", job


def test_on_demand_pulls_start_with_the_first_viewer_and_stop_when_idle(pulled) -> None:  # type: ignore[no-untyped-def]
    up, _ = pulled
    assert "od/od1" not in jobs(up)
    started = time.monotonic()
    counts, errors = decode(flv(up, "od/od1"), seconds=4)  # the first viewer: waits for the pull, no 404
    assert counts.get(0, 0) >= 30 and errors == "", (counts, errors)  # (15 fps, from a keyframe)
    assert time.monotonic() - started < 12
    assert jobs(up)["od/od1"]["on_demand"] and jobs(up)["od/od1"]["state"] == "running"
    left = time.monotonic()
    while "od/od1" in jobs(up):
        assert time.monotonic() - left < IDLE + 8, jobs(up)["od/od1"]
        time.sleep(0.25)
    assert time.monotonic() - left >= IDLE - 1  # not before its idle time
    streams = json.loads(http_get(f"http://127.0.0.1:{up.http_port}/api/v1/streams").read())["streams"]
    deadline = time.monotonic() + 15  # (unlisted once the relay's grace for its publish has passed)
    while any(s["app"] == "od" for s in streams) and time.monotonic() < deadline:
        time.sleep(0.5)
        streams = json.loads(http_get(f"http://127.0.0.1:{up.http_port}/api/v1/streams").read())["streams"]
    assert not any(s["app"] == "od" for s in streams), streams
    assert http_get(flv(up, "nobody/here")).status == 404  # no rule: a 404 at once


def test_a_source_that_dies_is_read_again_with_backoff(pulled) -> None:  # type: ignore[no-untyped-def]
    up, sources = pulled
    wait_live(flv(up, "cams/flaky"), timeout=25)
    # Past every retry window and grace period: 12 s of its current publish, which the module's earlier tests
    # have usually given it already (listed since its lease was first claimed: that is the current publish's
    # start if no pull has failed yet; else the whole 12 s)
    streams = json.loads(http_get(f"http://127.0.0.1:{up.http_port}/api/v1/streams").read())["streams"]
    since_us = next(s["since_us"] for s in streams if (s["app"], s["stream"]) == ("cams", "flaky"))
    failed = total(scrape(up.http_port), "castmesh_pull_failures_total") > 0
    time.sleep(12 if failed else max(0.0, 12 - (time.time() - since_us / 1e6)))
    for _ in range(2):  # and again right after it came back
        failures = total(scrape(up.http_port), "castmesh_pull_failures_total")
        sources.kill_flaky()
        deadline = time.monotonic() + 15
        while "retrying in" not in jobs(up)["cams/flaky"]["detail"]:
            assert time.monotonic() < deadline, jobs(up)["cams/flaky"]
            time.sleep(0.2)
        assert total(scrape(up.http_port), "castmesh_pull_failures_total") > failures
        sources.start_flaky()
        deadline = time.monotonic() + 40
        while True:
            counts, errors = decode(flv(up, "cams/flaky"), seconds=2, timeout=20)
            if counts.get(0, 0) >= 20:
                break
            assert time.monotonic() < deadline, (counts, errors, jobs(up)["cams/flaky"])
            time.sleep(1)
    assert "cams/flaky" in jobs(up) and "retry" in up.process.log()


def test_bad_sources_and_rules_say_why_and_harm_nothing_else(pulled) -> None:  # type: ignore[no-untyped-def]
    up, _ = pulled
    garbage = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_garbage() -> None:
        garbage.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = garbage.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                body = bytes(range(256)) * 64
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.apple.mpegurl\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)

    threading.Thread(target=serve_garbage, daemon=True).start()
    base = f"http://127.0.0.1:{up.http_port}/api/v1/streams"
    closed = free_port()
    try:
        for name, url in (("unreachable", f"rtmp://127.0.0.1:{closed}/live/x"),
                          ("garbage", f"http://127.0.0.1:{garbage.getsockname()[1]}/live.m3u8")):
            body = json.dumps({"url": url}).encode()
            answer = urllib.request.urlopen(urllib.request.Request(
                f"{base}/bad/{name}/pull", data=body, method="POST", headers={"Content-Type": "application/json"}),
                timeout=5)
            assert answer.status == 201
        deadline = time.monotonic() + 20
        while not all("retrying in" in jobs(up).get(f"bad/{n}", {}).get("detail", "") for n in ("unreachable",
                                                                                                   "garbage")):
            assert time.monotonic() < deadline, jobs(up)
            time.sleep(0.3)
        said = {n: jobs(up)[f"bad/{n}"]["detail"] for n in ("unreachable", "garbage")}
        assert "Connection refused" in said["unreachable"], said
        assert "Invalid data found" in said["garbage"], said
        counts, errors = decode(flv(up, "cams/rtmp"), seconds=2)  # the others play on
        assert counts.get(0, 0) >= 20 and errors == "", (counts, errors)
        for name in ("unreachable", "garbage"):
            request = urllib.request.Request(f"{base}/bad/{name}/pull", method="DELETE")
            assert urllib.request.urlopen(request, timeout=5).status == 200
        assert not any(k.startswith("bad/") for k in jobs(up))
    finally:
        stop.set()
        garbage.close()
    for body, says in ((b'{"url": "ftp://x/y"}', "a pull's source is"), (b'{"url": 5}', "the body is"),
                       (b'{"url": "rtsp://x/y", "idle_seconds": -1}', "the body is"),
                       (b'{"url": "rtsp://x/y", "on_demand": true, "idle_seconds": 9999}',
                        "idle_seconds at most 3600")):
        request = urllib.request.Request(f"{base}/bad/x/pull", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=5)
            raise AssertionError(body)
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and says in exc.read().decode(), body
    checked = subprocess.run([sys.executable, "-m", "services.cli", "serve", "dispatch", "--check-config", "--pull",
                              "cams/*=rtsp://nvr/{name}"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert checked.returncode != 0 and "a pattern pulls on demand only" in checked.stderr, checked.stderr
