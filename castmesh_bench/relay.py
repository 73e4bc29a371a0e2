"""`castmesh bench relay`: what one relay process costs per 2 Mbps stream, and the latency it adds.

One relay process (an origin) pinned to CPU 0. On the other CPU, this process publishes N copies of the
2 Mbps clip over one Relay.Publish call, as an ingest does (frames batched by 10 ms of media time, paced
in real time, each batch stamped with its send time), and reads each back on one Relay.Subscribe call, as
an edge or playback node does. Reported: the relay's CPU% and RSS, CPU% per stream and the streams one
core would carry at that rate (a linear extrapolation, which the fixed per-call costs make pessimistic),
and the relay hop's latency (arrival at the subscriber minus the send time of the batch's newest frame).

With --traced, the relay and this process trace every call (sampler always_on) into a span sink here:
what the gRPC interceptors and the per-stream spans cost, against a run without.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import grpc

from castmesh.media.flv import FlvReader
from castmesh.media.frames import make_frame, stream_key
from castmesh.mesh import grpcutil, tracing
from castmesh.mesh.channels import Accepted, Batch, End, Header
from castmesh.mesh.link import RelayLinks
from castmesh.proto.v1.media_pb2 import Frame, FrameBatch
from castmesh.proto.v1.relay_pb2 import PublishOpen, SubscribeOpen
from castmesh_bench.common import SpanSink, cpu_seconds, free_port, make_clip, pct, rss_mb, spawn, stop_all

HOST = "127.0.0.1"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("relay", help="2 Mbps streams through one relay: CPU per stream, hop latency")
    p.add_argument("--streams", type=int, default=200, help="streams published and subscribed (default 200)")
    p.add_argument("--seconds", type=float, default=15, help="measured seconds (default 15)")
    p.add_argument("--batch-ms", type=int, default=10, help="media time per batch, as ingest's --batch-ms (default 10)")
    p.add_argument("--traced", action="store_true", help="trace every call into a local OTLP sink")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--json", action="store_true")


def clip_batches(clip: Path, seconds: float, batch_ms: int) -> list[tuple[int, list[Frame]]]:
    """The clip as (media time ms, frames) batches of batch_ms of media each, as ingest would send them."""
    reader = FlvReader()
    frames = [make_frame(t.kind, t.timestamp, t.payload) for t in reader.feed(clip.read_bytes())]
    batches: list[tuple[int, list[Frame]]] = []
    for frame in frames:
        if frame.timestamp > seconds * 1000:
            break
        if batches and frame.timestamp - batches[-1][0] < batch_ms:
            batches[-1][1].append(frame)
        else:
            batches.append((frame.timestamp, [frame]))
    return batches


async def _publish(links: RelayLinks, address: str, count: int, batches: list[tuple[int, list[Frame]]],
                   start: float) -> None:
    """Publish `count` copies of the clip on one link, staggered over a second, paced in real time."""
    link = links.publish(address)
    channels = [link.open(PublishOpen(stream=stream_key("bench", f"s{i}"), session_id=f"s{i}")) for i in range(count)]
    answers = await asyncio.gather(*(channel.answer(10) for channel in channels))
    if not all(isinstance(a, Accepted) for a in answers):
        raise RuntimeError(f"the relay did not accept every publish: {answers[:3]}")
    schedule = sorted((start + (i * 0.037) % 1 + media_ms / 1000, i, n)
                      for i in range(count) for n, (media_ms, _) in enumerate(batches))
    for due, i, n in schedule:
        delay = due - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)
        frames = batches[n][1]
        batch = FrameBatch(frames=frames)
        batch.frames[-1].ingest_time_us = time.time_ns() // 1000
        channels[i].batch(batch, sum(len(f.payload) for f in frames))


def _subscribe(links: RelayLinks, address: str, count: int, lags: list[float], window: list[float]) -> None:
    link = links.subscribe(address)

    def on_event(ev: Header | Batch | End) -> None:
        if isinstance(ev, Batch) and ev.batch.frames:
            if window[0] <= time.monotonic() <= window[1]:
                lags.append((time.time() - ev.batch.frames[-1].ingest_time_us / 1e6) * 1000)

    for i in range(count):
        link.open(SubscribeOpen(stream=stream_key("bench", f"s{i}"), subscriber_id=f"s{i}"), on_event)


async def relay(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2
    if pin:
        os.sched_setaffinity(0, set(cpus[1:]))
    total = args.seconds + 6
    batches = clip_batches(make_clip(Path(args.out), total + 5), total, args.batch_ms)
    port = free_port()
    sink = SpanSink()
    await sink.server.start()
    if args.traced:  # this process too: the calls' client side, as an ingest and a playback node trace them
        os.environ.update(sink.env())
        tracing.setup("castmesh-bench")
    proc = spawn(["serve", "relay", "--host", HOST, "--grpc-port", str(port)], {cpus[0]} if pin else None,
                 env=sink.env() if args.traced else None)
    address = f"{HOST}:{port}"
    links = RelayLinks()
    lags: list[float] = []
    window = [float("inf"), float("inf")]
    try:
        await grpcutil.wait_ready(links.channels.get(address), address, 10)
        start = time.monotonic() + 1
        tasks = [asyncio.create_task(_publish(links, address, args.streams, batches, start))]
        await asyncio.sleep(0.5)
        _subscribe(links, address, args.streams, lags, window)
        await asyncio.sleep(start + 3 - time.monotonic())
        cpu0, wall0, load0 = cpu_seconds(proc.pid), time.monotonic(), time.process_time()
        out0, in0 = links.publishes[address].messages_out, links.subscribes[address].messages_in
        window[:] = [wall0, wall0 + args.seconds]
        await asyncio.sleep(args.seconds)
        cpu1, wall1, load1 = cpu_seconds(proc.pid), time.monotonic(), time.process_time()
        rss = rss_mb(proc.pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        span = wall1 - wall0
        messages = {"publish_messages_per_s": round((links.publishes[address].messages_out - out0) / span),
                    "subscribe_messages_per_s": round((links.subscribes[address].messages_in - in0) / span)}
    finally:
        await links.close()
        stop_all([proc])
        tracing.shutdown()
        await sink.server.stop(0)
    cpu_pct = (cpu1 - cpu0) / (wall1 - wall0) * 100
    per_stream = cpu_pct / args.streams
    return {
        "streams": args.streams,
        "relay_cpu_pct": round(cpu_pct, 1),
        "relay_rss_mb": round(rss, 1),
        "cpu_pct_per_stream": round(per_stream, 3),
        "streams_per_core_extrapolated": round(100 / per_stream) if per_stream else None,
        "hop_ms_p50": round(pct(lags, 0.5), 2),
        "hop_ms_p95": round(pct(lags, 0.95), 2),
        "samples": len(lags),
        **messages,
        "load_generator_cpu_pct": round((load1 - load0) / (wall1 - wall0) * 100, 1),
        "batch_ms": args.batch_ms,
        "traced": args.traced,
        "spans_received": sink.spans,
        "pinned": pin,
        "grpc": grpc.__version__,
    }
