"""A minute of faults, one after another, under HTTP-FLV viewers on two playback nodes behind two edges:
the origin holding the stream killed with -9, then the edge serving it, then dispatch restarted, then the
other origin, then the other edge, each killed node started again a few seconds later. Every viewer stays
connected to the end, never waits more than 3 s for a picture, never sees time go backwards, and what it
recorded decodes without an error."""

from __future__ import annotations

import itertools
import time

from tests.cluster.harness import Cluster
from tests.cluster.test_failover import assert_monotonic, decode_seen
from tests.integration.harness import publish, scrape, wait_live, watch_in_background

DOWN = 4  # seconds a killed node stays down
BETWEEN = 6  # seconds from a node's restart to the next fault


def serving_edges(cluster: Cluster) -> list[str]:
    return [name for name in ("edge-1", "edge-2") if cluster.stats(name).streams]


def test_viewers_stay_through_a_minute_of_faults(cluster: Cluster) -> None:
    cluster.relay("origin-1", "origin")
    cluster.relay("origin-2", "origin")
    cluster.relay("edge-1", "edge", zone="a")
    cluster.relay("edge-2", "edge", zone="a")
    rtmp = cluster.ingest()
    http = [cluster.playback("playback-1", zone="a"), cluster.playback("playback-2", zone="a")]
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/gauntlet", 70, fps=25, gop=25)
    urls = [f"http://127.0.0.1:{port}/live/gauntlet.flv" for port in http for _ in range(2)]
    for url in urls[::2]:
        wait_live(url)
    viewers = [watch_in_background(url, 100) for url in urls]
    time.sleep(6)
    log: list[str] = []

    def kill_and_restart(name: str) -> None:
        log.append(f"{time.monotonic():.1f} kill -9 {name}")
        cluster.kill9(name)
        time.sleep(DOWN)
        cluster.restart(name)
        time.sleep(BETWEEN)

    first_origin = cluster.name_at(cluster.origin_of("gauntlet"))
    kill_and_restart(first_origin)
    (first_edge,) = serving_edges(cluster)  # both playback nodes pull the stream through one edge
    kill_and_restart(first_edge)
    log.append(f"{time.monotonic():.1f} restart dispatch")
    cluster.restart_dispatch()
    time.sleep(BETWEEN + DOWN)
    holder = cluster.origin_of("gauntlet")
    assert holder, "the stream was not listed again after the dispatch restart"
    second_origin = cluster.name_at(holder)
    assert second_origin != first_origin  # the stream moved when the first origin died
    kill_and_restart(second_origin)
    (second_edge,) = serving_edges(cluster)
    assert second_edge != first_edge
    kill_and_restart(second_edge)

    assert publisher.wait(30) == 0, publisher.stderr.read() if publisher.stderr else ""
    for _, thread in viewers:
        thread.join(40)
    for i, (seen, _) in enumerate(viewers):
        what = f"viewer {i} of {urls[i]} ({'; '.join(log)})"
        assert seen.status == 200 and seen.error == "" and seen.ended_cleanly, f"{what}: {seen.error}"
        arrivals = [at for t, at in zip(seen.tags, seen.arrivals, strict=True) if t.kind == 9]
        gaps = [(round(b - a, 2), f"{a:.1f}") for a, b in itertools.pairwise(arrivals) if b - a > 3.0]
        assert not gaps, f"{what}: waited over 3 s for video (gap, at): {gaps}"
        assert_monotonic(seen.tags)
        counts, errors = decode_seen(seen)
        assert errors == "", f"{what}: {errors}"
        assert counts.get(0, 0) > 25 * 60, f"{what}: {counts}"  # ~68 s at 25 fps from the join
    for port in http:
        assert scrape(port)['castmesh_failovers_total{kind="upstream"}'] >= 1
