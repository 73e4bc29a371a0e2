"""`castmesh bench fanout`: one real 2 Mbps stream to N viewers on loopback, over HTTP-FLV, RTMP or HLS.

Setup, as the peer numbers in NOTES were taken: relay, ingest and playback run as separate processes;
playback is pinned to CPU 0, everything else (the viewers, the publisher) to the other CPUs. A 720p30
H.264 + AAC clip at 2 Mbps is encoded once (cached under --out) and published in real time by a separate
process that records when each video frame left. Viewers connect at --ramp per second; most only count
bytes, --sampled of them also decode the HTTP chunking and the FLV tags (or the RTMP chunk stream) to
measure lag (arrival minus publish time of the same frame) and time to first frame. HLS clients
(castmesh_bench.viewers.HlsClient) poll the playlist and fetch every new segment on kept-alive connections.

Reported: delivered Mbps, playback CPU% of one core and RSS over the measured window, time to first
frame, lag p50/p95/max, and stalled viewers (no data for over a second, or disconnected; for HLS, no new
segment for three target durations, or an error). The run is bounded: everything stops after the ramp
plus --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from castmesh.mesh import runtime
from castmesh.mesh.tls import self_signed
from castmesh_bench import nginx_rtmp
from castmesh_bench.common import (
    STALL,
    Clock,
    Viewer,
    close_viewers,
    cpu_seconds,
    free_port,
    lags_ms,
    make_clip,
    open_viewers,
    pct,
    rss_mb,
    spawn,
    stop_all,
    wait_live,
)
from castmesh_bench.rtmp_publisher import start_in_process
from castmesh_bench.viewers import HlsClient, RtmpViewer, open_rtmp_viewers


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("fanout", help="one 2 Mbps stream to N viewers (HTTP-FLV, RTMP or HLS) on loopback",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=["flv", "rtmp", "rtmps", "hls"], default="flv",
                   help="how viewers watch (default flv; rtmps: RTMP inside TLS, a certificate made for the run)")
    p.add_argument("--viewers", type=int, default=100, help="viewers or HLS clients (default 100)")
    p.add_argument("--seconds", type=float, default=20, help="measured seconds after the ramp (default 20)")
    p.add_argument("--sampled", type=int, default=20, help="viewers that parse FLV to measure lag (default 20)")
    p.add_argument("--ramp", type=int, default=200, help="viewer connections opened per second (default 200)")
    p.add_argument("--server", choices=["split", "up", "nginx-rtmp"], default="split",
                   help="split: relay, ingest and playback as processes (playback measured); up: `castmesh up`, "
                        "one process; nginx-rtmp: Debian's nginx with libnginx-mod-rtmp, the peer (RTMP only)")
    p.add_argument("--merge-ms", type=int, default=None, help="playback's merged-write window (default: castmesh's)")
    p.add_argument("--batch-ms", type=int, default=None, help="ingest's batch window (default: castmesh's)")
    p.add_argument("--out", default="bench-out", help="where the clip is cached (default bench-out)")
    p.add_argument("--no-pin", action="store_true", help="do not pin playback to CPU 0 and the load elsewhere")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _merged(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return total


def start_servers(server: str, host: str, server_cpus: set[int] | None, load_cpus: set[int] | None,
                  out: Path, merge_ms: float = 0, batch_ms: float = 0, rtmp_play: bool = False,
                  tls: tuple[Path, Path] | None = None,
                  ) -> tuple[list[subprocess.Popen[bytes]], subprocess.Popen[bytes], int, int, int]:
    """Start the server under test: (processes to stop, the measured one, RTMP publish port, HTTP port,
    RTMP play port: RTMPS's with `tls`, a certificate and key). split: relay and ingest on the load's CPUs,
    playback (measured) on the server's."""
    merge = ["--merge-ms", str(merge_ms)] if merge_ms else []
    batch = ["--batch-ms", str(batch_ms)] if batch_ms else []
    rtmps_port = free_port()
    secure = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1]), "--rtmps-port", str(rtmps_port),
              "--https-port", str(free_port())] if tls else []
    if server == "nginx-rtmp":
        if not rtmp_play:
            raise SystemExit("nginx-rtmp serves RTMP play only: use --protocol rtmp")
        port = free_port()
        nginx = nginx_rtmp.start(port, out, server_cpus)
        return [], nginx, port, 0, port
    if server == "up":
        rtmp_port, http_port = free_port(), free_port()
        up = spawn(["up", "--no-demo", "--host", host, "--rtmp-port", str(rtmp_port), "--http-port", str(http_port),
                    *secure, *merge, *batch], server_cpus, ready=b"Ctrl-C stops.")
        return [up], up, rtmp_port, http_port, rtmps_port if tls else rtmp_port
    grpc_port, rtmp_port, http_port, play_port = free_port(), free_port(), free_port(), free_port()
    procs = [spawn(["serve", "relay", "--host", host, "--grpc-port", str(grpc_port)], load_cpus)]
    relay = f"{host}:{grpc_port}"
    procs.append(spawn(["serve", "ingest", "--host", host, "--rtmp-port", str(rtmp_port), "--relay", relay,
                        *batch], load_cpus))
    playback = spawn(["serve", "playback", "--host", host, "--http-port", str(http_port), "--rtmp-port",
                      str(play_port if rtmp_play else 0), "--relay", relay, *secure, *merge], server_cpus)
    procs.append(playback)
    return procs, playback, rtmp_port, http_port, rtmps_port if tls else play_port


