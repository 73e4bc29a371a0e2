"""SRT ingest on `castmesh up`: ffmpeg (imageio-ffmpeg's build has libsrt) publishes MPEG-TS over srt://
with each stream id form, and ffmpeg decodes the stream over HTTP-FLV, HLS and RTMP, video and audio;
HEVC over SRT comes out as fMP4 HLS. A wrong passphrase, a bad signature, a stream id that names no
stream, a second publisher of a stream, garbage datagrams and a caller that goes silent are each
refused or closed with a log line, while a stream next to them plays on."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from castmesh.mesh.auth import Signer
from tests.integration.harness import FFMPEG, Up, decode, free_port, start_up, wait_live

PASSPHRASE = "correct horse battery"


@pytest.fixture(scope="module")
def srt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, int]]:
    tmp = Path(tmp_path_factory.mktemp("srt"))
    port = free_port()
    up = start_up(tmp, "--srt-port", str(port), "--srt-passphrase", f"secure={PASSPHRASE}",
                  "--secret", "signed=topsecret", "--idle-timeout-ms", "3000", "--hls-segment-ms", "1000")
    yield up, port
    up.process.stop()


def send(port: int, stream_id: str, seconds: float, codec: str = "h264", extra: str = "") -> subprocess.Popen[bytes]:
    """ffmpeg publishing a test pattern and a tone over SRT in real time."""
    video = (["-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-bf", "2"] if codec == "h264" else
             ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error:keyint=30"])
    url = f"srt://127.0.0.1:{port}?streamid={quote(stream_id, safe='')}&latency=120000{extra}"
    return subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                             f"testsrc2=size=320x240:rate=30:duration={seconds}", "-f", "lavfi", "-i",
                             f"sine=frequency=440:sample_rate=44100:duration={seconds}", *video,
                             "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-f", "mpegts", url],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def log_has(up: Up, text: str, seconds: float = 8.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in up.process.log():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stream_id", ["#!::r=live/sa,m=publish", "publish:live/sb"])
def test_ffmpeg_publishes_over_srt_and_plays_over_flv_hls_and_rtmp(srt: tuple[Up, int], stream_id: str) -> None:
    up, port = srt
    name = stream_id.split("/")[1].split(",")[0]
    publisher = send(port, stream_id, 25)
    try:
        wait_live(up.flv(name))
        for url in (up.flv(name), up.hls(name), up.rtmp(name)):
            counts, errors = decode(url, timeout=40, seconds=3)
            assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) > 60, (url, counts, errors)
        assert publisher.poll() is None
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

        counts, errors = decode(up.flv("steady"), timeout=40, seconds=3)
        assert errors == "" and counts.get(0, 0) >= 60 and counts.get(1, 0) > 60
        assert steady.poll() is None and up.process.proc.poll() is None
    finally:
        for proc in (steady, *others):
            proc.kill()
            proc.wait()
