"""Running castmesh and real ffmpeg clients on loopback for integration tests."""

from __future__ import annotations

import heapq
import http.client
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import imageio_ffmpeg

from castmesh.media.flv import FlvReader, Tag

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Castmesh:
    """A castmesh process (`up` or `serve ...`) whose log goes to a file the test can read."""

    def __init__(self, args: list[str], log_path: Path, ready: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        # No SRT port unless a test asks (--srt-port beats the environment): processes running at once would
        # all want SRT's default UDP port.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CASTMESH_SRT_PORT": "0", **(env or {})}
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=self.log_file)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        banner = b""
        while ready.encode() not in banner:
            line = self.proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"castmesh did not start: {banner!r} {self.log()}")
            banner += line

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


@dataclass
class Up:
    process: Castmesh
    rtmp_port: int
    http_port: int
    https_port: int = 0  # with --tls-cert: HTTP/2 and HTTP/1.1 over TLS

    def rtmp(self, name: str) -> str:
        return f"rtmp://127.0.0.1:{self.rtmp_port}/live/{name}"

    def flv(self, name: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/live/{name}.flv"

    def hls(self, name: str, container: str = "") -> str:
        return f"http://127.0.0.1:{self.http_port}/live/{name}.m3u8" + (f"?format={container}" if container else "")


def start_up(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Up:
    rtmp, http = free_port(), free_port()
    proc = Castmesh(["up", "--no-demo", "--host", "127.0.0.1", "--rtmp-port", str(rtmp), "--http-port", str(http),
                     *extra], tmp / "castmesh.log", "Ctrl-C stops.", env)
    return Up(proc, rtmp, http)


def publish(url: str, seconds: float, *, video: str | None = "libx264", audio: bool = True, fps: int = 30,
            gop: int = 60, size: str = "320x240", extra: list[str] | None = None,
            stoppable: bool = False) -> subprocess.Popen[bytes]:
    """A real ffmpeg publishing a test pattern (and a tone) in real time; `stoppable`: its stdin a pipe, so
    that stop_publish() can end it early as at the end of its input."""
    args = [FFMPEG, "-hide_banner", "-loglevel", "error", "-re"]
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
    if video == "libx264":
        args += ["-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-pix_fmt", "yuv420p"]
    elif video == "libx265":
        args += ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", f"log-level=error:keyint={gop}",
                 "-pix_fmt", "yuv420p"]
    elif video == "libvpx-vp9":  # enhanced RTMP's vp09; realtime, no hidden frames
        args += ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-lag-in-frames", "0",
                 "-g", str(gop), "-b:v", "400k", "-pix_fmt", "yuv420p"]
    elif video == "libaom-av1":  # enhanced RTMP's av01
        args += ["-c:v", "libaom-av1", "-usage", "realtime", "-cpu-used", "8", "-lag-in-frames", "0",
                 "-g", str(gop), "-b:v", "300k", "-pix_fmt", "yuv420p"]
    if audio:
        args += ["-c:a", "aac", "-b:a", "64k"]
    args += [*(extra or []), "-f", "flv", url]
    return subprocess.Popen(args, stdin=subprocess.PIPE if stoppable else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_publish(publisher: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[int, str]:
    """End a stoppable publish now (a test's checks are done: its last seconds are not needed): "q" makes
    ffmpeg finish as at the end of its input (an unpublish, exit status 0). Its status and last words."""
    _, err = publisher.communicate(b"q", timeout=timeout)
    return publisher.returncode, err.decode(errors="replace")[-2000:]


def http_get(url: str, timeout: float = 5.0) -> http.client.HTTPResponse:
    parts = url.split("/", 3)
    host, port = parts[2].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("GET", "/" + parts[3])
    return conn.getresponse()


def wait_live(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = http_get(url, timeout=2)
            status = response.status
            response.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not go live within {timeout}s")


@dataclass
class Viewing:
    """What an HTTP-FLV client saw: the FLV header, tags with arrival times, and how the response ended."""

    header: bytes = b""
    tags: list[Tag] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    ended_cleanly: bool = False
    error: str = ""

    def video(self) -> list[Tag]:
        return [t for t in self.tags if t.kind == 9]

    def audio(self) -> list[Tag]:
        return [t for t in self.tags if t.kind == 8]

    def flv_bytes(self) -> bytes:
        from castmesh.media.flv import tag

        return self.header + b"\x00\x00\x00\x00" + b"".join(tag(t.kind, t.timestamp, t.payload) for t in self.tags)


def watch(url: str, seconds: float, viewing: Viewing | None = None) -> Viewing:
    """Read an HTTP-FLV URL for up to `seconds` (or until the response ends)."""
    seen = viewing or Viewing()
    reader = FlvReader()
    deadline = time.monotonic() + seconds
    try:
        response = http_get(url, timeout=5)
        seen.status = response.status
        seen.headers = {k.lower(): v for k, v in response.getheaders()}
        if response.status != 200:
            return seen
        while time.monotonic() < deadline:
            data = response.read1(65536)
            if not data:
                seen.ended_cleanly = True
                break
            now = time.monotonic()
            for t in reader.feed(data):
                seen.tags.append(t)
                seen.arrivals.append(now)
            if reader.header is not None:
                seen.header = reader.header
        response.close()
    except (OSError, http.client.HTTPException) as exc:
        seen.error = f"{type(exc).__name__}: {exc}"
    return seen


def watch_in_background(url: str, seconds: float) -> tuple[Viewing, threading.Thread]:
    """Start watching url on a thread; join the thread, then read the Viewing."""
    seen = Viewing()
    thread = threading.Thread(target=watch, args=(url, seconds, seen))
    thread.start()
    return seen, thread


def decode(source: str, timeout: float = 60.0, seconds: float | None = None) -> tuple[dict[int, int], str]:
    """Decode with ffmpeg (the first `seconds` of it, if given): frames per output stream index (from
    framecrc) and anything ffmpeg complained of."""
    limit = ["-t", str(seconds)] if seconds is not None else []
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", source, *limit, "-f", "framecrc", "-"],
                            capture_output=True, timeout=timeout, check=False)
    counts: dict[int, int] = {}
    for line in result.stdout.decode().splitlines():
        if line and not line.startswith("#"):
            index = int(line.split(",", 1)[0])
            counts[index] = counts.get(index, 0) + 1
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    # ffmpeg's FLV demuxer reports the end of a chunked HTTP body (no Content-Length, as every live HTTP-FLV
    # server sends) as this line, even when the body ends with its proper last chunk: checked against a
    # plain socket server replaying the same bytes. It is the end of input, not a decoding problem.
    if lines and lines[-1].endswith("Error during demuxing: Input/output error"):
        lines.pop()
    return counts, "\n".join(lines)


def log_has(up: Up, text: str, seconds: float = 8.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in up.process.log():
            return True
        time.sleep(0.1)
    return False


class LossyPath:
    """A UDP relay that loses and delays datagrams both ways, as a bad network path does: a caller sends to
    `port`, the relay to 127.0.0.1:target. What tc netem would do in a network namespace, which this
    machine's kernel cannot (no sch_netem: "Specified qdisc kind is unknown"); seeded, so a run repeats."""

    def __init__(self, target: int, loss: float = 0.05, delay: float = 0.02, jitter: float = 0.005,
                 seed: int = 1, spared: int = 4) -> None:
        self.target = ("127.0.0.1", target)
        self.loss, self.delay, self.jitter = loss, delay, jitter
        self.spared = spared  # the first datagrams (the handshake) always pass: loss on a running stream
        self.random = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.caller: tuple[str, int] | None = None
        self.passed = self.lost = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.front.close()
        self.back.close()

    def _run(self) -> None:
        due: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        count = 0
        while not self.stopped.is_set():
            wait = min(0.05, max(0.0, due[0][0] - time.monotonic())) if due else 0.05
            ready, _, _ = select.select([self.front, self.back], [], [], wait)
            for sock in ready:
                data, address = sock.recvfrom(2048)
                if sock is self.front:
                    self.caller = address
                    out, to = self.back, self.target
                elif self.caller is not None:
                    out, to = self.front, self.caller
                else:
                    continue
                if self.passed >= self.spared and self.random.random() < self.loss:
                    self.lost += 1
                    continue
                self.passed += 1
                count += 1
                later = self.delay + self.random.uniform(-self.jitter, self.jitter)
                heapq.heappush(due, (time.monotonic() + later, count, out, data, to))
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, out, data, to = heapq.heappop(due)
                out.sendto(data, to)


def srt_call(port: int, stream_id: str, local: str = "127.0.0.1") -> int:
    """An SRT caller from `local` asking for `stream_id` (castmesh's libsrt binding): 0 if it was let in
    (it leaves at once), else the listener's reject reason (1403: forbidden, 1400: bad stream id...)."""
    from castmesh.srt import libsrt as s

    srt = s.lib()
    sock = s.check("srt_create_socket", srt.srt_create_socket())
    try:
        s.set_int(sock, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
        s.set_bytes(sock, s.SRTO_STREAMID, stream_id.encode())
        here, there = s.sockaddr(local, 0), s.sockaddr("127.0.0.1", port)
        s.check("srt_bind", srt.srt_bind(sock, here, len(here)))
        if srt.srt_connect(sock, there, len(there)) != s.ERROR:
            return 0
        srt.srt_clearlasterror()
        return int(srt.srt_getrejectreason(sock))
    finally:
        srt.srt_close(sock)


def scrape(port: int) -> dict[str, float]:
    """A Prometheus text page as {name{labels}: value}."""
    text = http_get(f"http://127.0.0.1:{port}/metrics").read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def total(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))
