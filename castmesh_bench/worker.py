"""`castmesh bench worker`: what an ABR ladder job costs, beside the same ladder done by one plain ffmpeg
command in the same run, and what a thumbnail costs per stream per refresh.

Ladder: the 720p30 2 Mbps bench clip into 480p + 360p (H.264, the worker's own encoder settings: the same
command line as the job's child, services.worker.abr.ffmpeg_args).
- plain: `ffmpeg -re -i clip.flv` with that filter graph and those encoders, writing to /dev/null: its CPU
  over --seconds of media;
- castmesh: dispatch (with the ladder as its rule), a relay, an ingest and a worker, each its own process;
  ffmpeg publishes the clip (-c copy) in real time; measured over --seconds once the renditions are live:
  the worker's CPU (its event loop: subscription, FLV to the child, the renditions' publishes) plus its
  ffmpeg child's.
Each is run --rounds times, interleaved; medians. Jobs per core in real time: 1 / (cores per job).

Thumbnails: --streams streams published (-c copy) into an app without a rule, each thumbnail asked of the
worker every second for --seconds: the worker's CPU (the streams' subscriptions, keyframe decodes, JPEG
encodes) per stream per refresh, and the decode and encode alone (castmesh_worker_thumbnail_cpu_seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import imageio_ffmpeg

from castmesh.mesh.jobs import parse_ladder
from castmesh_bench.common import cpu_seconds, free_port, make_clip, spawn, stop_all
from services.worker.abr import Planned, ffmpeg_args

LADDER = "480p:x480:1200k,360p:x360:800k"
SOURCE = (1280, 720)
HOST = "127.0.0.1"


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("worker", help="an ABR ladder job's CPU beside plain ffmpeg's; thumbnails' CPU")
    p.add_argument("--seconds", type=float, default=20, help="measured seconds of media per run (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="plain ffmpeg and castmesh runs each, interleaved")
    p.add_argument("--streams", type=int, default=4, help="streams whose thumbnails are asked for (default 4)")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--json", action="store_true")


def planned() -> list[Planned]:
    out = []
    for r in parse_ladder(LADDER):
        out.append(Planned(r, round(SOURCE[0] * r.height / SOURCE[1] / 2) * 2, r.height))
    return out


def children_cpu(pid: int) -> float:
    """CPU seconds of a process's live children (the worker's ffmpeg)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except FileNotFoundError:
                pass
    return total


def plain(clip: Path, seconds: float) -> float:
    """CPU seconds per media second of the ladder done by one ffmpeg command."""
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    args = ffmpeg_args(ffmpeg, planned(), True, [0, 0])
    at = args.index("pipe:0")
    args[at - 3:at + 1] = ["-y", "-t", str(seconds), "-re", "-f", "flv", "-i", str(clip)]  # the clip, not a pipe
    args = [a if not a.startswith("pipe:") else "/dev/null" for a in args]
    before = os.times()
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = os.times()
    return (after.children_user - before.children_user + after.children_system - before.children_system) / seconds


