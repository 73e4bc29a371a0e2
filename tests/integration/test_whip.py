"""WHIP into `castmesh up`: ffmpeg's `whip` muxer publishes H.264 and Opus; the stream is the same as an RTMP
publisher's: ffmpeg decodes it over HTTP-FLV and HLS (video, and the Opus as AAC), a WHEP viewer (aiortc)
and Chromium (the player page's WebRTC choice) play it back, and the WHIP session's DELETE (ffmpeg sends it
as it exits) ends the publish cleanly. The publish lasts 40 s, past aioice's 30 s ICE consent window (ffmpeg
answers no consent check after ICE completes; castmesh's publisher connections do not ask)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time

from tests import whep_client
from tests.integration.harness import FFMPEG, Up, decode, http_get, wait_live
from tests.integration.test_hls import wait_segments
from tests.integration.test_player_page import play_in_chromium


def whip_publish(up: Up, name: str, seconds: float) -> subprocess.Popen[bytes]:
    """ffmpeg's own WHIP client: H.264 without B-frames (it refuses them) and Opus; "q" on its stdin ends it
    as at the end of its input (a DELETE, exit status 0)."""
    return subprocess.Popen([
        FFMPEG, "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=30:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
        "-c:v", "libx264", "-preset", "veryfast", "-bf", "0", "-g", "30", "-pix_fmt", "yuv420p",
        "-c:a", "libopus", "-b:a", "64k", "-ar", "48000", "-ac", "2",
        "-f", "whip", f"http://127.0.0.1:{up.http_port}/live/{name}/whip"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_ffmpeg_publishes_over_whip_and_it_plays_over_flv_hls_and_whep(suite: Up) -> None:
    publisher = whip_publish(suite, "whip", 40)
    try:
        wait_live(suite.flv("whip"), timeout=20)
        flv_counts, flv_errors = decode(suite.flv("whip"), seconds=4)
        wait_segments(suite.hls("whip"), 2)
        hls_counts, hls_errors = decode(suite.hls("whip"), seconds=4)
        seen = asyncio.run(whep_client.watch(f"http://127.0.0.1:{suite.http_port}/live/whip/whep", 3.0))
        listing = json.loads(http_get(f"http://127.0.0.1:{suite.http_port}/api/streams").read())
        play_in_chromium(suite, "live/whip", "whip", "webrtc")  # the page's checks: picture, time, audio decoded
    finally:
        _, err = publisher.communicate(b"q", timeout=40)  # (its checks done: no need to wait for its end)
    assert publisher.returncode == 0, err.decode(errors="replace")[-2000:]
    assert flv_errors == "" and flv_counts.get(0, 0) >= 90 and flv_counts.get(1, 0) >= 150, (flv_counts, flv_errors)
    assert hls_errors == "" and hls_counts.get(0, 0) >= 90 and hls_counts.get(1, 0) >= 150, (hls_counts, hls_errors)
    row = next(s for s in listing["streams"] if s["path"] == "live/whip")
    assert (row["video"], row["audio"], row["width"], row["height"]) == ("H.264", "AAC", 320, 240), row
    assert seen.status == 201 and seen.size == (320, 240), seen.body
    assert seen.frames["video"] >= 45 and seen.frames["audio"] >= 75, seen.frames
    log = suite.process.log()
    assert re.search(r"whip.start session=whip-\d+ stream=live/whip peer=\S+ video=True audio=True", log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not re.search(r"whip.end session=\S+ stream=live/whip "
                                                        r"reason=\"deleted by the publisher\" clean=True", log):
        time.sleep(0.2)
        log = suite.process.log()
    assert re.search(r"whip.end session=\S+ stream=live/whip reason=\"deleted by the publisher\" clean=True", log)


def test_whip_requests_that_cannot_be_taken_get_problems(suite: Up) -> None:
    url = f"http://127.0.0.1:{suite.http_port}/live/whip-bad/whip"

    async def attempts() -> dict[str, int]:
        pc = await whep_client.offer()  # an offer to receive is no publish: it has nothing castmesh takes
        recvonly = pc.localDescription.sdp
        out = {
            "options": (await whep_client.request("OPTIONS", url))[0],
            "get": (await whep_client.request("GET", url))[0],
            "not sdp type": (await whep_client.post(url, recvonly, content_type="text/plain"))[0],
            "garbage": (await whep_client.post(url, "v=0\r\nnot an offer\r\n"))[0],
            "an offer to receive": (await whep_client.post(url, recvonly))[0],
            "delete unknown": (await whep_client.request("DELETE", url + "/whip-999"))[0],
        }
        await pc.close()
        return out

    assert asyncio.run(attempts()) == {"options": 204, "get": 405, "not sdp type": 415, "garbage": 400,
                                       "an offer to receive": 422, "delete unknown": 404}
    assert "whip-bad" not in suite.process.log()  # none of them asked for the stream


def test_chromium_publishes_over_whip_and_ffmpeg_decodes_it_over_flv(suite: Up) -> None:
    """A browser as the WHIP publisher: Chromium's fake camera and microphone, its own H.264 (OpenH264)
    and Opus; ffmpeg decodes the stream over HTTP-FLV (video, and the Opus as AAC)."""
    import threading

    from tests.integration.test_player_page import BROWSER_DIR

    url = f"http://127.0.0.1:{suite.http_port}/live/browser-whip/whip"
    done: list[subprocess.CompletedProcess[str]] = []
    browser = threading.Thread(target=lambda: done.append(subprocess.run(
        ["node", str(BROWSER_DIR / "whip.mjs"), f"http://127.0.0.1:{suite.http_port}/", url, "12"],
        capture_output=True, text=True, timeout=120, check=False)))
    browser.start()
    try:
        wait_live(suite.flv("browser-whip"), timeout=30)
        counts, errors = decode(suite.flv("browser-whip"), seconds=4)
    finally:
        browser.join(120)
    (result,) = done
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["status"] == 201 and seen["state"] == "connected" and seen["deleted"] == 200, seen
    assert seen["sent"]["video"]["codec"] == "video/H264" and seen["sent"]["audio"]["codec"] == "audio/opus", seen
    assert seen["consoleErrors"] == []
    assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) >= 100, (counts, errors)
    log = suite.process.log()
    assert re.search(r"whip.end session=\S+ stream=live/browser-whip reason=\"deleted by the publisher\" "
                     r"clean=True", log)
