"""`castmesh bench latency` and `castmesh bench failover`: what a viewer sees through a real cluster.

latency: the same real-time 2 Mbps clip, published over RTMP by a separate process that records when
each video frame left, played by sampled HTTP-FLV viewers; once through `castmesh up` (one process) and
once through ingest -> origin -> edge -> playback as separate processes (with dispatch), in one run.

failover: dispatch, two origins, ingest and playback as processes; the origin holding the stream is
killed with -9 mid-stream. Reported per run: the longest gap between video frames a viewer received
around the kill (the stall), and the time from the kill to the next keyframe.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from castmesh.bench.common import (
    Clock,
    close_viewers,
    free_port,
    lags_ms,
    make_clip,
    open_viewers,
    pct,
    spawn,
    stop_all,
    wait_live,
)
from castmesh.bench.rtmp_publisher import run_in_process
from castmesh.proto.v1.dispatch_pb2 import ListNodesRequest, ListStreamsRequest
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub

HOST = "127.0.0.1"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    lat = commands.add_parser("latency", help="publish-to-play latency: one process vs a 4-hop cluster")
    lat.add_argument("--seconds", type=float, default=15, help="measured seconds per setup (default 15)")
    lat.add_argument("--viewers", type=int, default=5, help="sampled HTTP-FLV viewers (default 5)")
    lat.add_argument("--out", default="bench-out")
    lat.add_argument("--json", action="store_true")
    fail = commands.add_parser("failover", help="viewer-visible stall when the origin is killed -9")
    fail.add_argument("--runs", type=int, default=3, help="kills (default 3); medians are reported")
    fail.add_argument("--out", default="bench-out")
    fail.add_argument("--json", action="store_true")


class Setup:
    """castmesh processes for one measurement; rtmp_port and http_port are where clients go."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.rtmp_port = self.http_port = 0
        self.dispatch = ""

    def start(self, name: str, args: list[str], port: int, ready: bytes = b"listening") -> None:
        self.procs[name] = spawn(args, ready=ready)
        self.ports[name] = port

    def single(self) -> Setup:
        self.rtmp_port, self.http_port = free_port(), free_port()
        self.start("up", ["up", "--no-demo", "--host", HOST, "--rtmp-port", str(self.rtmp_port),
                          "--http-port", str(self.http_port)], self.http_port, ready=b"Ctrl-C stops.")
        return self

    def cluster(self, origins: int = 1, edge: bool = True) -> Setup:
        port = free_port()
        self.dispatch = f"{HOST}:{port}"
        self.start("dispatch", ["serve", "dispatch", "--host", HOST, "--grpc-port", str(port)], port)
        common = ["--host", HOST, "--dispatch", self.dispatch]
        for i in range(origins):
            port = free_port()
            self.start(f"origin-{i}", ["serve", "relay", *common, "--grpc-port", str(port), "--role", "origin"], port)
        if edge:
            port = free_port()
            self.start("edge", ["serve", "relay", *common, "--grpc-port", str(port), "--role", "edge", "--zone", "z"],
                       port)
        self.rtmp_port, self.http_port = free_port(), free_port()
        self.start("ingest", ["serve", "ingest", *common, "--rtmp-port", str(self.rtmp_port)], self.rtmp_port)
        self.start("playback", ["serve", "playback", *common, "--http-port", str(self.http_port), "--rtmp-port",
                                "0", "--zone", "z"], self.http_port)
        self._wait_registered(len(self.procs) - 1)
        return self

    def _wait_registered(self, expected: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.dispatch) as chan:
            while len(DispatchStub(chan).ListNodes(ListNodesRequest(), timeout=5).nodes) < expected:
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster's nodes did not register with dispatch")
                time.sleep(0.05)

    def stop(self) -> None:
        stop_all(list(self.procs.values()))


def _publisher(clip: Path, rtmp_port: int, seconds: float) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_in_process, args=(str(clip), HOST, rtmp_port, "live", "bench", seconds, sender))
    proc.start()
    return proc, receiver


async def _measure_latency(setup: Setup, clip: Path, seconds: float, viewers: int) -> dict[str, Any]:
    publisher, receiver = _publisher(clip, setup.rtmp_port, seconds + 4)
    watching = []
    try:
        await wait_live(HOST, setup.http_port, "/live/bench.flv", 20)
        watching = await open_viewers(HOST, setup.http_port, "/live/bench.flv", viewers, Clock(), viewers)
        await asyncio.sleep(1)
        since = time.monotonic()
        await asyncio.sleep(seconds)
        until = time.monotonic()
    finally:
        close_viewers(watching)
        publisher.join(seconds + 30)
        sent: dict[int, float] = receiver.recv() if receiver.poll(5) else {}
    lags = lags_ms(watching, sent, since, until)
    return {"lag_ms_p50": round(pct(lags, 0.5), 1), "lag_ms_p95": round(pct(lags, 0.95), 1),
            "lag_ms_max": round(max(lags), 1) if lags else None, "samples": len(lags)}


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    clip = make_clip(Path(args.out), args.seconds + 10)
    result: dict[str, Any] = {}
    for name, build in (("single_process", Setup.single), ("cluster_4_hops", Setup.cluster)):
        setup = build(Setup())
        try:
            result[name] = await _measure_latency(setup, clip, args.seconds, args.viewers)
        finally:
            setup.stop()
    single, cluster = result["single_process"]["lag_ms_p50"], result["cluster_4_hops"]["lag_ms_p50"]
    result["p50_ratio_cluster_to_single"] = round(cluster / single, 2) if single else None
    return result


async def _origin_of(dispatch: str) -> str:
    async with grpc.aio.insecure_channel(dispatch) as chan:
        reply = await DispatchStub(chan).ListStreams(ListStreamsRequest(), timeout=5)
    return next((s.origin for s in reply.streams if s.stream.name == "bench"), "")


async def _one_failover(clip: Path) -> dict[str, Any]:
    setup = Setup().cluster(origins=2, edge=False)
    publisher, receiver = _publisher(clip, setup.rtmp_port, 14)
    watching = []
    try:
        await wait_live(HOST, setup.http_port, "/live/bench.flv", 20)
        watching = await open_viewers(HOST, setup.http_port, "/live/bench.flv", 3, Clock(), 3)
        await asyncio.sleep(4)
        origin = await _origin_of(setup.dispatch)
        victim = next(n for n, p in setup.ports.items() if origin.endswith(f":{p}"))
        setup.procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.sleep(6)
    finally:
        close_viewers(watching)
        publisher.join(40)
        if receiver.poll(5):
            receiver.recv()
        setup.stop()
    stalls, to_key = [], []
    for viewer in watching:
        arrivals = [at for _, at, _ in viewer.video if killed - 1 <= at <= killed + 6]
        if len(arrivals) > 1:
            stalls.append(max(b - a for a, b in itertools.pairwise(arrivals)))
        keys = [at for _, at, key in viewer.video if key and at > killed]
        to_key.append(keys[0] - killed if keys else float("inf"))
    return {"stall_s": round(max(stalls), 3) if stalls else None, "to_keyframe_s": round(max(to_key), 3)}


async def failover(args: argparse.Namespace) -> dict[str, Any]:
    clip = make_clip(Path(args.out), 30)
    runs = [await _one_failover(clip) for _ in range(args.runs)]
    stalls = [r["stall_s"] for r in runs if r["stall_s"] is not None]
    keys = [r["to_keyframe_s"] for r in runs]
    return {"runs": runs, "stall_s_median": statistics.median(stalls) if stalls else None,
            "to_keyframe_s_median": statistics.median(keys)}


def report(result: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
