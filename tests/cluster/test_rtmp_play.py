"""RTMP play from a playback node, next to HTTP-FLV, from one upstream subscription."""

from __future__ import annotations

import threading
import time

from tests.cluster.harness import Cluster
from tests.integration.harness import decode, free_port, publish, wait_live


def test_ffmpeg_plays_rtmp_from_a_playback_node(cluster: Cluster) -> None:
    cluster.relay("origin", "origin")
    rtmp_in = cluster.ingest()
    rtmp_out = free_port()
    http = cluster.playback(rtmp_port=rtmp_out)
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp_in}/live/edge", 8, fps=25, gop=200)
    flv = f"http://127.0.0.1:{http}/live/edge.flv"
    wait_live(flv)
    results: dict[str, tuple[dict[int, int], str]] = {}

    def view(url: str) -> None:
        results[url] = decode(url)

    urls = [f"rtmp://127.0.0.1:{rtmp_out}/live/edge", flv]
    viewers = [threading.Thread(target=view, args=(url,)) for url in urls]
    for t in viewers:
        t.start()
    time.sleep(2)
    (stream,) = cluster.stats("origin").streams
    for t in viewers:
        t.join(60)
    assert publisher.wait(30) == 0
    for url in urls:
        counts, errors = results[url]
        assert errors == "", (url, errors)
        assert abs(counts.get(0, 0) - 200) <= 10 and counts.get(1, 0) > 300, (url, counts)
    assert len(stream.subscribers) == 1  # both protocols share the playback node's one subscription
