"""Origin and edges: viewers in two zones, each zone's playback behind its own edge."""

from __future__ import annotations

import threading
import time

from tests.cluster.harness import Cluster
from tests.integration.harness import decode, publish, wait_live


def test_viewers_on_two_playback_nodes_through_two_edges(cluster: Cluster) -> None:
    cluster.relay("origin", "origin")
    cluster.relay("edge-a", "edge", zone="a")
    cluster.relay("edge-b", "edge", zone="b")
    rtmp = cluster.ingest()
    http = {"a": cluster.playback("playback-a", zone="a"), "b": cluster.playback("playback-b", zone="b")}
    time.sleep(1.0)  # registrations reach dispatch
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
