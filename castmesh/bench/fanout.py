"""`castmesh bench fanout`: one real 2 Mbps stream to N HTTP-FLV viewers on loopback.

Setup, as the peer numbers in NOTES were taken: relay, ingest and playback run as separate processes;
playback is pinned to CPU 0, everything else (the viewers, the publisher) to the other CPUs. A 720p30
H.264 + AAC clip at 2 Mbps is encoded once (cached under --out) and published in real time by a separate
process that records when each video frame left. Viewers connect at --ramp per second; most only count
bytes, --sampled of them also decode the HTTP chunking and the FLV tags to measure lag (arrival minus
publish time of the same frame) and time to first frame.

Reported: delivered Mbps, playback CPU% of one core and RSS over the measured window, time to first
frame, lag p50/p95/max, and stalled viewers (no data for over a second, or disconnected). The run is
bounded: everything stops after the ramp plus --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h11
import imageio_ffmpeg

from castmesh.bench.rtmp_publisher import run_in_process
from castmesh.media.flv import FlvReader
from castmesh.mesh import runtime

STALL = 1.0


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("fanout", help="one 2 Mbps stream to N HTTP-FLV viewers on loopback",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--viewers", type=int, default=100, help="HTTP-FLV viewers (default 100)")
    p.add_argument("--seconds", type=float, default=20, help="measured seconds after the ramp (default 20)")
    p.add_argument("--sampled", type=int, default=20, help="viewers that parse FLV to measure lag (default 20)")
    p.add_argument("--ramp", type=int, default=200, help="viewer connections opened per second (default 200)")
    p.add_argument("--merge-ms", type=int, default=30, help="playback's merged-write window (default 30)")
    p.add_argument("--out", default="bench-out", help="where the clip is cached (default bench-out)")
    p.add_argument("--no-pin", action="store_true", help="do not pin playback to CPU 0 and the load elsewhere")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    result = runtime.run(fanout(args))
    return 0 if result else 1


# The clip ------------------------------------------------------------------------------------------------

def make_clip(out: Path, seconds: float) -> Path:
    """A cached clip at least `seconds` long (60 s unless more is needed)."""
    out.mkdir(parents=True, exist_ok=True)
    for existing in sorted(out.glob("clip-720p30-2mbps-*s.flv")):
        if int(existing.stem.rsplit("-", 1)[1][:-1]) >= seconds:
            return existing
    seconds = max(60, int(seconds) + 1)
    clip = out / f"clip-720p30-2mbps-{seconds}s.flv"
    print(f"encoding a {int(seconds)} s 720p30 2 Mbps clip to {clip} (once)...", file=sys.stderr, flush=True)
    subprocess.run([
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
        "-c:v", "libx264", "-preset", "veryfast", "-b:v", "1900k", "-maxrate", "2000k", "-bufsize", "2000k",
        "-g", "60", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k", "-f", "flv", str(clip) + ".tmp",
    ], check=True)
    os.replace(str(clip) + ".tmp", clip)
    return clip


# Processes ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], cpus: set[int] | None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"listening" not in line:
        proc.kill()
        raise RuntimeError(f"castmesh {args[1]} did not start: {line!r}")
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return proc


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# Viewers --------------------------------------------------------------------------------------------------

@dataclass
class Clock:
    measuring: bool = False


class Viewer(asyncio.Protocol):
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
        self.video: list[tuple[int, float]] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.first_byte:
            self.first_byte = now
        elif self.clock.measuring and now - self.last > self.max_gap:
            self.max_gap = now - self.last
        self.last = now
        self.bytes += len(data)
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
                        self.video.append((tag.timestamp, now))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _wait_live(host: str, port: int, path: str, timeout: float) -> None:
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


async def fanout(args: argparse.Namespace) -> dict[str, Any] | None:
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    server_cpus = {min(os.sched_getaffinity(0))} if pin else None
    load_cpus = set(os.sched_getaffinity(0)) - (server_cpus or set()) if pin else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    ramp_seconds = args.viewers / args.ramp + 2
    total = ramp_seconds + args.seconds + 3
    clip = make_clip(Path(args.out), total + 5)
    grpc_port, rtmp_port, http_port = _free_port(), _free_port(), _free_port()
    host = "127.0.0.1"
    procs = [_spawn(["serve", "relay", "--host", host, "--grpc-port", str(grpc_port)], load_cpus)]
    relay = f"{host}:{grpc_port}"
    procs.append(_spawn(["serve", "ingest", "--host", host, "--rtmp-port", str(rtmp_port), "--relay", relay],
                        load_cpus))
    playback = _spawn(["serve", "playback", "--host", host, "--http-port", str(http_port), "--relay", relay,
                       "--merge-ms", str(args.merge_ms)], server_cpus)
    procs.append(playback)
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    publisher = ctx.Process(target=run_in_process, args=(str(clip), host, rtmp_port, "live", "bench", total, sender))
    publisher.start()
    if load_cpus and publisher.pid:
        os.sched_setaffinity(publisher.pid, load_cpus)
    loop = asyncio.get_running_loop()
    viewers: list[Viewer] = []
    clock = Clock()
    try:
        await _wait_live(host, http_port, "/live/bench.flv", 20)
        request = f"GET /live/bench.flv HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        sample_every = max(1, args.viewers // max(1, args.sampled))
        for i in range(args.viewers):
            viewer = Viewer(request, clock, sampled=args.sampled > 0 and i % sample_every == 0)
            await loop.create_connection(lambda v=viewer: v, host, http_port)  # type: ignore[misc]
            viewers.append(viewer)
            await asyncio.sleep(1 / args.ramp)
        await asyncio.sleep(2)
        clock.measuring = True
        bytes0 = sum(v.bytes for v in viewers)
        cpu0, wall0 = _cpu_seconds(playback.pid), time.monotonic()
        load0 = time.process_time()
        rss = 0.0
        while time.monotonic() - wall0 < args.seconds:
            await asyncio.sleep(1)
            rss = max(rss, _rss_mb(playback.pid))
        cpu1, wall1 = _cpu_seconds(playback.pid), time.monotonic()
        load1 = time.process_time()
        bytes1 = sum(v.bytes for v in viewers)
        clock.measuring = False
        window = (wall0, wall1)
    finally:
        for viewer in viewers:
            if viewer.transport is not None:
                viewer.transport.abort()
        publisher.join(total + 30)
        sent: dict[int, float] = receiver.recv() if receiver.poll(5) else {}
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
    elapsed = window[1] - window[0]
    lags = [(arrival - sent[ts]) * 1000 for v in viewers for ts, arrival in v.video
            if ts in sent and window[0] <= arrival <= window[1]]
    ttff = [(v.first_video - v.started) * 1000 for v in viewers if v.first_video]
    ttfb = [(v.first_byte - v.started) * 1000 for v in viewers if v.first_byte]
    stalled = sum(1 for v in viewers if v.closed or not v.first_byte or v.max_gap > STALL)
    result = {
        "viewers": args.viewers,
        "seconds": round(elapsed, 1),
        "delivered_mbps": round((bytes1 - bytes0) * 8 / elapsed / 1e6, 1),
        "per_viewer_mbps": round((bytes1 - bytes0) * 8 / elapsed / 1e6 / max(1, args.viewers), 2),
        "playback_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 1),
        "playback_rss_mb": round(rss, 1),
        "load_generator_cpu_pct": round((load1 - load0) / elapsed * 100, 1),
        "ttff_ms_p50": round(_pct(ttff, 0.5), 1),
        "ttff_ms_max": round(max(ttff), 1) if ttff else None,
        "ttfb_ms_p95": round(_pct(ttfb, 0.95), 1),
        "lag_ms_p50": round(_pct(lags, 0.5), 1),
        "lag_ms_p95": round(_pct(lags, 0.95), 1),
        "lag_ms_max": round(max(lags), 1) if lags else None,
        "lag_samples": len(lags),
        "stalled_viewers": stalled,
        "max_gap_s": round(max((v.max_gap for v in viewers), default=0.0), 2),
        "merge_ms": args.merge_ms,
        "pinned": pin,
        "median_viewer_mbps": round(statistics.median([v.bytes for v in viewers]) * 8 / 1e6 / total, 2)
        if viewers else 0,
    }
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return result
