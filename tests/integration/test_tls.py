"""HTTPS on `castmesh up` with a certificate made in the test: HTTP/2 and HTTP/1.1 by ALPN on one port.
ffmpeg plays HTTP-FLV and LL-HLS over it, an HTTP/2 client (httpx) fetches the LL-HLS playlist, a blocking
reload and parts over h2 and streams HTTP-FLV, and WebSocket-FLV works as wss:// (Chromium plays them all
from the player page over HTTPS: tests/integration/test_player_page.py). Bad input over TLS and HTTP/2 (a
failed handshake, one never finished, stream resets, too many streams, oversized headers) closes that one
connection with a reason, never the others."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage
from wsproto.events import Request as WsRequest

from castmesh.mesh.tls import self_signed
from tests.integration.harness import FFMPEG, Up, free_port, publish, start_up, wait_live
from tests.integration.test_llhls import edge_of, hint_of


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, int, Path]]:
    tmp = Path(tmp_path_factory.mktemp("tls"))
    cert, key = self_signed(tmp)
    https = free_port()
    up = start_up(tmp, "--tls-cert", str(cert), "--tls-key", str(key), "--https-port", str(https),
                  "--hls-segment-ms", "1000", "--handshake-timeout-ms", "1500")
    yield up, https, cert
    up.process.stop()


def tls_socket(port: int, alpn: list[str]) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


class H2Client:
    """A bare HTTP/2 client over one TLS socket (h2's client side), for what well-behaved clients never do."""

    def __init__(self, port: int) -> None:
        self.sock = tls_socket(port, ["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.data: dict[int, int] = {}

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def get(self, path: str, extra: list[tuple[str, str]] | None = None, end: bool = True,
            method: str = "GET") -> int:
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, [(":method", method), (":path", path), (":scheme", "https"),
                                        (":authority", "localhost"), *(extra or [])], end_stream=end)
        self.flush()
        return stream

    def read(self, seconds: float) -> list[h2.events.Event]:
        """Events for `seconds`, or until the connection ends."""
        seen: list[h2.events.Event] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                continue
            if not data:
                break
            for ev in self.conn.receive_data(data):
                seen.append(ev)
                if isinstance(ev, h2.events.DataReceived):
                    self.data[ev.stream_id] = self.data.get(ev.stream_id, 0) + len(ev.data)
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            self.flush()
            if any(isinstance(ev, h2.events.ConnectionTerminated) for ev in seen):
                break
        return seen


def test_ffmpeg_httpx_and_websockets_play_over_https(secure: tuple[Up, int, Path]) -> None:
    up, https, cert = secure
    publisher = publish(up.rtmp("tls"), 40, gop=30)
    base = f"https://127.0.0.1:{https}/live"
    try:
        wait_live(up.flv("tls"))
        env = {**os.environ, "SSL_CERT_FILE": str(cert)}  # ffmpeg checks the certificate, also for segments
        for url in (f"{base}/tls.flv", f"{base}/tls.m3u8?format=llhls"):
            result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", url, "-t", "3",
                                     "-f", "framecrc", "-"], capture_output=True, timeout=60, env=env, check=False)
            video = [line for line in result.stdout.decode().splitlines() if line.startswith("0,")]
            assert result.stderr == b"" and len(video) >= 80, (url, result.stderr[-500:])

        with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as client:
            playlist = client.get(f"{base}/tls.m3u8?format=llhls")
            assert playlist.http_version == "HTTP/2" and playlist.status_code == 200
            msn, index = edge_of(playlist.text)
            hinted = hint_of(playlist.text)
            blocked = client.get(f"{base}/tls.m3u8?format=llhls&_HLS_msn={msn}&_HLS_part={index}")
            assert blocked.status_code == 200 and f'URI="{hinted}"' in blocked.text
            part = client.get(f"{base}/{hinted}")
            assert part.http_version == "HTTP/2" and part.status_code == 200 and part.content[4:8] == b"moof"
            assert part.headers["content-type"] == "video/mp4"
            with client.stream("GET", f"{base}/tls.flv") as flv:
                assert flv.http_version == "HTTP/2" and flv.headers["content-type"] == "video/x-flv"
                received = b""
                for chunk in flv.iter_bytes():
                    received += chunk
                    if len(received) > 100_000:
                        break
            assert received[:3] == b"FLV"

        sock = tls_socket(https, ["http/1.1"])  # what browsers do for wss://
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(WsRequest(host="localhost", target="/live/tls.flv")))
        accepted, got, deadline = False, 0, time.monotonic() + 5
        while got < 50_000 and time.monotonic() < deadline:
            ws.receive_data(sock.recv(65536))
            for ev in ws.events():
                accepted |= isinstance(ev, AcceptConnection)
                got += len(ev.data) if isinstance(ev, BytesMessage) else 0
        sock.close()
        assert accepted and got >= 50_000
    finally:
        publisher.kill()
        publisher.wait()


