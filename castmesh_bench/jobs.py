"""`castmesh bench record` and `castmesh bench forward`: how many 2 Mbps streams one worker core records, or
forwards, at once.

A worker process pinned to CPU 0 runs one job per stream (dispatch's --record or --forward rule for the app
"bench"); everything else is on CPU 1: dispatch, a relay (the origin), an ingest, the load (N castmesh RTMP
clients publishing the 720p30 2 Mbps clip in real time, staggered over a second, as `castmesh bench ingest`
does) and, for forwards, the far end: nginx with Debian's libnginx-mod-rtmp (`make peers`), taking every
forward into `application bench { live on; }`.
Measured over --seconds once every job runs: the worker's CPU% (per stream, and the streams one core would
take at that rate), its RSS, and what reached the end: bytes written to disk (castmesh_record_bytes_total)
or sent on (castmesh_forward_bytes_total) against the clip's bytes per second times the streams. When CPU 1
saturates, the load is the limit, not the worker: the load's own CPU is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from castmesh.media.flv import FlvReader
from castmesh_bench import nginx_rtmp
from castmesh_bench.common import cpu_seconds, free_port, make_clip, rss_mb, spawn, stop_all
from castmesh_bench.ingest import rtmp_load
from castmesh_bench.nginx_rtmp import MODULE

HOST = "127.0.0.1"
METRIC = {"record": "castmesh_record_bytes_total", "forward": "castmesh_forward_bytes_total"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    for kind, what in (("record", "records"), ("forward", "forwards to nginx-rtmp")):
        p = commands.add_parser(kind, help=f"2 Mbps streams one worker core {what} at once")
        p.add_argument("--streams", default="50,100", help="stream counts, comma-separated (default 50,100)")
        p.add_argument("--rounds", type=int, default=1, help="times each count is run (default 1)")
        p.add_argument("--seconds", type=float, default=20, help="measured seconds per run (default 20)")
        p.add_argument("--out", default="bench-out")
        p.add_argument("--json", action="store_true")


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(name))


def clip_bytes_per_second(clip: Path, seconds: float) -> float:
    tags = [t for t in FlvReader().feed(clip.read_bytes()) if t.timestamp <= seconds * 1000]
    return sum(len(t.payload) for t in tags) / (tags[-1].timestamp / 1000)


def one_run(kind: str, streams: int, seconds: float, clip: Path, out: Path, worker_cpus: set[int] | None,
            load_cpus: set[int] | None) -> dict[str, Any]:
    dispatch_port, relay_port, rtmp_port, metrics_port, far_port = (free_port() for _ in range(5))
    record_dir = Path(tempfile.mkdtemp(prefix="castmesh-bench-rec-", dir=out))
    rule = ["--record", "bench=60"] if kind == "record" else \
        ["--forward", f"bench=rtmp://{HOST}:{far_port}/live/{{name}}"]
    procs: list[subprocess.Popen[bytes]] = []
    far = nginx_rtmp.start(far_port, out, load_cpus) if kind == "forward" else None
    try:
        procs.append(spawn(["serve", "dispatch", "--host", HOST, "--grpc-port", str(dispatch_port), *rule],
                           load_cpus))
        dispatch = f"{HOST}:{dispatch_port}"
        procs.append(spawn(["serve", "relay", "--host", HOST, "--grpc-port", str(relay_port), "--dispatch",
                            dispatch], load_cpus))
        procs.append(spawn(["serve", "ingest", "--host", HOST, "--rtmp-port", str(rtmp_port), "--dispatch",
                            dispatch], load_cpus))
        worker = spawn(["serve", "worker", "--host", HOST, "--dispatch", dispatch, "--http-port", "0",
                        "--metrics-port", str(metrics_port), "--max-jobs", str(streams + 10),
                        "--record-dir", str(record_dir)], worker_cpus)
        procs.append(worker)
        ramp = 5.0
        total = ramp + seconds + 2
        ctx = multiprocessing.get_context("spawn")
        receiver, sender = ctx.Pipe(duplex=False)
        load = ctx.Process(target=rtmp_load, args=(str(clip), rtmp_port, streams, total, sender))
        load.start()
        if load_cpus and load.pid:
            os.sched_setaffinity(load.pid, load_cpus)
        try:
            if not receiver.poll(120):
                raise RuntimeError(f"{kind}: the publishers did not connect")
            receiver.recv()
            time.sleep(ramp)
            bytes0, cpu0, wall0 = metric(metrics_port, METRIC[kind]), cpu_seconds(worker.pid), time.monotonic()
            load0 = cpu_seconds(load.pid) if load.pid else 0.0
            rss = 0.0
            while time.monotonic() - wall0 < seconds:
                time.sleep(1)
                rss = max(rss, rss_mb(worker.pid))
            bytes1, cpu1, wall1 = metric(metrics_port, METRIC[kind]), cpu_seconds(worker.pid), time.monotonic()
            load1 = cpu_seconds(load.pid) if load.pid else 0.0
            receiver.poll(total + 30)
        finally:
            load.join(10)
            if load.is_alive():
                load.kill()
    finally:
        stop_all(procs)
        if far is not None:
            nginx_rtmp.stop(far)
        subprocess.run(["rm", "-rf", str(record_dir)], check=False)
    elapsed = wall1 - wall0
    cpu = (cpu1 - cpu0) / elapsed * 100
    expected = clip_bytes_per_second(clip, total) * streams * elapsed
    return {"kind": kind, "streams": streams, "worker_cpu_pct": round(cpu, 1),
            "cpu_pct_per_stream": round(cpu / streams, 3), "streams_per_core": round(100 / (cpu / streams)),
            "delivered": round((bytes1 - bytes0) / expected, 3), "worker_rss_mb": round(rss),
            "load_cpu_pct": round((load1 - load0) / elapsed * 100, 1)}


def run(args: argparse.Namespace) -> int:
    pin = len(os.sched_getaffinity(0)) >= 2
    worker_cpus = {min(os.sched_getaffinity(0))} if pin else None
    load_cpus = set(os.sched_getaffinity(0)) - (worker_cpus or set()) if pin else None
    out = Path(args.out).resolve()
    if args.bench == "forward" and not Path(MODULE).exists():
        raise SystemExit(f"no {MODULE}: `make peers` installs nginx with Debian's libnginx-mod-rtmp")
    clip = make_clip(out, args.seconds + 15)
    for _ in range(args.rounds):
        for streams in (int(n) for n in args.streams.split(",")):
            result = one_run(args.bench, streams, args.seconds, clip, out, worker_cpus, load_cpus)
            print(json.dumps(result) if args.json else
                  f"{args.bench} {streams:4} streams: worker {result['worker_cpu_pct']:5.1f}% "
                  f"({result['cpu_pct_per_stream']:.3f}% each, ~{result['streams_per_core']} per core), "
                  f"delivered {result['delivered']:.3f}, RSS {result['worker_rss_mb']} MB, "
                  f"load {result['load_cpu_pct']}%", flush=True)
    return 0
