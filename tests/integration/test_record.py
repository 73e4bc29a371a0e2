"""Recording in `castmesh up`: a rule records ffmpeg's 12 s publish into 4 s fMP4 files. Every file decodes,
the files follow one another with no gap, and their times are what the listing says; the HLS VOD playlist and
an MP4 of a span across two files play in ffmpeg, and Chromium plays the recording from the player page.
Each finished file is told to the on_record_segment hook and uploaded to moto's S3 server, whose bucket is
only made after the first upload failed (so the retry is what lands it). Bad input: spans and ranges that
mean nothing, names that try to leave the recordings' directory, jobs for streams nobody publishes; and a
disk that fills up (a 256 KiB tmpfs): the write error is logged and counted, the stream plays on."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from castmesh.media.fmp4 import read_index
from tests.integration.harness import (
    FFMPEG,
    ROOT,
    decode,
    http_get,
    log_has,
    publish,
    scrape,
    start_up,
    total,
    wait_live,
)
from tests.integration.test_s3_upload import start_moto, stop

SECONDS = 12  # about 10 s recorded: from the first keyframe to the last frame
SEGMENT = 4
BUCKET = "recs"


class Hook(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        Hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def frames(source: str) -> list[tuple[int, int]]:
    """(stream index, pts) of each frame ffmpeg decodes from `source`, and nothing it complained of."""
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", source, "-f", "framecrc", "-"],
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr.decode()[-2000:]
    out = []
    for line in result.stdout.decode().splitlines():
        if line and not line.startswith("#"):
            index, _, pts, *_ = (part.strip() for part in line.split(","))
            out.append((int(index), int(pts)))
    return out


def pictures(found: list[tuple[int, int]]) -> int:
    return sum(1 for index, _ in found if index == 0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("record")
    moto_port = __import__("tests.integration.harness", fromlist=["free_port"]).free_port()
    moto = start_moto(moto_port, tmp / "moto.log")
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    up = start_up(tmp, "--record", f"live={SEGMENT}", "--record-dir", str(tmp / "rec"),
                  "--on-record-segment", f"http://127.0.0.1:{hook.server_port}/",
                  "--record-upload", f"s3://{BUCKET}/castmesh?endpoint={endpoint}",
                  env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    source = publish(up.rtmp("cam"), SECONDS, size="320x180", gop=30)
    try:
        wait_live(up.flv("cam"), timeout=20)
        assert log_has(up, "upload.failed", SEGMENT + 6), up.process.log()  # the bucket is not there yet
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=5).close()
        assert source.wait(SECONDS + 20) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(f["writing"] for f in listing(up)["files"]):
            time.sleep(0.2)
        yield up, tmp / "rec" / "live" / "cam", endpoint
    finally:
        source.kill()
        up.process.stop()
        hook.shutdown()
        stop(moto)


def listing(up: Any, query: str = "") -> Any:
    return get_json(f"http://127.0.0.1:{up.http_port}/api/v1/recordings/live/cam{query}")


def test_files_decode_follow_each_other_and_match_the_listing(recorded) -> None:  # type: ignore[no-untyped-def]
    up, directory, _ = recorded
    listed = listing(up)
    files = listed["files"]
    assert len(files) >= 3 and not any(f["writing"] for f in files), files
    assert sorted(p.name for p in directory.iterdir()) == [f["file"] for f in files]
    for before, after in itertools.pairwise(files):
        assert abs(after["start"] - (before["start"] + before["duration"])) < 0.05, (before, after)  # no gap
    for f in files[:-1]:
        assert f["duration"] == pytest.approx(SEGMENT, abs=0.05), f  # cut at the keyframe after 4 s (1 s GOPs)
    covered = sum(f["duration"] for f in files)
    assert SECONDS - 3 <= covered <= SECONDS + 0.5, files
    assert len(listed["spans"]) == 1 and listed["spans"][0]["duration"] == pytest.approx(covered, abs=0.05)
    for f in files:
        path = directory / f["file"]
        decoded = frames(str(path))
        assert pictures(decoded) == pytest.approx(f["duration"] * 30, abs=2), (f, pictures(decoded))
        video = sorted(pts for index, pts in decoded if index == 0)
        assert all(b - a <= 4 for a, b in itertools.pairwise(video)), f  # 30 fps in ms: no hole inside
        started = time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime(f["start"]))
        assert f["file"].startswith(started) and f["file"].endswith(f"{f['start'] % 1:.6f}"[2:] + ".mp4"), f


def test_the_vod_playlist_and_an_mp4_of_a_span_play(recorded) -> None:  # type: ignore[no-untyped-def]
    up, _, _ = recorded
    span = listing(up)["spans"][0]
    playlist = http_get(span["playlist"]).read().decode()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in playlist and playlist.rstrip().endswith("#EXT-X-ENDLIST"), playlist
    assert playlist.count("#EXT-X-MAP:") >= 3 and "#EXT-X-DISCONTINUITY" not in playlist, playlist
    whole = frames(span["playlist"])
    assert pictures(whole) == pytest.approx(span["duration"] * 30, abs=3), pictures(whole)
    # 5 s from 3 s in: across the first file's end; from the keyframe at or before the start
    start = span["start"] + 3.5
    url = f"http://127.0.0.1:{up.http_port}/recordings/live/cam.mp4?start={start}&duration=5"
    answer = http_get(url)
    body = answer.read()
    assert answer.status == 200 and int(answer.headers["Content-Length"]) == len(body)
    assert "attachment" in answer.headers["Content-Disposition"]
    path = Path(up.process.log_path).parent / "span.mp4"
    path.write_bytes(body)
    decoded = frames(str(path))
    assert 5 * 30 <= pictures(decoded) <= 7 * 30, pictures(decoded)
    video = sorted(pts for index, pts in decoded if index == 0)
    assert all(b - a <= 4 for a, b in itertools.pairwise(video))  # one timeline across the two files
    # a span that falls inside the recording is listed by it, and one outside is not
    assert listing(up, f"?start={start}&end={start + 1}")["files"][0]["file"] == listing(up)["files"][0]["file"]
    assert http_get(f"http://127.0.0.1:{up.http_port}/api/v1/recordings/live/cam?start=1").status == 200


def test_each_file_is_told_to_the_hook_and_uploaded_after_a_retry(recorded) -> None:  # type: ignore[no-untyped-def]
    up, directory, endpoint = recorded
    files = listing(up)["files"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        told = {Path(b["path"]).name: b for b in Hook.bodies}
        keys = s3_objects(endpoint)
        if len(told) == len(files) and len(keys) == len(files):
            break
        time.sleep(0.3)
    for f in files:
        body = told[f["file"]]
        assert body["action"] == "on_record_segment" and body["app"] == "live" and body["stream"] == "cam", body
        assert body["duration"] == pytest.approx(f["duration"], abs=0.05) and body["error"] == "", body
        assert body["bytes"] == (directory / f["file"]).stat().st_size
        assert keys[f"castmesh/live/cam/{f['file']}"] == body["bytes"], keys
    metrics = scrape(up.http_port)
    assert total(metrics, "castmesh_record_uploads_total{result=\"failed\"}") >= 1, metrics
    assert total(metrics, "castmesh_record_uploads_total{result=\"done\"}") == len(files)


def s3_objects(endpoint: str) -> dict[str, int]:
    try:
        with urllib.request.urlopen(f"{endpoint}/{BUCKET}?list-type=2", timeout=5) as answer:
            tree = ElementTree.fromstring(answer.read())
    except OSError:
        return {}
    ns = {"s3": tree.tag.split("}")[0].strip("{")}
    return {c.findtext("s3:Key", namespaces=ns) or "": int(c.findtext("s3:Size", namespaces=ns) or 0)
            for c in tree.findall("s3:Contents", ns)}


def test_chromium_plays_a_recording_from_the_player_page(recorded) -> None:  # type: ignore[no-untyped-def]
    up, _, _ = recorded
    result = subprocess.run(["node", str(ROOT / "tests" / "browser" / "recording.mjs"),
                             f"http://127.0.0.1:{up.http_port}/", "live/cam"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    span = listing(up)["spans"][0]
    state = seen["state"]
    assert seen["consoleErrors"] == [] and state["report"]["errors"] == [], seen
    assert seen["rows"] == 1 and seen["download"].startswith("/recordings/live/cam.mp4?start="), seen
    assert (state["width"], state["height"]) == (320, 180), state
    assert state["duration"] == pytest.approx(span["duration"], abs=1.0), (state, span)


def test_bad_spans_ranges_names_and_jobs_get_clear_answers(recorded) -> None:  # type: ignore[no-untyped-def]
    up, _, _ = recorded
    base = f"http://127.0.0.1:{up.http_port}"
    span = listing(up)["spans"][0]
    cases = {
        "/recordings/live/cam.m3u8?start=yesterday": (400, "neither seconds since the epoch nor an ISO 8601"),
        f"/recordings/live/cam.mp4?start={span['start']}&end={span['start'] - 5}": (400, "ends before it starts"),
        "/recordings/live/cam.m3u8?duration=5": (400, "duration needs a start"),
        f"/recordings/live/cam.m3u8?start={span['end'] + 100}": (404, "no recording of live/cam in that span"),
        "/recordings/live/nobody.mp4": (404, "no recording"),
        "/recordings/live/cam/worker/..%2f..%2fcastmesh.log": (404, ""),
        "/recordings/live/cam/worker/2026-01-01_00-00-00-000000.mp4": (404, "no such recording"),
        "/recordings/live/cam/worker/2026-01-01_00-00-00-000000.mp4/0-10.m4s": (404, "no such recording"),
        "/api/v1/recordings/live/cam?start=x": (400, "neither seconds"),
        "/api/v1/recordings/live/nobody": (404, "no recordings of live/nobody"),
    }
    for path, (status, says) in cases.items():
        answer = http_get(base + path)
        assert answer.status == status and says in answer.read().decode(), (path, answer.status)
    first = listing(up)["files"][0]
    file_url = f"{base}/recordings/live/cam/{first['worker']}/{first['file']}"
    for part, status in (("/0-100.m4s", 200), (f"/{first['bytes'] - 1}-2.m4s", 404), ("/5-0.m4s", 404)):
        assert http_get(file_url + part).status == status, part
    for ranged, status in (("bytes=0-99", 206), (f"bytes={first['bytes']}-", 416), ("bytes=5-1", 416),
                           ("lines=1-2", 416), ("bytes=-100", 206)):
        request = urllib.request.Request(file_url, headers={"Range": ranged})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                got, body = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            got, body = exc.code, b""
        assert got == status, (ranged, got)
        if status == 206:
            assert len(body) == 100, ranged
    for method, path, body, status, says in (
            ("POST", "/api/v1/streams/live/nobody/record", b"{}", 404, "is not being published"),
            ("POST", "/api/v1/streams/live/cam2/record", b'{"segment_seconds": "x"}', 400, "segment_seconds"),
            ("POST", "/api/v1/streams/live/nobody/forward", b'{"targets": ["http://x/y/z"]}', 400, "rtmp://"),
            ("POST", "/api/v1/streams/live/nobody/forward", b'{"targets": "rtmp://x/y/z"}', 400, "targets"),
            ("DELETE", "/api/v1/streams/live/nobody/record", b"", 404, "no job record:")):
        request = urllib.request.Request(base + path, data=body or None, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                got, text = answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            got, text = exc.code, exc.read().decode()
        assert got == status and says in text, (method, path, got, text)


def test_a_full_disk_is_logged_and_counted_and_the_stream_plays_on(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:  # (not root: a loop device or tmpfs needs it; CI's machine is)
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        up = start_up(tmp_path, "--record", "live=2", "--record-dir", str(full))
        source = publish(up.rtmp("cam"), 30, size="320x180", gop=30)
        try:
            wait_live(up.flv("cam"), timeout=20)
            assert log_has(up, "record.write_failed", 25), up.process.log()
            log = up.process.log()
            assert re.search(r"record.write_failed path=\S+ error=\"ENOSPC", log), log[-3000:]
            metrics = scrape(up.http_port)
            assert total(metrics, 'castmesh_record_write_errors_total{error="ENOSPC"}') >= 1, metrics
            counts, errors = decode(up.flv("cam"), seconds=3)  # the stream itself goes on
            assert counts.get(0, 0) >= 60 and errors == "", (counts, errors)
            for path in full.rglob("*.mp4"):  # what was written before the disk filled reads as an MP4
                data = path.read_bytes()
                if len(data) > 2000:
                    index = read_index(lambda at, n, d=data: d[at:at + n], len(data))
                    assert index.fragments and index.complete <= len(data), path
        finally:
            source.kill()
            up.process.stop()
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_the_api_starts_and_stops_a_recording_and_lists_it(recorded) -> None:  # type: ignore[no-untyped-def]
    up, directory, _ = recorded
    base = f"http://127.0.0.1:{up.http_port}"
    source = publish(f"rtmp://127.0.0.1:{up.rtmp_port}/other/x", 8, size="320x180", gop=30)  # no rule for "other"
    try:
        wait_live(f"{base}/other/x.flv", timeout=20)

        def call(method: str, body: bytes | None = None) -> tuple[int, Any]:
            request = urllib.request.Request(f"{base}/api/v1/streams/other/x/record", data=body, method=method,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status, json.loads(answer.read())

        status, started = call("POST", b'{"segment_seconds": 2}')
        assert status == 201 and started["job"]["kind"] == "record" and started["job"]["segment_seconds"] == 2
        assert call("POST", b"{}")[1]["detail"] == "running already"
        time.sleep(4)
        assert call("DELETE")[0] == 200
        files: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            files = get_json(f"{base}/api/v1/recordings/other/x")["files"]
            if files and not any(f["writing"] for f in files):
                break
            time.sleep(0.2)
        assert 2 <= len(files) <= 3 and 2.5 <= sum(f["duration"] for f in files) <= 5, files
        assert {"app": "other", "stream": "x"}.items() <= next(
            s for s in get_json(f"{base}/api/v1/recordings")["streams"] if s["app"] == "other").items()
        assert not any(j["id"].endswith("/other/x") for j in get_json(f"{base}/api/v1/jobs")["jobs"])
    finally:
        source.kill()
        source.wait()
    assert directory.exists()
