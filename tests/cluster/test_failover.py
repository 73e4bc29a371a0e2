"""Failures that viewers must not notice: an origin killed with -9, a publisher that reconnects, a
dispatch restart. Each fault is injected early in a stream and again after it has run for 15 s, longer
than every retry window and grace period (10 s each), since a stream's first seconds hide clock bugs."""

from __future__ import annotations

import itertools
import re
import tempfile
import time
from pathlib import Path

import pytest

from castmesh.media.flv import Tag
from tests.cluster.harness import Cluster
from tests.integration.harness import Viewing, decode, publish, scrape, wait_live, watch, watch_in_background

# How long a stream runs before its fault: early, and past every retry window and grace period.
RAN = pytest.mark.parametrize("ran", [4, 15], ids=["early", "late"])


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


@RAN
def test_origin_killed_while_publishing_and_viewing(cluster: Cluster, ran: int) -> None:
    cluster.relay("origin-1", "origin")
    cluster.relay("origin-2", "origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/survivor", ran + 10, fps=30, gop=30)
    url = f"http://127.0.0.1:{http}/live/survivor.flv"
    wait_live(url)
    seen, viewer = watch_in_background(url, ran + 26)
    time.sleep(ran)
    victim = cluster.name_at(cluster.origin_of("survivor"))
    cluster.kill9(victim)
    killed_at = time.monotonic()
    time.sleep(2)
    survivor_origin = cluster.origin_of("survivor")
    deadline = time.monotonic() + 8  # the directory catches up once ingest has re-leased (viewers did not wait)
    while time.monotonic() < deadline and (not survivor_origin or cluster.name_at(survivor_origin) == victim):
        time.sleep(0.2)
        survivor_origin = cluster.origin_of("survivor")
    assert publisher.wait(30) == 0, publisher.stderr.read() if publisher.stderr else ""
    viewer.join(30)

    assert survivor_origin and cluster.name_at(survivor_origin) != victim
    assert seen.error == "" and seen.ended_cleanly  # the viewer's connection stayed open throughout
    keyframes_after = [at for t, at in zip(seen.tags, seen.arrivals, strict=True)
                       if t.kind == 9 and t.payload[:2] == b"\x17\x01" and at > killed_at]
    assert keyframes_after and keyframes_after[0] - killed_at < 3.0
    assert_monotonic(seen.tags)
    counts, errors = decode_seen(seen)
    assert errors == "", errors
    assert counts.get(0, 0) > 30 * (ran + 6)  # the whole publish at 30 fps, minus the join
    assert "publish.failover" in cluster.nodes["ingest"].log()
    metrics = scrape(http)  # the playback node followed the stream to the other origin: a restarted call
    assert metrics['castmesh_failovers_total{kind="upstream"}'] >= 1
    assert metrics['castmesh_link_calls_broken_total{call="subscribe"}'] >= 1
    assert metrics['castmesh_link_calls_opened_total{call="subscribe"}'] >= 2


@RAN
def test_publisher_reconnects_within_the_grace_period(cluster: Cluster, ran: int) -> None:
    cluster.relay("origin", "origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.wait_registered()
    rtmp_url, url = f"rtmp://127.0.0.1:{rtmp}/live/phoenix", f"http://127.0.0.1:{http}/live/phoenix.flv"
    first = publish(rtmp_url, ran + 26, fps=25, gop=25)
    wait_live(url)
    seen, viewer = watch_in_background(url, ran + 36)
    time.sleep(ran)
    first.kill()  # no unpublish: the publisher just vanishes
    first.wait()
    killed_at = time.monotonic()
    time.sleep(2)
    second = publish(rtmp_url, 5, fps=25, gop=25)
    assert second.wait(30) == 0, second.stderr.read() if second.stderr else ""
    viewer.join(30)

    assert seen.error == "" and seen.ended_cleanly
    before = [t for t, at in zip(seen.tags, seen.arrivals, strict=True) if t.kind == 9 and at < killed_at]
    after = [t for t, at in zip(seen.tags, seen.arrivals, strict=True) if t.kind == 9 and at > killed_at + 1]
    assert len(before) > 15 * ran and len(after) > 100  # both publishers' pictures reached the same viewer
    assert_monotonic(seen.tags)
    counts, errors = decode_seen(seen)
    assert errors == "", errors
    assert counts.get(0, 0) >= len(before) + len(after) - 5
    assert "publish.lost" in cluster.nodes["origin"].log()


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




@RAN
def test_dispatch_restart_forgets_nothing_viewers_need(cluster: Cluster, ran: int) -> None:
    cluster.relay("origin", "origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/steadfast", ran + 12, fps=25, gop=25)
    url = f"http://127.0.0.1:{http}/live/steadfast.flv"
    wait_live(url)
    seen, viewer = watch_in_background(url, ran + 28)
    time.sleep(ran)
    cluster.restart_dispatch()
    # Relays re-register and ingest claims its stream again, at the origin where it runs: within a second
    # or two (`castmesh bench failover` measures it). The bound here is only what a test may wait.
    deadline = time.monotonic() + 15
    while cluster.origin_of("steadfast") == "" and time.monotonic() < deadline:
        time.sleep(0.2)
    origin = cluster.origin_of("steadfast")
    assert origin and cluster.name_at(origin) == "origin"
    newcomer = watch(url, 2.0)
    assert newcomer.status == 200 and len(newcomer.video()) > 20
    assert publisher.wait(30) == 0
    viewer.join(30)
    assert seen.error == "" and seen.ended_cleanly  # the first viewer never noticed
    assert "lease.reclaimed" in cluster.nodes["ingest"].log()


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
