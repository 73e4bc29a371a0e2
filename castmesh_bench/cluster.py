"""`castmesh bench latency` and `castmesh bench failover`: what a viewer sees through a real cluster.

latency: the same real-time 2 Mbps clip, published over RTMP by a separate process that records when
each video frame left, played by sampled HTTP-FLV viewers; once through `castmesh up` (one process) and
once through ingest -> origin -> edge -> playback as separate processes (with dispatch), in one run.

failover: dispatch, two origins, two edges, ingest and playback as processes (viewers on the playback
node, which pulls through an edge); one fault per run, injected early (4 s into the stream) and late
(after 30 s, past every retry window and grace period): the origin holding the stream killed with -9, the
edge serving it killed with -9, or dispatch killed with -9 and started again. Reported per fault kind and
time: the longest gap between video frames a viewer received around the fault (the stall, p50 and max
over viewers and runs), the time from the fault to the next keyframe, viewers that were disconnected, and
for a dispatch restart the time from the new dispatch listening until the stream is listed again.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from castmesh.proto.v1.dispatch_pb2 import ListNodesRequest, ListStreamsRequest
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.relay_pb2 import StatsRequest
from castmesh.proto.v1.relay_pb2_grpc import RelayStub
from castmesh_bench.common import (
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
from castmesh_bench.rtmp_publisher import start_in_process

HOST = "127.0.0.1"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    lat = commands.add_parser("latency", help="publish-to-play latency: one process vs a 4-hop cluster")
    lat.add_argument("--seconds", type=float, default=15, help="measured seconds per setup (default 15)")
    lat.add_argument("--viewers", type=int, default=5, help="sampled HTTP-FLV viewers (default 5)")
    lat.add_argument("--out", default="bench-out")
    lat.add_argument("--json", action="store_true")
    fail = commands.add_parser("failover", help="viewer-visible stall when an origin, an edge or dispatch dies")
    fail.add_argument("--runs", type=int, default=2, help="runs per fault kind and time (default 2)")
    fail.add_argument("--kinds", default="origin,edge,dispatch", help="faults to inject (default: all three)")
    fail.add_argument("--after", default="4,30", help="seconds into the stream to inject each fault (default 4,30)")
    fail.add_argument("--viewers", type=int, default=3, help="HTTP-FLV viewers (default 3)")
    fail.add_argument("--dispatch-down", type=float, default=2.0,
                      help="seconds a killed dispatch stays down before it is started again (default 2)")
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

    def cluster(self, origins: int = 1, edges: int = 1) -> Setup:
        port = free_port()
        self.dispatch = f"{HOST}:{port}"
        self.start("dispatch", ["serve", "dispatch", "--host", HOST, "--grpc-port", str(port)], port)
        common = ["--host", HOST, "--dispatch", self.dispatch]
        for i in range(origins):
            port = free_port()
            self.start(f"origin-{i}", ["serve", "relay", *common, "--grpc-port", str(port), "--role", "origin"], port)
        for i in range(edges):
            port = free_port()
            self.start(f"edge-{i}", ["serve", "relay", *common, "--grpc-port", str(port), "--role", "edge",
                                     "--zone", "z"], port)
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


async def _measure_latency(setup: Setup, clip: Path, seconds: float, viewers: int) -> dict[str, Any]:
    publisher, receiver = start_in_process(clip, HOST, setup.rtmp_port, seconds + 4)
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
    try:
        async with grpc.aio.insecure_channel(dispatch) as chan:
            reply = await DispatchStub(chan).ListStreams(ListStreamsRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return ""
    return next((s.origin for s in reply.streams if s.stream.name == "bench"), "")


async def _serving_edge(setup: Setup) -> str:
    for name, port in setup.ports.items():
        if name.startswith("edge-"):
            async with grpc.aio.insecure_channel(f"{HOST}:{port}") as chan:
                if (await RelayStub(chan).Stats(StatsRequest(), timeout=5)).streams:
                    return name
    raise RuntimeError("no edge serves the stream")


async def _inject(setup: Setup, kind: str, down: float) -> tuple[float, float]:
    """Inject one fault; when it happened, and when a restarted dispatch listened again. Processes are
    waited for on a thread: the viewers share this event loop, and a blocked loop would look like a stall."""
    if kind == "origin":
        origin = await _origin_of(setup.dispatch)
        victim = next(n for n, p in setup.ports.items() if origin.endswith(f":{p}"))
    elif kind == "edge":
        victim = await _serving_edge(setup)
    else:
        victim = "dispatch"
    setup.procs[victim].send_signal(signal.SIGKILL)
    at = time.monotonic()
    await asyncio.to_thread(setup.procs[victim].wait)
    if kind == "dispatch":
        await asyncio.sleep(down)
        port = setup.ports["dispatch"]
        await asyncio.to_thread(setup.start, "dispatch", ["serve", "dispatch", "--host", HOST, "--grpc-port",
                                                          str(port)], port)
    return at, time.monotonic()


async def _one_failover(clip: Path, kind: str, after: float, viewers: int, down: float) -> dict[str, Any]:
    setup = Setup().cluster(origins=2, edges=2)
    publisher, receiver = start_in_process(clip, HOST, setup.rtmp_port, after + 12 + down)
    watching = []
    relisted = None
    disconnected = 0
    try:
        await wait_live(HOST, setup.http_port, "/live/bench.flv", 20)
        watching = await open_viewers(HOST, setup.http_port, "/live/bench.flv", viewers, Clock(), viewers)
        await asyncio.sleep(after)
        fault, back = await _inject(setup, kind, down)
        if kind == "dispatch":
            while time.monotonic() - back < 6:
                if await _origin_of(setup.dispatch):
                    relisted = round(time.monotonic() - back, 3)  # from the new dispatch's listening
                    break
                await asyncio.sleep(0.02)
        await asyncio.sleep(max(0.0, back + 6 - time.monotonic()))
        disconnected = sum(v.closed for v in watching)  # the stream was still on: none should have ended
    finally:
        close_viewers(watching)
        publisher.join(after + 40)
        if receiver.poll(5):
            receiver.recv()
        setup.stop()
    stalls, to_key = [], []
    for viewer in watching:
        arrivals = [at for _, at, _ in viewer.video if fault - 1 <= at <= back + 6]
        gaps = [b - a for a, b in itertools.pairwise([fault - 1, *arrivals, back + 6])]
        stalls.append(max(gaps))  # from a second before the fault to six after it (or the restart), ends included
        keys = [at for _, at, key in viewer.video if key and at > fault]
        to_key.append(keys[0] - fault if keys else float("inf"))
    return {"stalls_s": [round(s, 3) for s in stalls], "to_keyframe_s": round(max(to_key), 3),
            "relisted_s": relisted, "disconnected": disconnected}


async def failover(args: argparse.Namespace) -> dict[str, Any]:
    afters = [float(a) for a in args.after.split(",")]
    clip = make_clip(Path(args.out), max(afters) + 14 + args.dispatch_down)
    result: dict[str, Any] = {}
    for after in afters:
        for kind in args.kinds.split(","):
            runs = [await _one_failover(clip, kind, after, args.viewers, args.dispatch_down)
                    for _ in range(args.runs)]
            stalls = [s for r in runs for s in r["stalls_s"]]
            relists = [r["relisted_s"] for r in runs if r["relisted_s"] is not None]
            result[f"{kind}@{after:g}s"] = {
                "stall_s_p50": statistics.median(stalls), "stall_s_max": max(stalls),
                "to_keyframe_s_median": statistics.median(r["to_keyframe_s"] for r in runs),
                "disconnected": sum(r["disconnected"] for r in runs),
                **({"relisted_s_median": statistics.median(relists) if relists else None,
                    "relisted_s": [r["relisted_s"] for r in runs]} if kind == "dispatch" else {}),
                "runs": runs}
    return result


def report(result: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
