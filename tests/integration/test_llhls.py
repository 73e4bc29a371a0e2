"""Low-latency HLS (RFC 8216bis) from `castmesh up`, read as a client would: the playlist's parts,
preload hint and server control; a blocking reload that returns when the asked-for part exists and a 400
for one too far ahead; a delta update; the preload-hinted part answered once it exists; and ffmpeg decoding
the playlist, a segment and a single part."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import FFMPEG, Up, decode, http_get, publish, start_up

PART_TARGET = 0.2


@pytest.fixture(scope="module")
def low_latency(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = start_up(Path(tmp_path_factory.mktemp("llhls")), "--hls-segment-ms", "1000")
    yield up
    up.process.stop()


def get(up: Up, path: str, timeout: float = 10) -> tuple[int, bytes, float]:
    started = time.monotonic()
    response = http_get(f"http://127.0.0.1:{up.http_port}/live/{path}", timeout=timeout)
    return response.status, response.read(), time.monotonic() - started


def parts_of(text: str) -> list[tuple[float, str, bool]]:
    return [(float(m[1]), m[2], bool(m[3])) for m in
            re.finditer(r'#EXT-X-PART:DURATION=([\d.]+),URI="([^"]+)"(,INDEPENDENT=YES)?', text)]


def edge_of(text: str) -> tuple[int, int]:
    """The (media sequence number, part index) of the part after the last one listed."""
    sequence = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text)[1])  # type: ignore[index]
    blocks = re.split(r"^#EXTINF:[\d.]+,\n\S+$", text, flags=re.M)
    return sequence + len(blocks) - 1, blocks[-1].count("#EXT-X-PART:")


def hint_of(text: str) -> str:
    match = re.search(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="([^"]+)"', text)
    assert match, text
    return match[1]


def test_low_latency_hls_parts_blocking_reloads_and_delta_updates(low_latency: Up, tmp_path: Path) -> None:
    publisher = publish(low_latency.rtmp("ll"), 40, gop=30)
    try:
        deadline = time.monotonic() + 30
        while True:  # the muxer starts with the first request and lists once a segment is complete
            status, body, _ = get(low_latency, "ll.m3u8?format=llhls")
            if (status == 200 and body.count(b"#EXTINF") >= 7) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        text = body.decode()
        assert status == 200 and "#EXT-X-VERSION:9" in text, text
        assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.600,CAN-SKIP-UNTIL=6.0" in text
        assert f"#EXT-X-PART-INF:PART-TARGET={PART_TARGET:.3f}" in text
        assert "#EXT-X-PROGRAM-DATE-TIME:" in text and "#EXT-X-MAP:URI=" in text
        parts = parts_of(text)
        assert len(parts) >= 5 and all(0 < duration <= PART_TARGET for duration, _, _ in parts), parts
        assert any(independent for _, _, independent in parts)
        assert not re.search(r"/[0-9a-f]{8}/", text)  # no per-muxer or session ids

        # A blocking reload for the next part returns once it exists, not before and not much after, listing
        # the part the preload hint named.
        msn, part = edge_of(text)
        hinted = hint_of(text)
        status, body, took = get(low_latency, f"ll.m3u8?format=llhls&_HLS_msn={msn}&_HLS_part={part}")
        assert status == 200 and 0.01 < took < 1.0, (status, took)
        assert any(uri == hinted for _, uri, _ in parts_of(body.decode())), (hinted, body.decode())
        # The next hinted part, fetched before it exists, comes as soon as it does (a blocking preload hint).
        status, part_bytes, took = get(low_latency, hint_of(body.decode()))
        assert status == 200 and part_bytes[4:8] == b"moof" and took < 1.0, (status, took)
        msn, part = edge_of(body.decode())

        # Too far ahead: 400 at once (RFC 8216bis 6.2.5.2), for a segment and for a part.
        status, _, took = get(low_latency, f"ll.m3u8?format=llhls&_HLS_msn={msn + 3}")
        assert status == 400 and took < 0.5
        status, _, _ = get(low_latency, f"ll.m3u8?format=llhls&_HLS_msn={msn}&_HLS_part={part + 30}")
        assert status == 400
        assert get(low_latency, "ll.m3u8?format=llhls&_HLS_part=1")[0] == 400

        # A delta update skips what is older than CAN-SKIP-UNTIL (six target durations).
        status, body, _ = get(low_latency, "ll.m3u8?format=llhls&_HLS_skip=YES")
        delta = body.decode()
        skipped = re.search(r"#EXT-X-SKIP:SKIPPED-SEGMENTS=(\d+)", delta)
        assert status == 200 and skipped and int(skipped[1]) >= 1, delta
        full_uris = re.findall(r"^\S+\.m4s$", get(low_latency, "ll.m3u8?format=llhls")[1].decode(), re.M)
        delta_uris = re.findall(r"^\S+\.m4s$", delta, re.M)
        assert delta_uris and len(delta_uris) < len(full_uris)

        # ffmpeg decodes a segment, an independent part (after the init segment) and the playlist itself.
        init_uri = re.findall(r'#EXT-X-MAP:URI="([^"]+)"', text)[-1]
        init = get(low_latency, init_uri)[1]
        segment_uri = re.findall(r"^(\S+\.m4s)$", text, re.M)[-1]
        independent_uri = next(uri for _, uri, independent in parts if independent)
        for piece, media in (("segment", get(low_latency, segment_uri)[1]),
                             ("part", get(low_latency, independent_uri)[1])):
            path = tmp_path / f"{piece}.mp4"
            path.write_bytes(init + media)
            result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "framecrc",
                                     "-"], capture_output=True, timeout=30, check=False)
            video = [line for line in result.stdout.decode().splitlines() if line.startswith("0,")]
            assert result.stderr == b"" and video, (piece, result.stderr)
        counts, errors = decode(low_latency.hls("ll", "llhls"), seconds=3)
        assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) >= 80, (counts, errors)
    finally:
        publisher.kill()
        publisher.wait()