def castmesh(clip: Path, seconds: float) -> tuple[float, float]:
    """(CPU seconds per media second of the worker and its child, of which the child's)."""
    dispatch_port = free_port()
    procs = [spawn(["serve", "dispatch", "--host", HOST, "--grpc-port", str(dispatch_port), "--abr",
                    f"bench={LADDER}"])]
    dispatch = f"{HOST}:{dispatch_port}"
    rtmp = free_port()
    try:
        procs.append(spawn(["serve", "relay", "--host", HOST, "--grpc-port", str(free_port()), "--dispatch",
                            dispatch]))
        procs.append(spawn(["serve", "ingest", "--host", HOST, "--rtmp-port", str(rtmp), "--dispatch", dispatch]))
        worker = spawn(["serve", "worker", "--host", HOST, "--http-port", "0", "--dispatch", dispatch])
        procs.append(worker)
        publisher = subprocess.Popen([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-re",
                                      "-i", str(clip), "-t", str(seconds + 12), "-c", "copy", "-f", "flv",
                                      f"rtmp://{HOST}:{rtmp}/bench/s0"], stdin=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        procs.append(publisher)
        time.sleep(6)  # the job placed, its child started, its renditions published and past their first GOPs
        own, child = cpu_seconds(worker.pid), children_cpu(worker.pid)
        time.sleep(seconds)
        own_after, child_after = cpu_seconds(worker.pid), children_cpu(worker.pid)
        return (own_after - own + child_after - child) / seconds, (child_after - child) / seconds
    finally:
        stop_all(procs)


def thumbnails(clip: Path, seconds: float, streams: int) -> dict[str, float]:
    dispatch_port = free_port()
    procs = [spawn(["serve", "dispatch", "--host", HOST, "--grpc-port", str(dispatch_port)])]
    dispatch = f"{HOST}:{dispatch_port}"
    rtmp, http = free_port(), free_port()
    try:
        procs.append(spawn(["serve", "relay", "--host", HOST, "--grpc-port", str(free_port()), "--dispatch",
                            dispatch]))
        procs.append(spawn(["serve", "ingest", "--host", HOST, "--rtmp-port", str(rtmp), "--dispatch", dispatch]))
        worker = spawn(["serve", "worker", "--host", HOST, "--http-port", str(http), "--dispatch", dispatch])
        procs.append(worker)
        for i in range(streams):
            procs.append(subprocess.Popen(
                [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-re", "-i", str(clip),
                 "-t", str(seconds + 15), "-c", "copy", "-f", "flv", f"rtmp://{HOST}:{rtmp}/thumbs/s{i}"],
                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(3)

        def ask_all() -> None:
            for i in range(streams):
                with urllib.request.urlopen(f"http://{HOST}:{http}/thumbs/s{i}.jpg", timeout=15) as answer:
                    answer.read()

        ask_all()  # the first pictures (subscriptions start)
        made, decode = _metrics(http)
        own = cpu_seconds(worker.pid)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ask_all()
            time.sleep(1.0)
        own_after = cpu_seconds(worker.pid)
        made_after, decode_after = _metrics(http)
        refreshes = made_after - made
        return {"streams": streams, "refreshes": refreshes,
                "worker_cpu_ms_per_refresh": 1000 * (own_after - own) / max(1, refreshes),
                "decode_encode_ms_per_refresh": 1000 * (decode_after - decode) / max(1, refreshes),
                "worker_cpu_pct_per_stream": 100 * (own_after - own) / seconds / streams}
    finally:
        stop_all(procs)


def _metrics(http: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://{HOST}:{http}/metrics", timeout=5).read().decode()

    def value(name: str) -> float:
        found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(found[1]) if found else 0.0

    return value("castmesh_worker_thumbnails_made_total"), value("castmesh_worker_thumbnail_cpu_seconds_total")


def run(args: argparse.Namespace) -> int:
    clip = make_clip(Path(args.out), args.seconds + 30)
    plains, ours, childs = [], [], []
    for _ in range(args.rounds):
        plains.append(plain(clip, args.seconds))
        total, child = castmesh(clip, args.seconds)
        ours.append(total)
        childs.append(child)
        print(f"round: plain ffmpeg {plains[-1]:.3f} cores, castmesh job {total:.3f} (child {child:.3f})",
              flush=True)
    result: dict[str, Any] = {
        "ladder": LADDER, "source": "720p30 2 Mbps", "seconds": args.seconds, "rounds": args.rounds,
        "plain_cores": statistics.median(plains), "job_cores": statistics.median(ours),
        "job_child_cores": statistics.median(childs),
    }
    result["ratio"] = result["job_cores"] / result["plain_cores"]
    result["jobs_per_core"] = 1 / result["job_cores"]
    result["thumbnails"] = thumbnails(clip, args.seconds, args.streams)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ladder {LADDER} from 720p30: plain ffmpeg {result['plain_cores']:.3f} cores, castmesh job "
              f"{result['job_cores']:.3f} (ffmpeg child {result['job_child_cores']:.3f}): {result['ratio']:.3f}x, "
              f"{result['jobs_per_core']:.2f} jobs per core in real time")
        t = result["thumbnails"]
        print(f"thumbnails: {t['streams']} streams, {t['refreshes']:.0f} refreshes: worker "
              f"{t['worker_cpu_ms_per_refresh']:.1f} ms CPU per stream per refresh (decode+JPEG "
              f"{t['decode_encode_ms_per_refresh']:.1f} ms), {t['worker_cpu_pct_per_stream']:.2f}% of a core "
              f"per stream followed")
    return 0
