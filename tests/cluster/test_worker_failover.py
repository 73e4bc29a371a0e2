"""A worker killed with -9 under a viewer of a rendition: another worker takes the job within a few seconds,
the viewer stays connected and decodes on. The first fault comes after the stream has run past every retry
window and grace period (10 s), the second right after the first was healed (the job moves back)."""

from __future__ import annotations

import time

from castmesh.proto.v1.dispatch_pb2 import Job
from tests.cluster.harness import Cluster
from tests.cluster.test_failover import assert_monotonic, decode_seen
from tests.integration.harness import publish, wait_live, watch_in_background

RAN = 12  # seconds before the first fault: past the 10 s retry windows and grace periods
TAKEN_WITHIN = 5.0


def runner(cluster: Cluster, not_on: str = "") -> str:
    """The node name of the worker that runs the job (waiting until one that is not `not_on` does)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        jobs = [j for j in cluster.jobs() if j.state == Job.STATE_RUNNING and j.worker]
        if jobs and not jobs[0].worker.endswith(not_on or "\0"):
            return next(name for name, node in cluster.nodes.items()
                        if name.startswith("worker") and jobs[0].worker in node.log())
        time.sleep(0.1)
    raise TimeoutError(f"no worker runs the job: {cluster.jobs()}")


def test_a_killed_workers_job_moves_and_its_viewers_stay(cluster: Cluster) -> None:
    cluster.dispatch_with("--abr", "live=90p:x90:150k")
    cluster.relay("origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.worker("worker-a")
    cluster.worker("worker-b")
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/cam", RAN + 21, size="320x180", fps=30, gop=30)
    url = f"http://127.0.0.1:{http}/live/cam_90p.flv"
    wait_live(url, timeout=20)
    seen, viewer = watch_in_background(url, RAN + 17)
    time.sleep(RAN)
    first = runner(cluster)
    cluster.kill9(first)
    killed_at = time.monotonic()
    second = runner(cluster, not_on=first)
    took = time.monotonic() - killed_at
    cluster.restart(first)  # healed; then the second fault, right away
    time.sleep(4)
    cluster.kill9(second)
    killed_again = time.monotonic()
    third = runner(cluster, not_on=second)
    assert publisher.wait(60) == 0
    viewer.join(60)

    assert second != first and third == first and took < TAKEN_WITHIN, (first, second, third, took)
    assert seen.error == "" and seen.status == 200, seen.error  # connected throughout
    for fault in (killed_at, killed_again):
        after = [at for t, at in zip(seen.tags, seen.arrivals, strict=True)
                 if t.kind == 9 and t.payload[:2] == b"\x17\x01" and at > fault]
        assert after and after[0] - fault < TAKEN_WITHIN + 2, (fault, after[:2])
    assert_monotonic(seen.tags)
    counts, errors = decode_seen(seen)
    assert errors == "", errors
    assert counts.get(0, 0) > 30 * (RAN + 6), counts  # pictures all along, the takeovers' gaps aside