def _write_share(host: str, port: int) -> float | None:
    """castmesh_playback_write_share from the server's /metrics (how busy its writes kept it lately)."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("castmesh_playback_write_share "):
            return round(float(line.split()[1]), 3)
    return None


def run(args: argparse.Namespace) -> int:
    result = runtime.run(fanout(args))
    return 0 if result else 1


async def fanout(args: argparse.Namespace) -> dict[str, Any] | None:
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    server_cpus = {min(os.sched_getaffinity(0))} if pin else None
    load_cpus = set(os.sched_getaffinity(0)) - (server_cpus or set()) if pin else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    ramp_seconds = args.viewers / args.ramp + 2
    total = ramp_seconds + args.seconds + (12 if args.protocol == "hls" else 3)  # HLS: first segment, settling
    clip = make_clip(Path(args.out), total + 5)
    host = "127.0.0.1"
    tls = self_signed(Path(args.out)) if args.protocol == "rtmps" else None
    procs, playback, rtmp_port, http_port, play_port = start_servers(
        args.server, host, server_cpus, load_cpus, Path(args.out), args.merge_ms, args.batch_ms,
        rtmp_play=args.protocol in ("rtmp", "rtmps"), tls=tls)
    publisher, receiver = start_in_process(clip, host, rtmp_port, total, load_cpus)
    viewers: list[Viewer | RtmpViewer] = []
    clients: list[HlsClient] = []
    tasks: list[asyncio.Task[None]] = []
    clock = Clock()
    try:
        if args.server == "nginx-rtmp":
            await asyncio.sleep(3)  # nginx-rtmp has no HTTP side to ask whether the stream is live
        else:
            await wait_live(host, http_port, "/live/bench.flv", 20)
        if args.protocol == "flv":
            viewers += await open_viewers(host, http_port, "/live/bench.flv", args.viewers, clock, args.sampled,
                                          args.ramp)
        elif args.protocol in ("rtmp", "rtmps"):
            trust = ssl.create_default_context(cafile=str(tls[0])) if tls else None
            viewers += await open_rtmp_viewers(host, play_port, "live", "bench", args.viewers, clock, args.sampled,
                                               args.ramp, trust)
        else:
            await wait_live(host, http_port, "/live/bench.m3u8", 20)
            until = time.monotonic() + ramp_seconds + args.seconds + 6
            for _ in range(args.viewers):
                clients.append(HlsClient(host, http_port, "/live/bench.m3u8", clock))
                tasks.append(asyncio.get_running_loop().create_task(clients[-1].run(until)))
                await asyncio.sleep(1 / args.ramp)
        await asyncio.sleep(2 if args.protocol != "hls" else 5)  # HLS: let the clients settle into polling
        clock.measuring = True
        bytes0 = sum(v.bytes for v in viewers) + sum(c.bytes for c in clients)
        requests0 = sum(c.requests for c in clients)
        cpu0, wall0 = cpu_seconds(playback.pid), time.monotonic()
        load0 = time.process_time()
        rss = 0.0
        while time.monotonic() - wall0 < args.seconds:
            await asyncio.sleep(1)
            rss = max(rss, rss_mb(playback.pid))
        cpu1, wall1 = cpu_seconds(playback.pid), time.monotonic()
        write_share = _write_share(host, http_port) if http_port else None
        load1 = time.process_time()
        bytes1 = sum(v.bytes for v in viewers) + sum(c.bytes for c in clients)
        requests1 = sum(c.requests for c in clients)
        clock.measuring = False
        window = (wall0, wall1)
    finally:
        for task in tasks:
            task.cancel()
        close_viewers(viewers)
        publisher.join(total + 30)
        sent: dict[int, float] = receiver.recv() if receiver.poll(5) else {}
        stop_all(procs)
        if args.server == "nginx-rtmp":
            nginx_rtmp.stop(playback)
    elapsed = window[1] - window[0]
    lags = lags_ms(viewers, sent, *window)
    ttff = [(v.first_video - v.started) * 1000 for v in viewers if v.first_video]
    ttfb = [(v.first_byte - v.started) * 1000 for v in viewers if v.first_byte]
    stalled = sum(1 for v in viewers if v.closed or not v.first_byte or v.max_gap > STALL)
    stalled += sum(1 for c in clients if c.errors or c.max_wait > 3 * 2.5 or not c.segments)
    result = {
        "protocol": args.protocol,
        "viewers": args.viewers,
        "seconds": round(elapsed, 1),
        "delivered_mbps": round((bytes1 - bytes0) * 8 / elapsed / 1e6, 1),
        "per_viewer_mbps": round((bytes1 - bytes0) * 8 / elapsed / 1e6 / max(1, args.viewers), 2),
        "playback_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 1),
        "playback_rss_mb": round(rss, 1),
        "load_generator_cpu_pct": round((load1 - load0) / elapsed * 100, 1),
        "ttff_ms_p50": round(pct(ttff, 0.5), 1),
        "ttff_ms_max": round(max(ttff), 1) if ttff else None,
        "ttfb_ms_p95": round(pct(ttfb, 0.95), 1),
        "lag_ms_p50": round(pct(lags, 0.5), 1),
        "lag_ms_p95": round(pct(lags, 0.95), 1),
        "lag_ms_max": round(max(lags), 1) if lags else None,
        "lag_samples": len(lags),
        "stalled_viewers": stalled,
        "hls_requests_per_s": round((requests1 - requests0) / elapsed, 1) if clients else None,
        "hls_errors": sum(c.errors for c in clients) if clients else None,
        "hls_error_kinds": _merged([c.problems for c in clients]) if clients else None,
        "hls_max_wait_s": round(max((c.max_wait for c in clients), default=0.0), 2) if clients else None,
        "max_gap_s": round(max((v.max_gap for v in viewers), default=0.0), 2),
        "server": args.server,
        "write_share": write_share,
        "merge_ms": args.merge_ms,
        "batch_ms": args.batch_ms,
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
