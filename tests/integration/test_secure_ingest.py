"""RTMPS and IP lists on `castmesh up`, with a certificate made in the test: ffmpeg publishes over rtmps://
and plays back over RTMPS and HTTP-FLV; castmesh's own RTMP client plays over RTMPS; a failed TLS handshake
on the RTMPS port closes only that connection, with its reason in the log. A denied address is refused
on every protocol (RTMP, RTMPS, HTTP-FLV, WebSocket-FLV, HLS, WHEP, WHIP) with the reason, an allowed one
plays, and X-Forwarded-For counts only from a trusted proxy. Other loopback addresses (127.0.0.2...) are
the other clients: Linux answers the whole of 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from castmesh.mesh.rtmp_client import RtmpClient, RtmpRefused
from castmesh.mesh.tls import self_signed
from castmesh.rtmp import chunks
from tests.integration.harness import (
    FFMPEG,
    Up,
    decode,
    free_port,
    log_has,
    publish,
    scrape,
    srt_call,
    start_up,
    wait_live,
)

DENIED_PLAYER, DENIED_PUBLISHER, PROXY = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, int, Path, int]]:
    tmp = Path(tmp_path_factory.mktemp("rtmps"))
    cert, key = self_signed(tmp)
    rtmps, srt = free_port(), free_port()
    up = start_up(tmp, "--tls-cert", str(cert), "--tls-key", str(key), "--https-port", str(free_port()),
                  "--rtmps-port", str(rtmps), "--srt-port", str(srt), "--handshake-timeout-ms", "1500",
                  "--play-deny", DENIED_PLAYER, "--publish-deny", f"live={DENIED_PUBLISHER}",
                  "--trusted-proxies", PROXY)
    yield up, rtmps, cert, srt
    up.process.stop()


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_ffmpeg_publishes_and_plays_over_rtmps_and_a_failed_handshake_closes_only_itself(
        secure: tuple[Up, int, Path, int]) -> None:
    up, rtmps, cert, _ = secure
    env = {**os.environ, "SSL_CERT_FILE": str(cert)}  # ffmpeg checks the certificate
    publisher = subprocess.Popen(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100", "-t", "30", "-c:v", "libx264", "-preset",
         "veryfast", "-g", "30", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-f", "flv",
         f"rtmps://127.0.0.1:{rtmps}/live/sec"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=env)
    try:
        wait_live(up.flv("sec"))
        played = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i",
                                 f"rtmps://127.0.0.1:{rtmps}/live/sec", "-t", "3", "-f", "framecrc", "-"],
                                capture_output=True, timeout=60, env=env, check=False)
        lines = played.stdout.decode().splitlines()
        assert played.stderr == b"" and sum(line.startswith("0,") for line in lines) >= 80, played.stderr[-500:]
        assert sum(line.startswith("1,") for line in lines) > 80  # and the audio

        garbage = socket.create_connection(("127.0.0.1", rtmps), timeout=5)
        garbage.sendall(b"\x03" + os.urandom(1536))  # an RTMP handshake on the RTMPS port
        assert garbage.recv(100) == b""
        garbage.close()

        async def play() -> int:  # castmesh's own RTMP client, as forwarding will use it, over RTMPS
            client = await RtmpClient.open("127.0.0.1", rtmps, "live", "sec", mode="play", tls=trusting(cert))
            pictures = 0
            async for media in client.media():
                pictures += media.kind == chunks.VIDEO
                if pictures >= 60:
                    break
            await client.close()
            return pictures

        assert asyncio.run(asyncio.wait_for(play(), 20)) >= 60
        counts, errors = decode(up.flv("sec"), timeout=40, seconds=2)  # undisturbed, and plain HTTP-FLV
        assert errors == "" and counts.get(0, 0) >= 50
        deadline = time.monotonic() + 3
        while "tls.handshake_failed service=ingest" not in up.process.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "tls.handshake_failed service=ingest" in up.process.log()
        assert publisher.poll() is None
    finally:
        publisher.kill()
        publisher.wait()


def http_status(up: Up, source: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
                body: bytes = b"") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", up.http_port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        answer = conn.getresponse()
        text = answer.read(300).decode(errors="replace") if answer.status != 200 else ""
        return answer.status, text
    finally:
        conn.close()


def test_ip_lists_refuse_every_protocol_and_trust_forwarded_for_only_from_proxies(
        secure: tuple[Up, int, Path, int]) -> None:
    up, rtmps, cert, srt = secure
    publisher = publish(up.rtmp("lists"), 30, gop=30)
    try:
        wait_live(up.flv("lists"))
        before = scrape(up.http_port)
        sdp = {"Content-Type": "application/sdp"}
        websocket = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        for path, method, headers in (("/live/lists.flv", "GET", {}), ("/live/lists.flv", "GET", websocket),
                                      ("/live/lists.m3u8", "GET", {}), ("/live/lists.m3u8?format=llhls", "GET", {}),
                                      ("/live/lists/whep", "POST", sdp)):
            body = b"v=0\r\n" if method == "POST" else b""
            status, text = http_status(up, DENIED_PLAYER, path, method, headers, body)
            assert status == 403 and "may not play" in text and "--play-deny" in text, (path, status, text)
            assert http_status(up, "127.0.0.1", path, method, headers)[0] != 403, path
        status, text = http_status(up, DENIED_PUBLISHER, "/live/new/whip", "POST", sdp, b"v=0\r\n")
        assert status == 403 and "may not publish" in text, text

        async def rtmp() -> None:
            for port, tls in ((up.rtmp_port, None), (rtmps, trusting(cert))):
                with pytest.raises(RtmpRefused) as refused:
                    await RtmpClient.open("127.0.0.1", port, "live", "lists", mode="play", tls=tls,
                                          local_address=(DENIED_PLAYER, 0))
                assert "--play-deny" in str(refused.value)
                with pytest.raises(RtmpRefused) as refused:
                    await RtmpClient.open("127.0.0.1", port, "live", "new", tls=tls,
                                          local_address=(DENIED_PUBLISHER, 0))
                assert "--publish-deny" in str(refused.value)
            other = await RtmpClient.open("127.0.0.1", up.rtmp_port, "studio", "new",  # the list is live's only
                                          local_address=(DENIED_PUBLISHER, 0))
            await other.close()
            watcher = await RtmpClient.open("127.0.0.1", up.rtmp_port, "live", "lists", mode="play",
                                            local_address=(DENIED_PUBLISHER, 0))  # may play
            await watcher.close()

        asyncio.run(asyncio.wait_for(rtmp(), 30))

        assert srt_call(srt, "read:live/lists", DENIED_PLAYER) == 1403  # SRT: in the handshake, as libsrt says
        assert srt_call(srt, "publish:live/new", DENIED_PUBLISHER) == 1403
        assert srt_call(srt, "read:live/lists", DENIED_PUBLISHER) == 0 and srt_call(srt, "publish:studio/x") == 0
        assert log_has(up, "srt.rejected peer=127.0.0.2:") and log_has(up, "srt.rejected peer=127.0.0.3:")

        forwarded = {"X-Forwarded-For": DENIED_PLAYER}
        assert http_status(up, PROXY, "/live/lists.m3u8", headers=forwarded)[0] == 403  # the proxy says who
        assert http_status(up, PROXY, "/live/lists.m3u8", headers={"X-Forwarded-For": "127.0.0.9"})[0] == 200
        assert http_status(up, "127.0.0.1", "/live/lists.m3u8", headers=forwarded)[0] == 200  # not a proxy
        refused = scrape(up.http_port)
        plays = 'castmesh_access_refused_total{action="play"}'
        publishes = 'castmesh_access_refused_total{action="publish"}'
        assert refused[plays] - before.get(plays, 0) == 5 + 2 + 1 + 1
        assert refused[publishes] - before.get(publishes, 0) >= 4
        counts, errors = decode(up.flv("lists"), timeout=40, seconds=2)  # the allowed still play
        assert errors == "" and counts.get(0, 0) >= 50
    finally:
        publisher.kill()
        publisher.wait()
