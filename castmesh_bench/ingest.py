"""`castmesh bench ingest`: how many 2 Mbps publishers one ingest core takes in and forwards, SRT beside
RTMP (or RTMPS beside RTMP), in the same run.

One ingest process pinned to CPU 0 forwards to one relay (an origin) on CPU 1. A load process on CPU 1
publishes N copies of the 720p30 2 Mbps clip in real time, staggered over a second:
- SRT: the clip as MPEG-TS (ffmpeg -c copy), 1316-byte messages paced by the clip's PCR, sent by N
  libsrt callers (castmesh's binding) from one thread, latency 200 ms;
- RTMP and RTMPS: N castmesh RTMP clients on one event loop, each tag at its timestamp.
Measured over --seconds once every publisher is up: ingest's CPU% (per stream, and the streams one core
would take at that rate), its RSS, the share of the clip's frames the relay received from it (what was
forwarded: 1.00 means everything), the load process's own CPU (when it nears 100% of CPU 1, the load is
the limit, not ingest).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import multiprocessing
import os
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import imageio_ffmpeg

from castmesh.media.flv import FlvReader, Tag
from castmesh.mesh.tls import self_signed
from castmesh_bench.common import cpu_seconds, free_port, make_clip, rss_mb, spawn, stop_all

HOST = "127.0.0.1"
MESSAGE = 1316
PROTOCOLS = ("srt", "rtmp", "rtmps")


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("ingest", help="2 Mbps publishers one ingest core takes: SRT (or RTMPS) beside RTMP")
    p.add_argument("--streams", default="50,100", help="publisher counts, comma-separated (default 50,100)")
    p.add_argument("--protocols", default="rtmp,srt", help="compared in each stage, in turn (default rtmp,srt)")
    p.add_argument("--rounds", type=int, default=1, help="times each (protocol, count) is run, interleaved")
    p.add_argument("--seconds", type=float, default=15, help="measured seconds per run (default 15)")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--json", action="store_true")


# The load -----------------------------------------------------------------------------------------------

def ts_messages(clip: Path) -> tuple[list[bytes], list[float]]:
    """The clip as MPEG-TS in SRT messages, and when each is due (seconds from the start, by the PCR last
    seen before it)."""
    ts = clip.with_suffix(".ts")
    if not ts.exists():
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i",
                        str(clip), "-c", "copy", "-f", "mpegts", str(ts) + ".tmp.ts"], check=True)
        os.replace(str(ts) + ".tmp.ts", ts)
    data = ts.read_bytes()
    messages, due = [], []
    first: int | None = None
    now = 0.0
    for at in range(0, len(data) - MESSAGE + 1, MESSAGE):
        for packet in range(at, at + MESSAGE, 188):
            if data[packet + 3] & 0x20 and data[packet + 4] >= 7 and data[packet + 5] & 0x10:
                b = data[packet + 6:packet + 11]
                pcr = (b[0] << 25) | (b[1] << 17) | (b[2] << 9) | (b[3] << 1) | (b[4] >> 7)
                first = pcr if first is None else first
                now = (pcr - first) / 90000
        messages.append(data[at:at + MESSAGE])
        due.append(now)
    return messages, due


def srt_load(clip: str, port: int, streams: int, seconds: float, ready: Any) -> None:
    """multiprocessing target: `streams` SRT callers sending the clip in real time for `seconds`."""
    from castmesh.srt import libsrt as s

    messages, due = ts_messages(Path(clip))
    srt = s.lib()
    socks = []
    for i in range(streams):
        sock = s.check("srt_create_socket", srt.srt_create_socket())
        s.set_int(sock, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
        s.set_int(sock, s.SRTO_LATENCY, 200)
        s.set_bytes(sock, s.SRTO_STREAMID, f"publish:bench/s{i}".encode())
        there = s.sockaddr(HOST, port)
        s.check("srt_connect", srt.srt_connect(sock, there, len(there)))
        s.set_int(sock, s.SRTO_SNDSYN, 0)
        socks.append(sock)
    start = time.monotonic() + 0.5
    schedule = [(start + (i * 0.037) % 1, i, 0) for i in range(streams)]
    heapq.heapify(schedule)
    ready.send(True)
    send, count = srt.srt_sendmsg, len(messages)
    full = 0
    while schedule:
        when, i, n = schedule[0]
        delay = when - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)
        if send(socks[i], messages[n], MESSAGE, -1, 0) < 0:
            full += 1
            srt.srt_clearlasterror()
        n += 1
        offset = when - due[n - 1]  # the stream's start
        if n < count and due[n] < seconds:
            heapq.heapreplace(schedule, (offset + due[n], i, n))
        else:
            heapq.heappop(schedule)
    for sock in socks:
        srt.srt_close(sock)
    ready.send({"unsent": full, "cpu": time.process_time()})


def rtmp_load(clip: str, port: int, streams: int, seconds: float, ready: Any, cert: str = "") -> None:
    """multiprocessing target: `streams` RTMP (RTMPS with `cert`) publishers of the clip in real time."""
    tags = [t for t in FlvReader().feed(Path(clip).read_bytes()) if t.timestamp <= seconds * 1000]
    asyncio.run(_rtmp_load(tags, port, streams, ready, cert))


async def _rtmp_load(tags: list[Tag], port: int, streams: int, ready: Any, cert: str) -> None:
    from castmesh.mesh.rtmp_client import RtmpClient

    trust = ssl.create_default_context(cafile=cert) if cert else None
    clients = [await RtmpClient.open(HOST, port, "bench", f"s{i}", tls=trust) for i in range(streams)]
    start = time.monotonic() + 0.5
    schedule = sorted((start + (i * 0.037) % 1 + tag.timestamp / 1000, i, n)
                      for i in range(streams) for n, tag in enumerate(tags))
    ready.send(True)
    for when, i, n in schedule:
        delay = when - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)
        tag = tags[n]
        clients[i].send_media(tag.kind, tag.timestamp, tag.payload)
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    ready.send({"unsent": 0, "cpu": time.process_time()})


# The run ------------------------------------------------------------------------------------------------

def relay_frames(port: int) -> float:
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[1]) for line in text.splitlines()
               if line.startswith("castmesh_relay_frames_in_total"))


def clip_frames_per_second(clip: Path, seconds: float) -> float:
    tags = [t for t in FlvReader().feed(clip.read_bytes()) if t.timestamp <= seconds * 1000]
    return len(tags) / (tags[-1].timestamp / 1000)


def one_run(protocol: str, streams: int, seconds: float, clip: Path, out: Path,
            ingest_cpus: set[int] | None, load_cpus: set[int] | None) -> dict[str, Any]:
    relay_port, relay_metrics, rtmp_port, srt_port = free_port(), free_port(), free_port(), free_port()
    rtmps_port = free_port()
    cert, key = self_signed(out) if protocol == "rtmps" else (None, None)
    procs = [spawn(["serve", "relay", "--host", HOST, "--grpc-port", str(relay_port), "--metrics-port",
                    str(relay_metrics)], load_cpus)]
    secure = ["--tls-cert", str(cert), "--tls-key", str(key), "--rtmps-port", str(rtmps_port)] if cert else []
    ingest = spawn(["serve", "ingest", "--host", HOST, "--rtmp-port", str(rtmp_port), "--relay",
                    f"{HOST}:{relay_port}", "--srt-port", str(srt_port if protocol == "srt" else 0),
                    *secure], ingest_cpus,
                   env={"CASTMESH_SRT_PORT": str(srt_port if protocol == "srt" else 0)})
    procs.append(ingest)
    ramp = 4.0
    total = ramp + seconds + 2
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    if protocol == "srt":
        load = ctx.Process(target=srt_load, args=(str(clip), srt_port, streams, total, sender))
    else:
        port = rtmps_port if protocol == "rtmps" else rtmp_port
        load = ctx.Process(target=rtmp_load, args=(str(clip), port, streams, total, sender, str(cert or "")))
    load.start()
    if load_cpus and load.pid:
        os.sched_setaffinity(load.pid, load_cpus)
    try:
        if not receiver.poll(120):
            raise RuntimeError(f"{protocol}: the publishers did not connect")
        receiver.recv()
        time.sleep(ramp)
        frames0, cpu0, wall0 = relay_frames(relay_metrics), cpu_seconds(ingest.pid), time.monotonic()
        load_cpu0 = cpu_seconds(load.pid) if load.pid else 0.0
        rss = 0.0
        while time.monotonic() - wall0 < seconds:
            time.sleep(1)
            rss = max(rss, rss_mb(ingest.pid))
        frames1, cpu1, wall1 = relay_frames(relay_metrics), cpu_seconds(ingest.pid), time.monotonic()
        load_cpu1 = cpu_seconds(load.pid) if load.pid else 0.0
        done = receiver.recv() if receiver.poll(total + 30) else {}
    finally:
        load.join(10)
        if load.is_alive():
            load.kill()
        stop_all(procs)
    elapsed = wall1 - wall0
    cpu = (cpu1 - cpu0) / elapsed * 100
    expected = clip_frames_per_second(clip, total) * streams * elapsed
    return {"protocol": protocol, "streams": streams, "ingest_cpu_pct": round(cpu, 1),
            "cpu_pct_per_stream": round(cpu / streams, 3), "streams_per_core": round(100 / (cpu / streams)),
            "forwarded": round((frames1 - frames0) / expected, 3), "ingest_rss_mb": round(rss),
            "load_cpu_pct": round((load_cpu1 - load_cpu0) / elapsed * 100, 1), "unsent": done.get("unsent", -1)}


def run(args: argparse.Namespace) -> int:
    pin = len(os.sched_getaffinity(0)) >= 2
    ingest_cpus = {min(os.sched_getaffinity(0))} if pin else None
    load_cpus = set(os.sched_getaffinity(0)) - (ingest_cpus or set()) if pin else None
    out = Path(args.out)
    counts = [int(n) for n in args.streams.split(",")]
    protocols = [p for p in args.protocols.split(",") if p in PROTOCOLS]
    clip = make_clip(out, args.seconds + 10)
    results = []
    for _ in range(args.rounds):
        for streams in counts:
            for protocol in protocols:
                result = one_run(protocol, streams, args.seconds, clip, out, ingest_cpus, load_cpus)
                results.append(result)
                print(json.dumps(result) if args.json else
                      f"{protocol:5} {streams:4} publishers: ingest {result['ingest_cpu_pct']:5.1f}% "
                      f"({result['cpu_pct_per_stream']:.3f}% each, ~{result['streams_per_core']} per core), "
                      f"forwarded {result['forwarded']:.3f}, RSS {result['ingest_rss_mb']} MB, "
                      f"load {result['load_cpu_pct']}%", flush=True)
    return 0

