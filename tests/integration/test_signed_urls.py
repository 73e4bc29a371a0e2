"""Signed URLs with a secret configured in `castmesh up`: ffmpeg's unsigned, expired or forged publish is
refused with the reason, a signed one works, and playing needs a signature over every protocol (HTTP-FLV,
WebSocket-FLV, HLS and its segments, RTMP), also through the gateway's API."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from castmesh.mesh.auth import Signer
from tests.integration.harness import FFMPEG, Up, decode, http_get, publish, start_up, wait_live

SECRET = "correct horse battery staple"
SIGNER = Signer({"*": SECRET})


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = start_up(Path(tmp_path_factory.mktemp("secured")), "--secret", SECRET)
    yield up
    up.process.stop()


def refused_publish(url: str) -> str:
    """What ffmpeg says when its publish is refused (it must fail, not stream)."""
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                             "testsrc2=size=160x120:rate=10:duration=3", "-c:v", "libx264", "-f", "flv", url],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0, "ffmpeg published without a valid signature"
    return result.stderr


def test_unsigned_expired_or_forged_publishes_are_refused_and_a_signed_one_works(secured: Up) -> None:
    said = refused_publish(secured.rtmp("locked"))
    assert "Server error: live/locked: this stream needs a signed URL" in said  # the reason reaches ffmpeg
    expired = int(time.time()) - 10
    refused_publish(f"{secured.rtmp('locked')}?expires={expired}&sign={SIGNER.sign('live', 'locked', expired)}")
    other = SIGNER.query("live", "another-stream")  # a signature for a different stream
    refused_publish(f"{secured.rtmp('locked')}?{other}")
    log = secured.process.log()
    assert "needs a signed URL" in log and "has expired" in log and "does not match" in log

    publisher = publish(f"{secured.rtmp('locked')}?{SIGNER.query('live', 'locked')}", 20, gop=30)
    try:
        signed = SIGNER.query("live", "locked")
        wait_live(f"{secured.flv('locked')}?{signed}")
        counts, errors = decode(f"{secured.flv('locked')}?{signed}", seconds=2)
        assert errors == "" and counts.get(0, 0) > 30
    finally:
        publisher.kill()
        publisher.wait()


def test_play_needs_a_signature_over_every_protocol(secured: Up) -> None:
    publisher = publish(f"{secured.rtmp('guarded')}?{SIGNER.query('live', 'guarded')}", 30, gop=30)
    signed = SIGNER.query("live", "guarded")
    try:
        wait_live(f"{secured.flv('guarded')}?{signed}")
        for url in (secured.flv("guarded"), secured.hls("guarded"),
                    f"http://127.0.0.1:{secured.http_port}/api/v1/streams/live/guarded/play?protocol=hls"):
            response = http_get(url)
            assert response.status == 403, url
            assert b"signed URL" in response.read()
        # WebSocket-FLV: the upgrade is refused too
        sock = socket.create_connection(("127.0.0.1", secured.http_port), timeout=5)
        sock.sendall(b"GET /live/guarded.flv HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 403")
        sock.close()
        # RTMP play: ffmpeg is refused without, plays with
        result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", secured.rtmp("guarded"),
                                 "-t", "1", "-f", "null", "-"], capture_output=True, text=True, timeout=30,
                                check=False)
        assert result.returncode != 0
        counts, errors = decode(f"{secured.rtmp('guarded')}?{signed}", seconds=2)
        assert errors == "" and counts.get(0, 0) > 30
        # HLS: the playlist's segment URIs carry the signature, so ffmpeg plays it through
        playlist = http_get(f"{secured.hls('guarded')}?{signed}", timeout=15).read().decode()
        assert f".ts?{signed}" in playlist.replace("&amp;", "&") or ".ts?expires=" in playlist
        counts, errors = decode(f"{secured.hls('guarded')}?{signed}", seconds=3)
        assert errors == "" and counts.get(0, 0) > 60
        answer = http_get(f"http://127.0.0.1:{secured.http_port}/api/v1/streams/live/guarded/play?{signed}")
        assert answer.status == 200 and signed.split("&")[1] in answer.read().decode()  # the URL keeps it
    finally:
        publisher.kill()
        publisher.wait()
