"""The benchmarks' publisher: castmesh's own RTMP client (castmesh.mesh.rtmp_client) plays an FLV file to
an RTMP server in real time and records when each video frame left, so viewers' lag can be measured
against the moment of publishing.

Runs in its own process, so the viewers' load does not delay the publisher's clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from castmesh.media.flv import FlvReader
from castmesh.mesh.rtmp_client import RtmpClient
from castmesh.rtmp import chunks


async def publish_file(path: Path, host: str, port: int, app: str, name: str, seconds: float,
                       key: str = "timestamp", stop: Any = None) -> dict[Any, float]:
    """Publish up to `seconds` of the file in real time, or until `stop` (a multiprocessing Event) is set;
    return {video timestamp: monotonic send time}, or with key="content", {a picture's last 32 bytes: send
    time} (for receivers that renumber timestamps)."""
    client = await RtmpClient.open(host, port, app, name)
    sent: dict[Any, float] = {}
    flv = FlvReader()
    start = time.monotonic()
    first_ts: int | None = None
    with path.open("rb") as clip:
        while True:
            data = clip.read(1 << 16)
            if not data:
                break
            for tag in flv.feed(data):
                first_ts = tag.timestamp if first_ts is None else first_ts
                due = start + (tag.timestamp - first_ts) / 1000
                if due - start > seconds or (stop is not None and stop.is_set()):
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                client.send_media(tag.kind, tag.timestamp, tag.payload)
                if tag.kind == chunks.VIDEO:
                    sent[tag.timestamp if key == "timestamp" else bytes(tag.payload[-32:])] = time.monotonic()
            else:
                continue
            break
    await client.close()
    return sent


def run_in_process(path: str, host: str, port: int, app: str, name: str, seconds: float, conn: object,
                   key: str = "timestamp", stop: Any = None) -> None:
    """multiprocessing target: publish, then send the send-time table back through the pipe."""
    result = asyncio.run(publish_file(Path(path), host, port, app, name, seconds, key, stop))
    conn.send(result)  # type: ignore[attr-defined]


def start_in_process(clip: Path, host: str, port: int, seconds: float,
                     cpus: set[int] | None = None) -> tuple[Any, Any]:
    """Publish `clip` to rtmp://host:port/live/bench in its own process (pinned to `cpus`, if given): the
    process, and the pipe its send-time table comes back on when it is done."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_in_process, args=(str(clip), host, port, "live", "bench", seconds, sender))
    proc.start()
    if cpus and proc.pid:
        os.sched_setaffinity(proc.pid, cpus)
    return proc, receiver
