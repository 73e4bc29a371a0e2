"""RTMP publish in, HTTP-FLV out, through castmesh up, with the real ffmpeg on both ends."""

from __future__ import annotations

import time

import pytest

from tests.integration.harness import Up, Viewing, decode, publish, wait_live, watch, watch_in_background


def test_ten_seconds_of_h264_aac_decode_cleanly_with_every_frame(suite: Up) -> None:
    # One GOP for the whole clip, so a reader that connects a moment after the publisher still starts at
    # frame 0 from the GOP cache, and every frame sent can be counted.
    publisher = publish(suite.rtmp("ten"), 10, fps=30, gop=300)
    wait_live(suite.flv("ten"))
    counts, errors = decode(suite.flv("ten"))
    assert publisher.wait(30) == 0, publisher.stderr.read() if publisher.stderr else ""
    sent = 300
    assert errors == ""
    assert abs(counts.get(0, 0) - sent) <= sent * 0.05, counts
    assert counts.get(1, 0) > 400  # 10 s of 44.1 kHz AAC is ~430 frames


def test_late_joiner_gets_metadata_sequence_headers_then_a_keyframe(suite: Up) -> None:
    publisher = publish(suite.rtmp("late"), 8, fps=25, gop=50)
    wait_live(suite.flv("late"))
    time.sleep(3.3)  # past the second keyframe, between keyframes
    seen = watch(suite.flv("late"), 2.5)
    publisher.wait(30)
    assert seen.status == 200 and seen.headers["content-type"] == "video/x-flv"
    assert seen.headers["access-control-allow-origin"] == "*"
    assert seen.header[:5] == b"FLV\x01\x05"
    kinds = [(t.kind, t.payload[:2]) for t in seen.tags[:3]]
    assert kinds[0][0] == 18 and seen.tags[0].payload.startswith(b"\x02\x00\x0aonMetaData")
    assert sorted(kinds[1:]) == [(8, b"\xaf\x00"), (9, b"\x17\x00")]  # AAC and AVC sequence headers
    first_video = next(t for t in seen.tags[3:] if t.kind == 9)
    assert first_video.payload[:2] == b"\x17\x01"  # a keyframe
    assert first_video.timestamp >= 1900  # joined mid-stream: it is the latest keyframe, not the first
    counts, errors = decode_bytes(seen)
    assert errors == "" and counts.get(0, 0) > 30


def decode_bytes(seen: Viewing) -> tuple[dict[int, int], str]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seen.flv"
        path.write_bytes(seen.flv_bytes())
        return decode(str(path))


def test_second_publisher_is_rejected_and_the_first_keeps_going(suite: Up) -> None:
    first = publish(suite.rtmp("dup"), 8)
    wait_live(suite.flv("dup"))
    seen, viewer = watch_in_background(suite.flv("dup"), 12)
    time.sleep(1)
    second = publish(suite.rtmp("dup"), 5)
    assert second.wait(20) != 0  # ffmpeg gives up on NetStream.Publish.BadName
    rejected_at = time.monotonic()
    stderr = second.stderr.read().decode() if second.stderr else ""
    assert "BadName" in stderr or "already" in stderr, stderr
    assert first.wait(30) == 0
    viewer.join(20)
    assert seen.ended_cleanly
    later = [t for t, at in zip(seen.video(), [a for t, a in zip(seen.tags, seen.arrivals, strict=True)
                                                 if t.kind == 9], strict=True) if at > rejected_at + 1]
    assert len(later) > 60  # the first stream carried on for seconds after the rejection
    assert "publish.rejected" in suite.process.log()


def test_viewers_response_ends_cleanly_when_the_publisher_leaves(suite: Up) -> None:
    publisher = publish(suite.rtmp("bye"), 3)
    wait_live(suite.flv("bye"))
    seen = watch(suite.flv("bye"), 15)
    assert publisher.wait(20) == 0
    assert seen.ended_cleanly and seen.error == ""  # the chunked body ended with its last chunk
    assert len(seen.video()) > 30


@pytest.mark.parametrize(("name", "video", "audio", "flags"), [
    ("audio", None, True, 0x04),  # FLV header flags: audio only
    ("video", "libx264", False, 0x01),  # video only
])
def test_single_track_streams(suite: Up, name: str, video: str | None, audio: bool, flags: int) -> None:
    publisher = publish(suite.rtmp(name), 5, video=video, audio=audio)
    wait_live(suite.flv(name))
    seen = watch(suite.flv(name), 10)
    publisher.wait(20)
    assert seen.header[4] == flags
    present, absent = (seen.audio(), seen.video()) if audio else (seen.video(), seen.audio())
    assert not absent and len(present) > 100
    counts, errors = decode_bytes(seen)
    assert errors == "" and counts.get(0, 0) > 100 and 1 not in counts


def test_hevc_over_enhanced_rtmp_plays_back(suite: Up) -> None:
    publisher = publish(suite.rtmp("hevc"), 6, video="libx265", fps=25, gop=150)
    wait_live(suite.flv("hevc"))
    counts, errors = decode(suite.flv("hevc"))
    assert publisher.wait(30) == 0
    assert errors == ""
    assert abs(counts.get(0, 0) - 150) <= 150 * 0.05, counts
    seen_header = watch(suite.flv("hevc"), 0.1)
    assert seen_header.status == 404  # the stream has ended


def test_http_edges_head_preflight_unknown_path_and_method(suite: Up) -> None:
    import http.client

    publisher = publish(suite.rtmp("edges"), 4)
    wait_live(suite.flv("edges"))

    def ask(method: str, path: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", suite.http_port, timeout=5)
        conn.request(method, path)
        return conn.getresponse()

    head = ask("HEAD", "/live/edges.flv")
    assert head.status == 200 and head.getheader("Content-Type") == "video/x-flv" and head.read() == b""
    preflight = ask("OPTIONS", "/live/edges.flv")
    assert preflight.status == 204 and preflight.getheader("Access-Control-Allow-Origin") == "*"
    assert "GET" in (preflight.getheader("Access-Control-Allow-Methods") or "")
    assert ask("GET", "/live/nobody.flv").status == 404
    assert ask("GET", "/nothing/here").status == 404
    assert ask("POST", "/live/edges.flv").status == 405
    # The stream itself still plays for a real viewer after all that.
    assert len(watch(suite.flv("edges"), 1.0).video()) > 10
    assert publisher.wait(20) == 0
