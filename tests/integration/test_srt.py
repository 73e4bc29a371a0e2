"""SRT on `castmesh up`: ffmpeg (imageio-ffmpeg's build has libsrt) publishes MPEG-TS over srt:// with
each stream id form, and ffmpeg decodes the stream over HTTP-FLV, HLS, RTMP and SRT (m=request, read:),
video and audio;
HEVC over SRT comes out as fMP4 HLS. A wrong passphrase, a bad signature, a stream id that names no
stream, a second publisher of a stream, garbage datagrams and a caller that goes silent are each
refused or closed with a log line, while a stream next to them plays on."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from castmesh.mesh.auth import Signer
from tests.integration.harness import (
    FFMPEG,
    LossyPath,
    Up,
    decode,
    free_port,
    http_get,
    log_has,
    start_up,
    wait_live,
)

PASSPHRASE = "correct horse battery"


@pytest.fixture(scope="module")
def srt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, int]]:
    tmp = Path(tmp_path_factory.mktemp("srt"))
    port = free_port()
    up = start_up(tmp, "--srt-port", str(port), "--srt-passphrase", f"secure={PASSPHRASE}",
                  "--secret", "signed=topsecret", "--idle-timeout-ms", "3000", "--hls-segment-ms", "1000")
    yield up, port
    up.process.stop()


def srt_url(port: int, stream_id: str, extra: str = "", latency_ms: int = 120) -> str:
    return f"srt://127.0.0.1:{port}?streamid={quote(stream_id, safe='')}&latency={latency_ms * 1000}{extra}"


def send(port: int, stream_id: str, seconds: float, codec: str = "h264", extra: str = "",
         latency_ms: int = 120) -> subprocess.Popen[bytes]:
    """ffmpeg publishing a test pattern and a tone over SRT in real time."""
    video = (["-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-bf", "2"] if codec == "h264" else
             ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error:keyint=30"])
    url = srt_url(port, stream_id, extra, latency_ms)
    return subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                             f"testsrc2=size=320x240:rate=30:duration={seconds}", "-f", "lavfi", "-i",
                             f"sine=frequency=440:sample_rate=44100:duration={seconds}", *video,
                             "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-f", "mpegts", url],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def play(port: int, stream_id: str, extra: str = "") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", srt_url(port, stream_id, extra),
                           "-t", "1", "-f", "null", "-"], capture_output=True, timeout=30, check=False)


@pytest.mark.parametrize("stream_id,play_id", [("#!::r=live/sa,m=publish", "#!::r=live/sa,m=request"),
                                               ("publish:live/sb", "read:live/sb")])
def test_ffmpeg_publishes_over_srt_and_plays_over_flv_hls_rtmp_and_srt(srt: tuple[Up, int], stream_id: str,
                                                                       play_id: str) -> None:
    up, port = srt
    name = stream_id.split("/")[1].split(",")[0]
    publisher = send(port, stream_id, 25)
    try:
        wait_live(up.flv(name))
        urls = [up.flv(name), up.hls(name), up.rtmp(name)] if "#!::" in stream_id else []  # once is enough
        with ThreadPoolExecutor(4) as pool:  # the viewers at once, as viewers come
            runs = {url: pool.submit(decode, url, timeout=40, seconds=3) for url in (*urls, srt_url(port, play_id))}
            for url, run in runs.items():
                counts, errors = run.result()
                assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) > 60, (url, counts, errors)
        assert publisher.poll() is None
    finally:
        publisher.kill()
        publisher.wait()


def test_opus_over_srt_plays_over_srt_and_http_flv(srt: tuple[Up, int]) -> None:
    """H.264 + Opus in MPEG-TS (ffmpeg's mapping) comes in as enhanced RTMP's Opus and goes out as it came:
    in TS to SRT players, in enhanced FLV to HTTP-FLV ones."""
    up, port = srt
    publisher = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                                  "testsrc2=size=160x120:rate=30:duration=15", "-f", "lavfi", "-i",
                                  "sine=frequency=440:sample_rate=48000:duration=15", "-c:v", "libx264", "-preset",
                                  "veryfast", "-g", "30", "-pix_fmt", "yuv420p", "-c:a", "libopus", "-ac", "2",
                                  "-f", "mpegts", srt_url(port, "publish:live/opus")],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_live(up.flv("opus"))
        for url in (srt_url(port, "read:live/opus"), up.flv("opus")):
            counts, errors = decode(url, timeout=40, seconds=2)
            assert errors == "" and counts.get(0, 0) >= 40 and counts.get(1, 0) >= 80, (url, counts, errors)
    finally:
        publisher.kill()
        publisher.wait()


def test_the_gateway_answers_srt_urls_that_publish_and_play(srt: tuple[Up, int]) -> None:
    up, port = srt
    api = f"http://127.0.0.1:{up.http_port}/api/v1"
    answer = json.load(http_get(f"{api}/publish/live/asked?protocol=srt"))
    assert answer["protocol"] == "srt" and answer["url"].startswith(f"srt://127.0.0.1:{port}?streamid=")
    publisher = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                                  "testsrc2=size=160x120:rate=30:duration=20", "-c:v", "libx264", "-preset",
                                  "veryfast", "-g", "30", "-pix_fmt", "yuv420p", "-f", "mpegts", answer["url"]],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_live(up.flv("asked"))
        answer = json.load(http_get(f"{api}/streams/live/asked/play?protocol=srt"))
        assert answer["protocol"] == "srt" and "m%3Drequest" in answer["url"], answer
        counts, errors = decode(answer["url"], timeout=40, seconds=2)
        assert errors == "" and counts.get(0, 0) >= 40, (counts, errors)
    finally:
        publisher.kill()
        publisher.wait()


def test_hevc_over_srt_comes_out_as_fmp4_hls(srt: tuple[Up, int]) -> None:
    up, port = srt
    publisher = send(port, "publish:live/hevc", 25, codec="hevc")
    try:
        wait_live(up.flv("hevc"))
        playlist = up.hls("hevc", "fmp4")
        counts, errors = decode(playlist, timeout=40, seconds=3)
        assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) > 60, (counts, errors)
        probe = subprocess.run([FFMPEG, "-hide_banner", "-i", playlist, "-t", "0.1", "-f", "null", "-"],
                               capture_output=True, timeout=40, check=False)
        assert b"Video: hevc" in probe.stderr
    finally:
        publisher.kill()
        publisher.wait()


def test_refusals_and_faults_are_logged_and_leave_the_next_stream_alone(srt: tuple[Up, int]) -> None:
    up, port = srt
    steady = send(port, "publish:live/steady", 45)
    others: list[subprocess.Popen[bytes]] = []
    try:
        wait_live(up.flv("steady"))
        base = f"http://127.0.0.1:{up.http_port}"
        wrong = send(port, "publish:secure/x", 5, extra=f"&passphrase={quote('not the passphrase')}")
        assert wrong.wait(20) != 0 and log_has(up, 'reason="libsrt: Incorrect passphrase"')  # BADSECRET
        nameless = send(port, "publish:nothing", 5)
        assert nameless.wait(20) != 0 and log_has(up, "is not APP/STREAM")
        forged = send(port, "publish:signed/x?expires=9999999999&sign=00", 5)
        assert forged.wait(20) != 0 and log_has(up, "the signature does not match")
        expires = int(time.time()) + 120
        query = f"expires={expires}&sign={Signer.parse('signed=topsecret').sign('signed', 'x', expires)}"
        others.append(send(port, f"publish:signed/x?{query}", 30))
        others.append(send(port, "publish:secure/y", 30, extra=f"&passphrase={quote(PASSPHRASE)}"))
        wait_live(f"{base}/signed/x.flv?{query}")
        wait_live(f"{base}/secure/y.flv")

        second = send(port, "publish:live/steady", 10)  # the stream is taken: accepted, then closed
        assert second.wait(20) != 0
        assert re.search(r'srt\.end .*stream=live/steady reason="refused: ', up.process.log())

        garbage = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(2000):
            garbage.sendto(os.urandom(1316), ("127.0.0.1", port))
        garbage.close()

        quiet = send(port, "publish:live/quiet", 30)  # a caller that goes silent mid-stream: frozen
        others.append(quiet)
        wait_live(up.flv("quiet"))
        quiet.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 15  # --idle-timeout-ms 3000, then libsrt breaks the connection
        while not re.search(r"srt\.end .*stream=live/quiet", up.process.log()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert re.search(r"srt\.end .*stream=live/quiet", up.process.log())

        # SRT players: one without the app's passphrase, one asking for a stream nobody publishes, one frozen
        assert play(port, "read:secure/y", extra=f"&passphrase={quote('not the passphrase')}").returncode != 0
        assert play(port, "read:live/nobody").returncode != 0
        assert log_has(up, 'path=/live/nobody protocol=srt reason=')
        frozen = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-i",
                                   srt_url(port, "read:live/steady"), "-f", "null", "-"],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        others.append(frozen)
        assert log_has(up, "path=/live/steady protocol=srt")
        frozen.send_signal(signal.SIGSTOP)
        assert log_has(up, 'path=/live/steady protocol=srt reason="the connection broke', seconds=15)

        counts, errors = decode(up.flv("steady"), timeout=40, seconds=3)
        assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) > 60
        counts, errors = decode(srt_url(port, "read:live/steady"), timeout=40, seconds=3)
        assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) > 60
        assert steady.poll() is None and up.process.proc.poll() is None
    finally:
        for proc in (steady, *others):
            proc.kill()
            proc.wait()


def gaps(source: str, seconds: float) -> tuple[tuple[int, int], tuple[int, int], str]:
    """Decode `seconds` of `source`: (frames, gaps) of video and of audio, and ffmpeg's complaints. A gap is
    a step in presentation time of more than one and a half frames: something never arrived."""
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", source, "-t", str(seconds),
                             "-f", "framecrc", "-"], capture_output=True, timeout=40, check=False)
    times: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    for line in result.stdout.decode().splitlines():
        if line and not line.startswith("#"):
            index, _, pts, duration = (int(field) for field in line.split(",")[:4])
            times.setdefault(index, []).append((pts, duration))
    found = []
    for index in (0, 1):
        steps = [(b[0] - a[0], a[1]) for a, b in zip(times[index], times[index][1:], strict=False)]
        found.append((len(times[index]), sum(1 for step, duration in steps if step > 1.5 * duration)))
    # ffmpeg's libsrt writes its own warnings to stderr: under loss, a lost handshake answer ("received DATA
    # while HANDSHAKE expected", then it asks again). Those are the protocol recovering, not decoding.
    complaints = [line for line in result.stderr.decode(errors="replace").strip().splitlines()
                  if not re.search(r"/SRT:\S+!W:", line)]
    return found[0], found[1], "\n".join(complaints)


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))


def test_srt_under_loss_and_delay_plays_without_gaps(srt: tuple[Up, int]) -> None:
    """5% of datagrams lost each way (once the handshake is through) and 20 +- 5 ms of delay, on the
    publisher's path and on an SRT player's:
    at a latency of 400 ms (ten round trips) SRT's retransmissions get everything through in time, so
    HTTP-FLV and SRT players decode every frame, and the log lines show losses that were made good."""
    up, port = srt
    inbound, outbound = LossyPath(port, seed=1), LossyPath(port, seed=2)
    publisher = send(inbound.port, "publish:live/lossy", 14, latency_ms=400)
    try:
        wait_live(up.flv("lossy"))
        for url in (up.flv("lossy"), srt_url(outbound.port, "read:live/lossy", latency_ms=400)):
            video, audio, errors = gaps(url, 4)
            assert errors == "" and video[0] >= 90 and audio[0] >= 140, (url, video, audio, errors)
            assert video[1] == 0 and audio[1] == 0, (url, video, audio)
        assert publisher.wait(30) == 0
        assert log_has(up, "srt.end session=")
        publish_end = fields(next(line for line in up.process.log().splitlines()
                                  if "srt.end" in line and "stream=live/lossy" in line))
        assert int(publish_end["lost"]) > 0 and int(publish_end["retransmitted"]) >= 0, publish_end
        assert publish_end["dropped"] == "0" and publish_end["ts_errors"] == "0", publish_end
        viewer_end = fields(next(line for line in up.process.log().splitlines()
                                 if "viewer.stop" in line and "path=/live/lossy protocol=srt" in line))
        assert int(viewer_end["retransmitted"]) > 0 and viewer_end["dropped"] == "0", viewer_end
        assert inbound.lost > 20 and outbound.lost > 20
    finally:
        publisher.kill()
        publisher.wait()
        inbound.close()
        outbound.close()
