"""Failures that viewers must not notice: an origin killed with -9, a publisher that reconnects, a
dispatch restart. Each fault is injected early in a stream (EARLY), healed, and injected again AFTER s
after the first: by then the stream has run longer than every retry window and grace period (10 s each),
and the windows the first fault opened have been given back; a stream's first seconds hide clock bugs."""

from __future__ import annotations

import itertools
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from castmesh.media.flv import Tag
from tests.cluster.harness import Cluster
from tests.integration.harness import Viewing, decode, publish, scrape, wait_live, watch, watch_in_background

EARLY = 4  # seconds a stream runs before its first fault
AFTER = 12  # seconds from the first fault to the second: past every retry window and grace period (10 s)


def twice(fault: Callable[[], float]) -> list[float]:
    """A fault EARLY s into the stream, and again AFTER s after the first: `fault` injects it, checks that
    the cluster got over it, heals it, and returns when it was injected. When each was."""
    time.sleep(EARLY)
    first = fault()
    time.sleep(max(0.0, first + AFTER - time.monotonic()))
    return [first, fault()]


def decode_seen(seen: Viewing) -> tuple[dict[int, int], str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seen.flv"
        path.write_bytes(seen.flv_bytes())
        return decode(str(path))


def assert_monotonic(tags: list[Tag]) -> None:
    for kind in (8, 9):
        ts = [t.timestamp for t in tags if t.kind == kind]
        backwards = [(a, b) for a, b in itertools.pairwise(ts) if b < a]
        assert not backwards, f"kind {kind} went backwards: {backwards[:3]}"


def test_origin_killed_while_publishing_and_viewing(cluster: Cluster) -> None:
    cluster.relay("origin-1", "origin")
    cluster.relay("origin-2", "origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/survivor", EARLY + AFTER + 10, fps=30, gop=30)
    url = f"http://127.0.0.1:{http}/live/survivor.flv"
    wait_live(url)
    seen, viewer = watch_in_background(url, EARLY + AFTER + 26)

    def kill_the_holder() -> float:  # the holder, then (started again) the one the stream moved to
        victim = cluster.name_at(cluster.origin_of("survivor"))
        cluster.kill9(victim)
        killed_at = time.monotonic()
        time.sleep(2)
        survivor_origin = cluster.origin_of("survivor")
        deadline = time.monotonic() + 8  # the directory catches up once ingest has re-leased (viewers did not wait)
        while time.monotonic() < deadline and (not survivor_origin or cluster.name_at(survivor_origin) == victim):
            time.sleep(0.2)
            survivor_origin = cluster.origin_of("survivor")
        assert survivor_origin and cluster.name_at(survivor_origin) != victim, (victim, survivor_origin)
        cluster.restart(victim)
        return killed_at

    kills = twice(kill_the_holder)
    assert publisher.wait(30) == 0, publisher.stderr.read() if publisher.stderr else ""
    viewer.join(30)

    assert seen.error == "" and seen.ended_cleanly  # the viewer's connection stayed open throughout
    for killed_at in kills:
        keyframes_after = [at for t, at in zip(seen.tags, seen.arrivals, strict=True)
                           if t.kind == 9 and t.payload[:2] == b"\x17\x01" and at > killed_at]
        assert keyframes_after and keyframes_after[0] - killed_at < 3.0
    assert_monotonic(seen.tags)
    counts, errors = decode_seen(seen)
    assert errors == "", errors
    assert counts.get(0, 0) > 30 * (EARLY + AFTER + 6)  # the whole publish at 30 fps, minus the join
    assert cluster.nodes["ingest"].log().count("publish.failover ") >= 2
    metrics = scrape(http)  # the playback node followed the stream to the other origin: a restarted call
    assert metrics['castmesh_failovers_total{kind="upstream"}'] >= 2
    assert metrics['castmesh_link_calls_broken_total{call="subscribe"}'] >= 2
    assert metrics['castmesh_link_calls_opened_total{call="subscribe"}'] >= 3


def test_publisher_reconnects_within_the_grace_period(cluster: Cluster) -> None:
    cluster.relay("origin", "origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.wait_registered()
    rtmp_url, url = f"rtmp://127.0.0.1:{rtmp}/live/phoenix", f"http://127.0.0.1:{http}/live/phoenix.flv"
    publishers = [publish(rtmp_url, EARLY + 26, fps=25, gop=25)]
    wait_live(url)
    seen, viewer = watch_in_background(url, EARLY + AFTER + 24)

    def vanish() -> float:  # no unpublish: the publisher just vanishes; another comes 2 s later
        publishers[-1].kill()
        publishers[-1].wait()
        killed_at = time.monotonic()
        time.sleep(2)
        publishers.append(publish(rtmp_url, AFTER + 10 if len(publishers) == 1 else 5, fps=25, gop=25))
        return killed_at

    kills = twice(vanish)
    publisher = publishers[-1]
    assert publisher.wait(30) == 0, publisher.stderr.read() if publisher.stderr else ""
    viewer.join(30)

    assert seen.error == "" and seen.ended_cleanly
    video = [(t, at) for t, at in zip(seen.tags, seen.arrivals, strict=True) if t.kind == 9]
    first = [t for t, at in video if at < kills[0]]
    second = [t for t, at in video if kills[0] + 1 < at < kills[1]]
    third = [t for t, at in video if at > kills[1] + 1]
    assert len(first) > 15 * EARLY and len(second) > 15 * (AFTER - 3) and len(third) > 100, \
        (len(first), len(second), len(third))  # every publisher's pictures reached the same viewer
    assert_monotonic(seen.tags)
    counts, errors = decode_seen(seen)
    assert errors == "", errors
    assert counts.get(0, 0) >= len(first) + len(second) + len(third) - 10
    assert cluster.nodes["origin"].log().count("publish.lost ") >= 2


def test_duplicate_publish_through_two_ingests_is_rejected(cluster: Cluster) -> None:
    cluster.relay("origin", "origin")
    rtmp_a, rtmp_b = cluster.ingest("ingest-a"), cluster.ingest("ingest-b")
    http = cluster.playback()
    cluster.wait_registered()
    first = publish(f"rtmp://127.0.0.1:{rtmp_a}/live/only", 6)
    wait_live(f"http://127.0.0.1:{http}/live/only.flv")
    second = publish(f"rtmp://127.0.0.1:{rtmp_b}/live/only", 4)
    assert second.wait(20) != 0
    stderr = second.stderr.read().decode() if second.stderr else ""
    assert "BadName" in stderr or "already" in stderr, stderr
    assert first.poll() is None  # the first publisher is still going
    assert first.wait(20) == 0
    assert "lease.rejected" in cluster.nodes["dispatch"].log()




def test_dispatch_restart_forgets_nothing_viewers_need(cluster: Cluster) -> None:
    cluster.relay("origin", "origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/steadfast", EARLY + AFTER + 12, fps=25, gop=25)
    url = f"http://127.0.0.1:{http}/live/steadfast.flv"
    wait_live(url)
    seen, viewer = watch_in_background(url, EARLY + AFTER + 28)

    def restart_dispatch() -> float:
        cluster.restart_dispatch()
        restarted = time.monotonic()
        # Relays re-register and ingest claims its stream again, at the origin where it runs: within a second
        # or two (`castmesh bench failover` measures it). The bound here is only what a test may wait.
        deadline = time.monotonic() + 15
        while cluster.origin_of("steadfast") == "" and time.monotonic() < deadline:
            time.sleep(0.2)
        origin = cluster.origin_of("steadfast")
        assert origin and cluster.name_at(origin) == "origin"
        newcomer = watch(url, 2.0)
        assert newcomer.status == 200 and len(newcomer.video()) > 20
        return restarted

    twice(restart_dispatch)
    assert publisher.wait(30) == 0
    viewer.join(30)
    assert seen.error == "" and seen.ended_cleanly  # the first viewer never noticed
    assert cluster.nodes["ingest"].log().count("lease.reclaimed ") >= 2


@pytest.mark.parametrize("cluster", ["dispatch"], indirect=True)  # the registry is the FLV tests' business
def test_a_whep_viewer_keeps_playing_when_its_origin_is_killed(cluster: Cluster) -> None:
    """WebRTC's viewers hang on the same feed as FLV's, so an origin killed with -9 after 30 s (past every
    retry window) must not end a WHEP session on a playback node behind an edge: its pictures go on within
    a few seconds."""
    import asyncio
    import threading

    from tests import whep_client

    cluster.relay("origin-1", "origin")
    cluster.relay("origin-2", "origin")
    cluster.relay("edge", "edge", zone="a")
    rtmp = cluster.ingest()
    http = cluster.playback(zone="a")  # pulls through the edge, which pulls from the origin
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/rtc-survivor", 48, fps=30, gop=30, extra=["-bf", "0"])
    wait_live(f"http://127.0.0.1:{http}/live/rtc-survivor.flv")
    (pulled,) = cluster.stats("edge").streams
    assert pulled.pulled and len(pulled.subscribers) == 1  # the playback node's feed, through the edge
    seen: list[whep_client.Watched] = []
    viewer = threading.Thread(target=lambda: seen.append(asyncio.run(whep_client.watch(
        f"http://127.0.0.1:{http}/live/rtc-survivor/whep", 40.0))))
    viewer.start()
    time.sleep(30)
    victim = cluster.name_at(cluster.origin_of("rtc-survivor"))
    cluster.kill9(victim)
    killed_at = time.monotonic()
    viewer.join(60)
    assert publisher.wait(30) == 0, publisher.stderr.read() if publisher.stderr else ""
    (watched,) = seen
    assert watched.status == 201, watched.body
    after = [t for t in watched.video_times if t > killed_at]
    assert after and after[0] - killed_at < 4.0, "the pictures did not come back within 4 s of the kill"
    assert len(after) > 30 * 5  # and went on: seconds of pictures after the failover
    assert watched.deleted == 200  # the WHEP session was still there at the end
    stops = re.findall(r"viewer.stop client=\S+ path=\S+ protocol=webrtc reason=\"([^\"]*)\"",
                       cluster.nodes["playback"].log())
    assert stops == ["deleted by the viewer"], stops  # nothing ended it before its DELETE
