"""A gRPC subscriber that stops reading, next to a normal HTTP-FLV viewer."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import grpc

from castmesh.media.frames import stream_key
from castmesh.proto.v1.relay_pb2 import SubscribeItem, SubscribeOpen, SubscribeRequest
from castmesh.proto.v1.relay_pb2_grpc import RelayStub
from tests.cluster.harness import Cluster
from tests.integration.harness import publish, wait_live, watch_in_background


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_stuck_subscriber_is_skipped_then_dropped_and_costs_bounded_memory(cluster: Cluster) -> None:
    origin = cluster.relay("origin", "origin", extra=["--max-lag-ms", "1000"])
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/heavy", 16, fps=30, gop=30, extra=[
        "-b:v", "8M", "-minrate", "8M", "-maxrate", "8M", "-bufsize", "1M", "-x264-params", "nal-hrd=cbr",
        "-preset", "ultrafast"])
    url = f"http://127.0.0.1:{http}/live/heavy.flv"
    wait_live(url)
    seen, viewer = watch_in_background(url, 30)

    # A subscriber that opens the stream and then never reads a message.
    channel = grpc.insecure_channel(origin, options=[("grpc.max_receive_message_length", 64 << 20)])
    stuck = RelayStub(channel).Subscribe(iter([SubscribeRequest(items=[SubscribeItem(channel=1, open=SubscribeOpen(
        stream=stream_key("live", "heavy"), subscriber_id="stuck"))])]))
    rss = []
    skipped = dropped = False
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and not dropped:
        time.sleep(0.5)
        rss.append(rss_mb(cluster.nodes["origin"].proc.pid))
        (stream,) = cluster.stats("origin").streams
        skipped = skipped or stream.skips > 0
        dropped = skipped and "stuck" not in stream.subscribers
    stuck.cancel()
    channel.close()
    assert publisher.wait(30) == 0
    viewer.join(30)

    assert skipped, "the stuck subscriber was never skipped"
    assert dropped, "the stuck subscriber was never dropped"
    assert "outcome=REASON_TOO_SLOW" in cluster.nodes["origin"].log()
    assert max(rss) - rss[0] < 40, f"relay memory grew from {rss[0]:.0f} to {max(rss):.0f} MB"
    assert seen.ended_cleanly
    video = [t.timestamp for t in seen.video()]
    assert len(video) > 300 and max(b - a for a, b in itertools.pairwise(video[1:])) <= 70  # no skip for it