def test_bad_tls_and_http2_input_closes_only_that_connection(secure: tuple[Up, int, Path]) -> None:
    up, https, _ = secure
    publisher = publish(up.rtmp("calm"), 40, gop=30)
    try:
        wait_live(up.flv("calm"))
        viewer = H2Client(https)  # an HTTP-FLV viewer over h2 that must see none of what follows
        flv = viewer.get("/live/calm.flv")
        flowing = {"stop": False}

        def watch() -> None:
            while not flowing["stop"]:
                viewer.read(0.2)

        watching = threading.Thread(target=watch, daemon=True)
        watching.start()
        time.sleep(1)
        before = viewer.data.get(flv, 0)

        garbage = socket.create_connection(("127.0.0.1", https), timeout=5)  # no ClientHello: a failed handshake
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        assert _closed(garbage)

        silent = socket.create_connection(("127.0.0.1", https), timeout=5)  # never starts a handshake
        started = time.monotonic()
        assert _closed(silent, wait=6)
        assert 1.0 < time.monotonic() - started < 5.0  # --handshake-timeout-ms 1500
        failed: list[str] = []
        for _ in range(40):  # the socket closes a moment before the handshake's task logs the reason
            failed = [line for line in up.process.log().splitlines() if "tls.handshake_failed service=playback" in line]
            if len(failed) >= 2:
                break
            time.sleep(0.05)
        assert len(failed) == 2 and "HTTP_REQUEST" in failed[0] and "timeout" in failed[1], failed  # with reasons

        resets = H2Client(https)  # opens and resets streams without end: the rapid-reset flood
        for _ in range(1100):
            stream = resets.get("/live/calm.m3u8?format=llhls")
            resets.conn.reset_stream(stream)
        resets.flush()
        ended = [ev for ev in resets.read(5) if isinstance(ev, h2.events.ConnectionTerminated)]
        assert ended and ended[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, ended

        crowd = H2Client(https)  # more concurrent streams than the 128 it announced
        crowd.conn.remote_settings.max_concurrent_streams = 1000  # ignore what the server said
        for _ in range(130):
            crowd.get("/live/calm/whep", [("content-type", "application/sdp"), ("content-length", "10")],
                      end=False, method="POST")
        ended = [ev for ev in crowd.read(5) if isinstance(ev, h2.events.ConnectionTerminated)]
        assert ended, "too many streams were let in"

        big = H2Client(https)  # a 20 KiB header list, over the 16 KiB it announced
        big.conn.remote_settings.max_header_list_size = 1 << 20
        big.get("/live/calm.flv", [("x-padding", "p" * 20_000)])
        ended = [ev for ev in big.read(5) if isinstance(ev, h2.events.ConnectionTerminated)]
        assert ended and ended[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, ended

        time.sleep(1)
        after = viewer.data.get(flv, 0)
        flowing["stop"] = True
        watching.join(5)
        assert after - before > 100_000, (before, after)  # about 2 s of the stream reached the viewer
        fresh = httpx.get(f"https://127.0.0.1:{https}/live/calm.m3u8", verify=False, timeout=10)
        assert fresh.status_code == 200
        assert up.process.proc.poll() is None
    finally:
        publisher.kill()
        publisher.wait()


def _closed(sock: socket.socket, wait: float = 5.0) -> bool:
    """Whether the server closes `sock` within `wait` seconds."""
    sock.settimeout(wait)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, OSError):
        return False
    return True
