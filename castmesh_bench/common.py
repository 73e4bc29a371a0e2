"""What the benchmarks share: the cached clip, castmesh processes pinned to a CPU, their CPU time and
memory, HTTP-FLV viewers that count bytes (and, when sampled, parse FLV to time each video frame), and a
sink for spans."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import grpc
import h11
import imageio_ffmpeg
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from castmesh.media.flv import FlvReader

STALL = 1.0


# The clip ------------------------------------------------------------------------------------------------

def make_clip(out: Path, seconds: float, bframes: bool = True) -> Path:
    """A cached clip at least `seconds` long (60 s unless more is needed); without B-frames if asked (what
    WebRTC carries)."""
    out.mkdir(parents=True, exist_ok=True)
    name = "clip-720p30-2mbps-" + ("" if bframes else "nobf-")
    for existing in sorted(out.glob(f"{name}*s.flv")):
        length = existing.stem[len(name):-1]  # "145" of ...-145s; not a digit string for the other kind
        if length.isdigit() and int(length) >= seconds:
            return existing
    seconds = max(60, int(seconds) + 1)
    clip = out / f"{name}{seconds}s.flv"
    print(f"encoding a {int(seconds)} s 720p30 2 Mbps clip to {clip} (once)...", file=sys.stderr, flush=True)
    subprocess.run([
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
        "-c:v", "libx264", "-preset", "veryfast", "-b:v", "1900k", "-maxrate", "2000k", "-bufsize", "2000k",
        "-g", "60", *([] if bframes else ["-bf", "0"]), "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "128k", "-f", "flv", str(clip) + ".tmp",
    ], check=True)
    os.replace(str(clip) + ".tmp", clip)
    return clip


# Processes ------------------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], cpus: set[int] | None = None, ready: bytes = b"listening",
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A castmesh process (with `env` added to this one's), started once it prints `ready`, optionally
    pinned to `cpus`."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "CASTMESH_SRT_PORT": "0", **(env or {})})  # no SRT unless asked
    assert proc.stdout is not None
    seen = b""
    while ready not in seen:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise RuntimeError(f"castmesh {' '.join(args[:2])} did not start: {seen!r}")
        seen += line
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return proc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# Viewers --------------------------------------------------------------------------------------------------

@dataclass
class Clock:
    measuring: bool = False


class Arrivals:
    """What every load viewer keeps of its bytes' arrival: the first, the last, the longest gap between two
    (while the clock measures) and how many."""

    clock: Clock
    first_byte: float
    last: float
    max_gap: float
    bytes: int

    def arrived(self, now: float, size: int) -> None:
        if not self.first_byte:
            self.first_byte = now
        elif self.clock.measuring and now - self.last > self.max_gap:
            self.max_gap = now - self.last
        self.last = now
        self.bytes += size


class Viewer(Arrivals, asyncio.Protocol):
    def __init__(self, request: bytes, clock: Clock, sampled: bool) -> None:
        self.request = request
        self.clock = clock
        self.started = time.monotonic()
        self.first_byte = 0.0
        self.first_video = 0.0
        self.last = 0.0
        self.max_gap = 0.0
        self.bytes = 0
        self.closed = False
        self.http = h11.Connection(h11.CLIENT) if sampled else None
        self.flv = FlvReader() if sampled else None
        self.video: list[tuple[int, float, bool]] = []  # (timestamp, arrival, keyframe)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.arrived(now, len(data))
        if self.http is None or self.flv is None:
            return
        self.http.receive_data(data)
        while True:
            ev = self.http.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.EndOfMessage):
                break
            if isinstance(ev, h11.Data):
                for tag in self.flv.feed(bytes(ev.data)):
                    if tag.kind == 9:
                        if not self.first_video:
                            self.first_video = now
                        self.video.append((tag.timestamp, now, tag.payload[:1] in (b"\x17", b"\x91", b"\x93")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def wait_live(host: str, port: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"stream {path} did not go live")




async def open_viewers(host: str, port: int, path: str, count: int, clock: Clock, sampled: int,
                       ramp: float = 200) -> list[Viewer]:
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    every = max(1, count // max(1, sampled)) if sampled else 0
    viewers = []
    for i in range(count):
        viewer = Viewer(request, clock, sampled=bool(every) and i % every == 0)
        await loop.create_connection(lambda v=viewer: v, host, port)  # type: ignore[misc]
        viewers.append(viewer)
        await asyncio.sleep(1 / ramp)
    return viewers


class Watching(Protocol):
    """What the reports need of any viewer (HTTP-FLV here, RTMP in castmesh_bench.viewers)."""

    transport: asyncio.Transport | None
    video: list[tuple[int, float, bool]]


def close_viewers(viewers: Sequence[Watching]) -> None:
    for viewer in viewers:
        if viewer.transport is not None:
            viewer.transport.abort()


def lags_ms(viewers: Sequence[Watching], sent: dict[int, float], since: float, until: float) -> list[float]:
    """Arrival minus publish time of the same video frame, for frames that arrived in [since, until]."""
    return [(arrival - sent[ts]) * 1000 for v in viewers for ts, arrival, _ in v.video
            if ts in sent and since <= arrival <= until]


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts what it is sent and keeps nothing: for measuring what
    tracing costs the traced process, not a collector's speed."""

    def __init__(self) -> None:
        self.spans = 0
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def env(self) -> dict[str, str]:
        """What makes a castmesh process trace every call to this sink."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}", "OTEL_TRACES_SAMPLER": "always_on"}
