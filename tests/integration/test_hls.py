"""HLS from `castmesh up`, read by ffmpeg and by a plain HTTP client: TS and fMP4 playlists decode, the
playlist follows the spec's rules, a republish is a discontinuity ffmpeg plays across, HEVC comes out as
fMP4, and a muxer nobody asks for stops."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import pytest

from tests.integration.harness import Up, decode, http_get, publish, start_up

SECONDS = 8.5  # the issue asks for at least 8 s decoded; ask ffmpeg for a little more


@dataclass
class Playlist:
    version: int
    target: int
    sequence: int
    discontinuity_sequence: int
    segments: list[tuple[float, str, bool]]  # (duration, uri, discontinuity before it)
    text: str


def fetch_playlist(url: str) -> Playlist:
    response = http_get(url, timeout=15)
    body = response.read().decode()
    assert response.status == 200, body
    assert response.getheader("Content-Type") == "application/vnd.apple.mpegurl"
    assert response.getheader("Cache-Control") == "no-cache"
    return parse_playlist(body)


def parse_playlist(text: str) -> Playlist:
    lines = text.strip().splitlines()
    assert lines[0] == "#EXTM3U"
    tags = {}
    segments: list[tuple[float, str, bool]] = []
    duration, discontinuity = None, False
    for line in lines[1:]:
        if line.startswith("#EXTINF:"):
            duration = float(line[8:].split(",")[0])
        elif line == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif line.startswith("#EXT-X-") and ":" in line:
            name, value = line[1:].split(":", 1)
            tags[name] = value
        elif line and not line.startswith("#"):
            assert duration is not None, f"segment {line} without EXTINF"
            segments.append((duration, line, discontinuity))
            duration, discontinuity = None, False
    return Playlist(int(tags["EXT-X-VERSION"]), int(tags["EXT-X-TARGETDURATION"]), int(tags["EXT-X-MEDIA-SEQUENCE"]),
                    int(tags.get("EXT-X-DISCONTINUITY-SEQUENCE", "0")), segments, text)


def wait_segments(url: str, count: int, timeout: float = 30.0) -> Playlist:
    """The playlist once it lists `count` segments (the publisher may still be connecting at first)."""
    deadline = time.monotonic() + timeout
    while True:
        response = http_get(url, timeout=15)
        response.read()
        if response.status == 200 or time.monotonic() > deadline:
            playlist = fetch_playlist(url)
            if len(playlist.segments) >= count or time.monotonic() > deadline:
                return playlist
        time.sleep(0.5)


def first_video_nal_types(segment: bytes) -> list[int]:
    """The NAL unit types of the first video access unit of a TS segment, read from the packets."""
    assert len(segment) % 188 == 0 and segment[0] == 0x47
    pes = bytearray()
    for at in range(0, len(segment), 188):
        packet = segment[at:at + 188]
        pid = ((packet[1] & 0x1F) << 8) | packet[2]
        if pid != 0x100:
            continue
        start = bool(packet[1] & 0x40)
        if start and pes:
            break  # the second PES begins: the first access unit is complete
        payload_at = 4 + (1 + packet[4] if packet[3] & 0x20 else 0)
        pes += packet[payload_at:]
    assert pes[:3] == b"\x00\x00\x01"
    es = bytes(pes[9 + pes[8]:])
    return [es[m.end()] & 0x1F for m in re.finditer(b"\x00\x00\x01", es) if m.end() < len(es)]


def test_ffmpeg_decodes_live_hls_ts_then_fmp4(suite: Up) -> None:
    publisher = publish(suite.rtmp("hls"), 45, gop=30)

    def segments_then_decode(url: str) -> tuple[Playlist, dict[int, int], str]:
        playlist = wait_segments(url, 3)
        return (playlist, *decode(url, seconds=SECONDS))

    try:
        with ThreadPoolExecutor(2) as pool:  # both muxers of one stream at once, each from its first segments
            ts_run, fmp4_run = (pool.submit(segments_then_decode, suite.hls("hls", form)) for form in ("", "fmp4"))
            ts_playlist, counts, errors = ts_run.result()
            assert ts_playlist.version == 3 and ts_playlist.segments[0][1].endswith(".ts")
            assert errors == ""
            assert counts.get(0, 0) >= 8 * 30 and counts.get(1, 0) >= 8 * 44100 // 1024, counts
            fmp4_playlist, counts, errors = fmp4_run.result()
            assert fmp4_playlist.version >= 6 and "#EXT-X-MAP:URI=" in fmp4_playlist.text
            assert fmp4_playlist.segments[0][1].endswith(".m4s")
            assert errors == ""
            assert counts.get(0, 0) >= 8 * 30 and counts.get(1, 0) >= 8 * 44100 // 1024, counts
    finally:
        publisher.kill()
        publisher.wait()


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """A suite with a short window, short segments and a short idle timeout, so that they show quickly."""
    up = start_up(Path(tmp_path_factory.mktemp("tight")), "--hls-window", "3", "--hls-segment-ms", "1000",
                  "--hls-idle-ms", "1500")
    yield up
    up.process.stop()


def test_playlist_follows_the_rules_and_segments_start_with_keyframes(tight: Up) -> None:
    publisher = publish(tight.rtmp("rules"), 30, gop=15, fps=25)  # a keyframe every 0.6 s
    url = tight.hls("rules")
    try:
        seen: list[Playlist] = [wait_segments(url, 2)]
        checked: set[str] = set()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            time.sleep(1)
            playlist = fetch_playlist(url)
            seen.append(playlist)
            assert playlist.segments
            for duration, uri, _ in playlist.segments:
                assert playlist.target >= duration, playlist.text
                assert 1.0 <= duration <= 1.3, playlist.text  # cut at the first keyframe at or past 1 s
                if uri in checked:
                    continue
                checked.add(uri)
                response = http_get(urljoin(url, uri))
                data = response.read()
                assert response.status == 200
                assert response.getheader("Content-Type") == "video/mp2t"
                assert "max-age" in (response.getheader("Cache-Control") or "")
                types = first_video_nal_types(data)
                assert 5 in types, f"{uri} starts with NAL units {types}, no IDR"
                assert types.index(7) < types.index(8) < types.index(5), f"{uri}: SPS, PPS, then IDR: {types}"
        sequences = [p.sequence for p in seen]
        assert sequences == sorted(sequences) and sequences[-1] > sequences[0], sequences
        assert len(checked) >= 5
    finally:
        publisher.kill()
        publisher.wait()


def test_republish_is_a_discontinuity_ffmpeg_plays_across(suite: Up) -> None:
    url = suite.hls("again")
    first = publish(suite.rtmp("again"), 30, gop=30)
    second = None
    try:
        wait_segments(url, 3)
        first.kill()  # the publisher drops and comes back, as OBS does after a network blip
        first.wait()
        second = publish(suite.rtmp("again"), 30, gop=30)
        deadline = time.monotonic() + 20
        playlist = fetch_playlist(url)
        while time.monotonic() < deadline and not any(d for _, _, d in playlist.segments):
            time.sleep(0.5)
            playlist = fetch_playlist(url)
        marked = [i for i, (_, _, d) in enumerate(playlist.segments) if d]
        assert marked and marked[0] > 0, playlist.text  # segments from both sessions, the tag between them
        counts, errors = decode(url, seconds=SECONDS)  # starts three segments back: before the discontinuity
        assert errors == ""
        assert counts.get(0, 0) >= 8 * 30 and counts.get(1, 0) > 0, counts
    finally:
        for publisher in (first, second):
            if publisher is not None:
                publisher.kill()
                publisher.wait()


@pytest.mark.parametrize(("codec", "entry", "config"), [("libx265", b"hvc1", b"hvcC"),
                                                         ("libvpx-vp9", b"vp09", b"vpcC"),
                                                         ("libaom-av1", b"av01", b"av1C")])
def test_hevc_vp9_and_av1_come_out_as_fmp4_that_ffmpeg_decodes(suite: Up, codec: str, entry: bytes,
                                                               config: bytes) -> None:
    """Enhanced RTMP's hvc1, vp09 and av01 from ffmpeg. (ffmpeg's vp09 record carries vpcC's version and
    flags already; AV1 and VP9 frames start right after the FourCC: both were wrong until 2026-12-02.)"""
    name = f"{entry.decode()}-hls"
    publisher = publish(suite.rtmp(name), 40, video=codec, gop=30)
    try:
        playlist = wait_segments(suite.hls(name), 3)
        assert playlist.segments[0][1].endswith(".m4s") and "#EXT-X-MAP" in playlist.text
        init = http_get(urljoin(suite.hls(name), re.findall(r'URI="([^"]+)"', playlist.text)[0])).read()
        assert entry in init and config in init
        counts, errors = decode(suite.hls(name), seconds=SECONDS)
        assert errors == ""
        assert counts.get(0, 0) >= 8 * 30 and counts.get(1, 0) > 0, counts
        refused = http_get(suite.hls(name, "ts"), timeout=15)
        assert refused.status == 415 and b"fmp4" in refused.read()
    finally:
        publisher.kill()
        publisher.wait()


def test_unknown_stream_and_bad_requests(suite: Up) -> None:
    response = http_get(suite.hls("nobody-here"), timeout=15)
    assert response.status == 404
    response = http_get(suite.hls("x", "mkv"))
    assert response.status == 400 and b"format" in response.read()
    response = http_get(f"http://127.0.0.1:{suite.http_port}/live/x/hls/0123abcd/1.ts")
    assert response.status == 404


def metric(up: Up, name: str) -> float:
    text = http_get(f"http://127.0.0.1:{up.http_port}/metrics").read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match[1])


def test_a_muxer_nobody_asks_for_stops_and_releases_the_stream(tight: Up) -> None:
    """Seen per stream in the log (the metrics are node-wide, and other tests' muxers come and go)."""
    up = tight
    publisher = publish(up.rtmp("idle"), 30, gop=30)
    stream = "__defaultVhost__/live/idle"
    try:
        wait_segments(up.hls("idle"), 1)  # (its first tries, before the publisher is up, get 404s)
        assert metric(up, "castmesh_playback_hls_muxers") >= 1
        seen = len(up.process.log())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and f"feed.stop stream={stream}" not in up.process.log()[seen:]:
            time.sleep(0.25)
        log = up.process.log()[seen:]
        assert re.search(rf"hls.stop stream={stream} muxer=\w+ reason=\"no request for 1.5s\"", log), log[-2000:]
        # and with no muxer left, the feed let go of its upstream subscription
        assert re.search(rf"feed.stop stream={stream} reason=\"no viewers left\"", log), log[-2000:]
        wait_segments(up.hls("idle"), 1)  # asked again: a new muxer
        assert len(re.findall(rf"hls.start stream={stream} ", up.process.log()[seen:])) == 1
    finally:
        publisher.kill()
        publisher.wait()


@pytest.mark.parametrize("container", ["ts", "fmp4"])
def test_keep_alive_serves_playlist_and_segments_on_one_connection(suite: Up, container: str) -> None:
    import http.client

    publisher = publish(suite.rtmp(f"ka-{container}"), 20, gop=30)
    try:
        wait_segments(suite.hls(f"ka-{container}", container), 1)
        conn = http.client.HTTPConnection("127.0.0.1", suite.http_port, timeout=10)
        for _ in range(3):
            conn.request("GET", f"/live/ka-{container}.m3u8?format={container}")
            playlist = parse_playlist(conn.getresponse().read().decode())
            conn.request("GET", f"/live/{playlist.segments[-1][1]}")
            response = conn.getresponse()
            assert response.status == 200 and len(response.read()) > 1000
        # the muxer is one viewer of the stream's feed that stands for its clients: they are counted
        listing = json.loads(http_get(f"http://127.0.0.1:{suite.http_port}/api/viewers").read())
        assert listing["streams"][f"live/ka-{container}"] >= 1, listing
        assert metric(suite, re.escape('castmesh_playback_viewers{protocol="hls"}')) >= 1
        conn.close()
    finally:
        publisher.kill()
        publisher.wait()
