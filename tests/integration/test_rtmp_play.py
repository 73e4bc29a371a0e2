"""RTMP play with the real ffmpeg: from `castmesh up`'s single RTMP port, next to the publisher."""

from __future__ import annotations

import threading

from tests.integration.harness import Up, decode, publish, wait_live


def test_ffmpeg_plays_rtmp_from_the_port_it_publishes_to(suite: Up) -> None:
    publisher = publish(suite.rtmp("both"), 8, fps=30, gop=240)
    wait_live(suite.flv("both"))
    results: list[tuple[dict[int, int], str]] = [({}, "")] * 2

    def view(i: int, url: str) -> None:
        results[i] = decode(url)

    # Two RTMP players and an HTTP-FLV viewer of the same stream at once.
    viewers = [threading.Thread(target=view, args=(0, suite.rtmp("both"))),
               threading.Thread(target=view, args=(1, suite.rtmp("both")))]
    for t in viewers:
        t.start()
    flv_counts, flv_errors = decode(suite.flv("both"))
    for t in viewers:
        t.join(60)
    assert publisher.wait(30) == 0
    for counts, errors in [*results, (flv_counts, flv_errors)]:
        assert errors == "", errors
        # One GOP for the clip: players that join a moment late still start at frame 0 from the GOP cache.
        assert abs(counts.get(0, 0) - 240) <= 12, counts
        assert counts.get(1, 0) > 300, counts  # 8 s of 44.1 kHz AAC is ~345 frames
    log = suite.process.log()
    assert log.count("protocol=rtmp") >= 4  # each player's start and stop


def test_playing_a_stream_nobody_publishes_is_refused_at_once(suite: Up) -> None:
    counts, errors = decode(suite.rtmp("nobody-here"), timeout=20)
    assert counts == {}
    assert "nobody is publishing this stream" in errors  # our onStatus description, as ffmpeg shows it
