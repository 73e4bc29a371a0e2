"""Metric helpers shared by the services."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import Counter, Histogram

from castmesh.proto.v1.media_pb2 import Frame

# From 1 ms to 10 s: a loopback hop is a few ms; a failover or a stuck queue shows up at the top.
AGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


FAILOVERS = Counter("castmesh_failovers", "Streams moved to another relay after theirs failed: an ingest's publish "
                    "to another origin (kind=origin), an edge's or a playback node's subscription to another "
                    "upstream (kind=upstream)", ["kind"])


def frame_age_histogram(name: str, where: str) -> Histogram:
    return Histogram(name, f"Age of frames on arrival at {where}: now minus when ingest received them (s)",
                     buckets=AGE_BUCKETS)


def observe_age(histogram: Histogram, frames: Sequence[Frame]) -> None:
    """Once per batch, for its newest frame: each hop's latency without per-frame cost."""
    if frames and frames[-1].ingest_time_us:
        histogram.observe(max(0.0, time.time() - frames[-1].ingest_time_us / 1e6))
