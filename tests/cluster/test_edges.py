"""Origin and edges: viewers in two zones, each zone's playback behind its own edge."""

from __future__ import annotations

import threading
import time

from tests.cluster.harness import Cluster
from tests.cluster.test_failover import AFTER, EARLY, assert_monotonic, decode_seen, twice
from tests.integration.harness import decode, publish, wait_live, watch_in_background


def test_viewers_on_two_playback_nodes_through_two_edges(cluster: Cluster) -> None:
    cluster.relay("origin", "origin")
    cluster.relay("edge-a", "edge", zone="a")
    cluster.relay("edge-b", "edge", zone="b")
    rtmp = cluster.ingest()
    http = {"a": cluster.playback("playback-a", zone="a"), "b": cluster.playback("playback-b", zone="b")}
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/wide", 8, fps=25, gop=250)
    urls = [f"http://127.0.0.1:{http[z]}/live/wide.flv" for z in ("a", "a", "b", "b")]
    wait_live(urls[0])
    wait_live(urls[2])
    results: list[tuple[dict[int, int], str]] = [({}, "")] * 4

    def view(i: int) -> None:
        results[i] = decode(urls[i])

    viewers = [threading.Thread(target=view, args=(i,)) for i in range(4)]
    for t in viewers:
        t.start()
    time.sleep(3)
    origin, edge_a, edge_b = cluster.stats("origin"), cluster.stats("edge-a"), cluster.stats("edge-b")
    for t in viewers:
        t.join(60)
    assert publisher.wait(30) == 0

    for counts, errors in results:
        assert errors == "", errors
        assert abs(counts.get(0, 0) - 200) <= 10 and counts.get(1, 0) > 250, counts
    # One subscription per edge at the origin, one per playback node at each edge: no duplicate back-to-source.
    (stream,) = origin.streams
    assert sorted(stream.subscribers) == sorted(s for s in stream.subscribers if s.startswith("relay-edge-"))
    assert len(stream.subscribers) == 2
    for edge, zone in ((edge_a, "a"), (edge_b, "b")):
        (pulled,) = edge.streams
        assert pulled.pulled and len(pulled.subscribers) == 1
        assert pulled.subscribers[0].startswith(f"playback-{http[zone]}:")


def test_playback_moves_to_another_edge_when_its_edge_dies(cluster: Cluster) -> None:
    """Early in the stream, and again (the killed edge started again) past every retry window."""
    cluster.relay("origin", "origin")
    cluster.relay("edge-1", "edge", zone="a")
    cluster.relay("edge-2", "edge", zone="a")
    rtmp = cluster.ingest()
    http = cluster.playback(zone="a")
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/hop", EARLY + AFTER + 9, fps=30, gop=30)
    url = f"http://127.0.0.1:{http}/live/hop.flv"
    wait_live(url)
    seen, viewer = watch_in_background(url, EARLY + AFTER + 27)

    def kill_the_serving_edge() -> float:
        serving = [name for name in ("edge-1", "edge-2") if cluster.stats(name).streams]
        assert len(serving) == 1  # the zone's playback pulls the stream through one edge only
        cluster.kill9(serving[0])
        killed_at = time.monotonic()
        time.sleep(2)
        other = "edge-2" if serving[0] == "edge-1" else "edge-1"
        assert cluster.stats(other).streams, "the other edge did not take over"
        cluster.restart(serving[0])
        return killed_at

    kills = twice(kill_the_serving_edge)
    assert publisher.wait(30) == 0
    viewer.join(30)
    assert seen.error == "" and seen.ended_cleanly
    for killed_at in kills:
        after = [at for t, at in zip(seen.tags, seen.arrivals, strict=True) if t.kind == 9 and at > killed_at]
        assert after and after[0] - killed_at < 2.0
    assert_monotonic(seen.tags)
    counts, errors = decode_seen(seen)
    assert errors == "" and counts.get(0, 0) > 30 * (EARLY + AFTER + 5)


def test_a_chain_of_edges_two_levels_deep(cluster: Cluster) -> None:
    cluster.relay("origin", "origin")
    first = cluster.relay("edge-1", "edge", zone="x")
    cluster.relay("edge-2", "edge", zone="y", extra=["--upstream", first])
    rtmp = cluster.ingest()
    http = cluster.playback(zone="y")
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/deep", 5, fps=25, gop=125)
    url = f"http://127.0.0.1:{http}/live/deep.flv"
    wait_live(url)
    result: list[tuple[dict[int, int], str]] = []
    viewer = threading.Thread(target=lambda: result.append(decode(url)))
    viewer.start()
    time.sleep(2)
    origin, edge1, edge2 = cluster.stats("origin"), cluster.stats("edge-1"), cluster.stats("edge-2")
    viewer.join(30)
    assert publisher.wait(20) == 0
    counts, errors = result[0]
    assert errors == "" and abs(counts.get(0, 0) - 125) <= 7
    assert [s.subscribers for s in origin.streams] == [[f"relay-edge-{cluster.ports['edge-1']}"]]
    assert [s.subscribers for s in edge1.streams] == [[f"relay-edge-{cluster.ports['edge-2']}"]]
    assert edge2.streams[0].pulled and edge2.streams[0].subscribers[0].startswith(f"playback-{http}:")
