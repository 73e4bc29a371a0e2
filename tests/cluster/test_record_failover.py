"""A recorder killed with -9 mid-file: what it wrote decodes (its last whole fragment is at most a second
before the kill), another worker goes on recording within a few seconds; healed, and the second recorder
killed in turn, the first takes the job back. The first fault comes after the stream has run past every
retry window and grace period (10 s). Through the gateway and a playback node, the recordings of every
worker are listed as spans with the takeovers' gaps between them, and their VOD playlist plays in ffmpeg.

The job lease is the one ABR ladders use; tests/cluster/test_worker_failover.py runs it with Consul too."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from castmesh.media.fmp4 import read_index
from services.worker.record import file_start
from tests.cluster.harness import Cluster
from tests.cluster.test_worker_failover import runner  # (the worker that runs the one job)
from tests.integration.harness import decode, free_port, http_get, publish, wait_live

RAN = 12  # seconds before the first fault: past the 10 s retry windows and grace periods
TAKEN_WITHIN = 5.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.stop()


def files_of(directory: Path) -> list[Path]:
    return sorted(directory.glob("live/cam/*.mp4"))


def test_a_killed_recorders_file_decodes_and_another_worker_records_on(cluster: Cluster, tmp_path: Path) -> None:
    cluster.dispatch_with("--record", "live=60")  # one file per recorder here: the kills come mid-file
    cluster.relay("origin")
    rtmp = cluster.ingest()
    http = cluster.playback()
    gateway = cluster.gateway()
    dirs = {name: tmp_path / name for name in ("worker-a", "worker-b")}
    for name, directory in dirs.items():
        cluster.worker(name, ["--record-dir", str(directory), "--http-port", str(free_port())])
    cluster.wait_registered()
    publisher = publish(f"rtmp://127.0.0.1:{rtmp}/live/cam", RAN + 15, size="320x180", fps=30, gop=30)
    wait_live(f"http://127.0.0.1:{http}/live/cam.flv", timeout=20)
    time.sleep(RAN)
    first = runner(cluster)
    cluster.kill9(first)
    killed_at = time.time()
    second = runner(cluster, not_on=first)
    cluster.restart(first)  # healed; then the second fault, right away
    time.sleep(4)
    cluster.kill9(second)
    killed_again = time.time()
    third = runner(cluster, not_on=second)
    assert second != first and third == first, (first, second, third)
    cluster.restart(second)  # (so that its files are listed again)
    assert publisher.wait(60) == 0

    # what each killed recorder wrote: its whole fragments decode and reach to within a second of the kill
    for name, killed in ((first, killed_at), (second, killed_again)):
        path = next(p for p in files_of(dirs[name]) if p.stat().st_mtime <= killed + 0.5)
        data = path.read_bytes()
        index = read_index(lambda at, n, d=data: d[at:at + n], len(data))
        counts, errors = decode(str(path))
        duration = sum(f.duration for f in index.fragments) / index.timescale
        assert counts.get(0, 0) == pytest.approx(duration * 30, abs=2), (path, counts, duration, errors)
        started = file_start(path) or 0.0
        assert killed - 1.6 < started + duration < killed + 0.5, (path, started, duration, killed)

    # both workers' files, through the gateway: the spans have the takeovers' gaps between them
    deadline = time.monotonic() + 10
    while True:
        listed = json.loads(http_get(f"http://127.0.0.1:{gateway}/api/v1/recordings/live/cam").read())
        workers = {f["worker"] for f in listed["files"]}
        if (len(workers) == 2 and not any(f["writing"] for f in listed["files"])) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(workers) == 2 and len(listed["files"]) == 3, listed
    spans = listed["spans"]  # (a takeover may leave no gap: the new recorder starts at its relay's cached GOP)
    assert 1 <= len(spans) <= 3 and all(b["start"] - a["end"] < TAKEN_WITHIN for a, b in itertools.pairwise(spans))
    recorded = sum(s["duration"] for s in spans)
    assert recorded > RAN + 15 - 2 * TAKEN_WITHIN - 3, spans
    assert b"#EXT-X-PLAYLIST-TYPE:VOD" in http_get(spans[0]["playlist"]).read()
    whole = f"http://127.0.0.1:{http}/recordings/live/cam.m3u8"
    text = http_get(whole).read().decode()
    played = sum(float(line[8:].rstrip(",")) for line in text.splitlines() if line.startswith("#EXTINF:"))
    assert text.count("#EXT-X-MAP:") == 3 and played <= recorded + 0.1, text
    counts, errors = decode(whole)
    assert errors == "" and counts.get(0, 0) == pytest.approx(played * 30, abs=10), (counts, errors, played)
