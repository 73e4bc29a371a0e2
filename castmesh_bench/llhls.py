"""`castmesh bench llhls`: low-latency HLS, one real 2 Mbps stream on loopback.

The measured server is pinned to CPU 0; the publisher (the cached 720p30 clip in real time, its own
process) and the load to the other CPUs. Two parts, in one run:
- clients: --clients LL-HLS clients in one process, each on one kept-alive HTTP/1.1 connection, doing what
  hls.js does in lowLatencyMode: a blocking playlist reload for the part the preload hint names
  (_HLS_msn/_HLS_part), then a fetch of every part the playlist lists that it has not had. The server is
  --server split (default: relay, ingest and playback as processes; the playback process is measured, as
  the issue's target is put) or up (`castmesh up`, every service in the measured process). Reported: the
  measured process's CPU% of one core over --seconds, requests per second, and for every part and client how
  long after the part's publication the client had the playlist listing it and the part's bytes, where a
  part's publication is the moment the first client learned of it (so the spread across clients; the first
  client's own delay is not in it). Target: under 50% of a core at 1000 clients, no client more than two
  part durations behind.
- browser: Chromium plays the stream over LL-HLS from the player page (tests/browser/latency.mjs, which
  `make browser` installs) for --seconds, and the page samples its latency every half second: now minus
  the program date time (ingest's receive time) of the frame on screen. Target: p50 <= 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools

from castmesh_bench.common import cpu_seconds, make_clip, pct, stop_all, wait_live
from castmesh_bench.fanout import start_servers
from castmesh_bench.rtmp_publisher import start_in_process

HOST = "127.0.0.1"
PART = re.compile(rb'#EXT-X-PART:DURATION=[\d.]+,URI="([^"]+)"')
SEQUENCE = re.compile(rb"#EXT-X-MEDIA-SEQUENCE:(\d+)")
SKIPPED = re.compile(rb"#EXT-X-SKIP:SKIPPED-SEGMENTS=(\d+)")
ROOT = Path(__file__).resolve().parent.parent
BenchPart = Callable[[argparse.Namespace, Any, int], Awaitable[dict[str, Any]]]  # args, the server, its HTTP port


def next_part(playlist: bytes) -> str:
    """The blocking-reload query for the part after the last one listed, as hls.js asks it."""
    sequence = SEQUENCE.search(playlist)
    if sequence is None:
        return ""
    skipped = SKIPPED.search(playlist)
    segments = playlist.count(b"#EXTINF:") + (int(skipped[1]) if skipped else 0)
    open_parts = playlist.rpartition(b"#EXTINF:")[2].count(b"#EXT-X-PART:")
    return f"&_HLS_msn={int(sequence[1]) + segments}&_HLS_part={open_parts}"


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("llhls", help="LL-HLS: blocking clients per core, and latency in Chromium",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="blocking LL-HLS clients (default 1000)")
    p.add_argument("--seconds", type=float, default=15, help="measured seconds per part (default 15)")
    p.add_argument("--parts", default="clients,browser", help="what to run (default clients,browser)")
    p.add_argument("--out", default="bench-out", help="where the clip is cached (default bench-out)")
    p.add_argument("--server", choices=["split", "up"], default="split",
                   help="the clients' server: split (the playback process measured) or up (default split)")
    p.add_argument("--no-pin", action="store_true", help="do not pin castmesh to CPU 0 and the load elsewhere")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


class LowLatencyClient(asyncio.Protocol):
    """One client following the live edge part by part, as hls.js does, on one kept-alive connection. A
    protocol on httptools' response parser rather than a coroutine on a StreamReader: a thousand of them
    share the load generator's one core, and its own delays would read as the server's."""

    def __init__(self, path: str, first_seen: dict[bytes, float], until: float) -> None:
        self.path = path
        self.first_seen = first_seen
        self.until = until
        self.listed: list[float] = []  # per new part: receipt of the playlist listing it minus its publication
        self.fetched: list[float] = []  # ... of the part's bytes
        self.requests = self.errors = 0
        self.measuring = False
        self.known: set[bytes] = set()
        self.want = ""  # the blocking-reload query for the next part
        self.parts: list[bytes] = []  # listed, not fetched yet
        self.asked: bytes | None = None  # the part being fetched; None: the playlist
        self.body: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.errors += 1
            self._close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status, body, self.body = self.parser.get_status_code(), b"".join(self.body), []
        now = time.monotonic()
        self.requests += 1
        if self.asked is not None:  # a part
            if self.measuring and self.known:
                self.fetched.append(now - self.first_seen[self.asked])
            self.errors += status != 200
            self.known.add(self.asked)
        elif status != 200:
            self.errors += status not in (503, 404) or self.measuring
            self.want = ""
            asyncio.get_running_loop().call_later(0.2, self._next)
            return
        else:
            new = [uri for uri in PART.findall(body) if uri not in self.known]
            for uri in new:
                published = self.first_seen.setdefault(uri, now)
                if self.measuring and self.known:
                    self.listed.append(now - published)
            self.parts = new[-3:] if not self.known else new  # a joining client starts near the edge
            if not self.known:
                self.known.update(new[:-3])
            self.want = next_part(body)
        self._next()

    def _next(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if time.monotonic() >= self.until:
            self._close()
            return
        self.asked = self.parts.pop(0) if self.parts else None
        path = self.path + self.want if self.asked is None else "/live/" + self.asked.decode()
        self.transport.write(b"GET %b HTTP/1.1\r\nHost: %b\r\n\r\n" % (path.encode(), HOST.encode()))

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _clients(args: argparse.Namespace, server: Any, http_port: int) -> dict[str, Any]:
    first_seen: dict[bytes, float] = {}
    path = "/live/bench.m3u8?format=llhls"
    until = time.monotonic() + args.clients / 500 + 8 + args.seconds
    loop = asyncio.get_running_loop()
    clients: list[LowLatencyClient] = []
    for _ in range(args.clients):
        client = LowLatencyClient(path, first_seen, until)
        try:
            await loop.create_connection(lambda: client, HOST, http_port)  # noqa: B023 (awaited here)
        except OSError:
            client.errors += 1
            client.done.set_result(None)
        clients.append(client)
        await asyncio.sleep(0.002)
    await asyncio.sleep(5)  # every client is following the edge
    for client in clients:
        client.measuring = True
    requests0 = sum(c.requests for c in clients)
    cpu0, wall0, load0 = cpu_seconds(server.pid), time.monotonic(), time.process_time()
    await asyncio.sleep(args.seconds)
    cpu1, wall1, load1 = cpu_seconds(server.pid), time.monotonic(), time.process_time()
    requests1 = sum(c.requests for c in clients)
    for client in clients:
        client.measuring = False
    await asyncio.gather(*(client.done for client in clients))
    listed = [d * 1000 for c in clients for d in c.listed]
    fetched = [d * 1000 for c in clients for d in c.fetched]
    elapsed = wall1 - wall0
    return {
        "clients": args.clients,
        "server": args.server,
        "server_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 1),
        "load_generator_cpu_pct": round((load1 - load0) / elapsed * 100, 1),
        "requests_per_s": round((requests1 - requests0) / elapsed),
        "parts_measured": len(fetched),
        "playlist_after_publication_ms_p50": round(pct(listed, 0.5), 1),
        "playlist_after_publication_ms_p99": round(pct(listed, 0.99), 1),
        "part_after_publication_ms_p50": round(pct(fetched, 0.5), 1),
        "part_after_publication_ms_p99": round(pct(fetched, 0.99), 1),
        "part_after_publication_ms_max": round(max(fetched), 1) if fetched else None,
        "errors": sum(c.errors for c in clients),
    }


def _browser(http_port: int, seconds: float) -> dict[str, Any]:
    script = ROOT / "tests" / "browser" / "latency.mjs"
    if not (ROOT / "tests" / "browser" / "node_modules").exists():
        return {"skipped": "run `make browser` first (playwright-core and Debian's chromium)"}
    result = subprocess.run(["node", str(script), f"http://{HOST}:{http_port}/", "live/bench", "llhls",
                             str(seconds)], capture_output=True, text=True, timeout=seconds + 120, check=False)
    if result.returncode != 0:
        return {"error": result.stderr[-500:]}
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    samples = [s["latency"] * 1000 for s in seen["samples"] if s["latency"] is not None]
    edge = [s["edge"] * 1000 for s in seen["samples"] if s.get("edge") is not None]
    return {"latency_ms_p50": round(pct(samples, 0.5)), "latency_ms_p95": round(pct(samples, 0.95)),
            "latency_ms_max": round(max(samples)) if samples else None, "samples": len(samples),
            "behind_live_edge_ms_p50": round(pct(edge, 0.5)), "target_ms": seen["samples"][-1].get("target"),
            "stalled_samples": seen["stalls"], "player_errors": seen["errors"],
            "player_warnings": sorted(set(seen.get("warnings") or [])),
            "series_ms": [round(s) for s in samples]}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    affinity = os.sched_getaffinity(0)
    server_cpus = {min(affinity)} if len(affinity) >= 2 and not args.no_pin else None
    load_cpus = affinity - server_cpus if server_cpus else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    parts = set(args.parts.split(","))
    total = 30 + (args.seconds + args.clients / 500 + 15 if "clients" in parts else 0) + (
        args.seconds + 40 if "browser" in parts else 0)
    clip = make_clip(Path(args.out), total)
    result: dict[str, Any] = {}
    if "clients" in parts:
        result["clients"] = await _run(args, args.server, clip, total, server_cpus, load_cpus, _clients)
    if "browser" in parts:  # the player page lists streams through the gateway: `castmesh up`
        result["browser"] = await _run(args, "up", clip, total, server_cpus, load_cpus, _browser_part)
    return result


async def _browser_part(args: argparse.Namespace, server: Any, http_port: int) -> dict[str, Any]:
    return await asyncio.to_thread(_browser, http_port, args.seconds)


async def _run(args: argparse.Namespace, kind: str, clip: Path, total: float, server_cpus: set[int] | None,
               load_cpus: set[int] | None, part: BenchPart) -> dict[str, Any]:
    """One part against a fresh server with the clip being published."""
    procs, server, rtmp_port, http_port, _ = start_servers(kind, HOST, server_cpus, load_cpus, Path(args.out))
    publisher, _ = start_in_process(clip, HOST, rtmp_port, total, load_cpus)
    try:
        await wait_live(HOST, http_port, "/live/bench.flv", 20)
        return dict(await part(args, server, http_port))
    finally:
        publisher.terminate()
        publisher.join(10)
        stop_all(procs)


def report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for part, values in result.items():
        print(part)
        for key, value in values.items():
            print(f"  {key:<36} {value}")
