"""Load clients for `castmesh bench fanout --protocol rtmp|hls`, next to the HTTP-FLV Viewer in common.

RtmpViewer: a player as ffplay is one, on castmesh's own RTMP client state machine (castmesh.rtmp.client):
plain handshake, connect, createStream, play, then it reads and acknowledges at the server's window.
Sampled ones parse the chunk stream to time video frames (lag); the others only count bytes.

HlsClient: a live HLS player as hls.js is one, on one kept-alive connection: it reloads the playlist
every target duration and fetches every segment it has not fetched yet, starting three segments from
the live edge. What it measures: bytes, requests, errors, and its longest wait between two new segments
(a stall when that is over three target durations), all within the measured window.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import cast

from castmesh.rtmp import chunks
from castmesh.rtmp.client import ClientConnection, PlayStarted
from castmesh.rtmp.connection import MediaReceived
from castmesh_bench.common import Arrivals, Clock


class RtmpViewer(Arrivals, asyncio.Protocol):
    """castmesh's RTMP client state machine as a player. Past the start, an unsampled viewer only counts
    bytes (and acknowledges them), so a thousand of them cost the load generator little."""

    def __init__(self, app: str, name: str, clock: Clock, sampled: bool) -> None:
        self.conn = ClientConnection(app, name, mode="play", tc_url=f"rtmp://127.0.0.1/{app}")
        self.clock = clock
        self.sampled = sampled
        self.playing = False
        self.started = time.monotonic()
        self.first_byte = self.first_video = self.last = self.max_gap = 0.0
        self.bytes = 0
        self.closed = False
        self.video: list[tuple[int, float, bool]] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        now = time.monotonic()
        if self.playing and not self.sampled:
            self.conn.received_unparsed(len(data))
            events = []
        else:
            events = self.conn.receive_data(data)
        self.arrived(now, len(data))
        for ev in events:
            if isinstance(ev, PlayStarted):
                self.playing = True
            elif isinstance(ev, MediaReceived) and ev.kind == chunks.VIDEO and len(ev.payload) > 1:
                if not self.first_video:
                    self.first_video = now
                self.video.append((ev.timestamp, now, ev.payload[:1] in (b"\x17", b"\x91", b"\x93")))
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


async def open_rtmp_viewers(host: str, port: int, app: str, name: str, count: int, clock: Clock, sampled: int,
                            ramp: float = 200, tls: ssl.SSLContext | None = None) -> list[RtmpViewer]:
    """RTMP players, or RTMPS players with `tls` (the same session inside TLS)."""
    loop = asyncio.get_running_loop()
    every = max(1, count // max(1, sampled)) if sampled else 0
    viewers = []
    for i in range(count):
        viewer = RtmpViewer(app, name, clock, sampled=bool(every) and i % every == 0)
        await loop.create_connection(lambda v=viewer: v, host, port, ssl=tls,
                                     server_hostname=host if tls is not None else None)
        viewers.append(viewer)
        await asyncio.sleep(1 / ramp)
    return viewers


class HlsClient:
    def __init__(self, host: str, port: int, playlist: str, clock: Clock) -> None:
        self.host, self.port, self.playlist = host, port, playlist
        self.base = playlist.rsplit("/", 1)[0] + "/"
        self.clock = clock
        self.bytes = self.requests = self.errors = self.segments = 0
        self.max_wait = 0.0
        self.problems: dict[str, int] = {}
        self.fetched: set[str] = set()
        self.closed = False

    async def run(self, until: float) -> None:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.errors += 1
            self.closed = True
            return
        last_new = time.monotonic()
        target = 2.0
        try:
            while time.monotonic() < until:
                status, body = await self._get(reader, writer, self.playlist)
                if status != 200:
                    self._error(f"playlist {status}: {body[:60].decode(errors='replace').strip()}")
                    await asyncio.sleep(1)
                    continue
                text = body.decode()
                for line in text.splitlines():
                    if line.startswith("#EXT-X-TARGETDURATION:"):
                        target = float(line.split(":", 1)[1])
                uris = [line for line in text.splitlines() if line and not line.startswith("#")]
                new = [u for u in (uris if self.fetched else uris[-3:]) if u not in self.fetched]
                for uri in new:
                    status, _ = await self._get(reader, writer, self.base + uri)
                    self.fetched.add(uri)
                    if status != 200:
                        self._error(f"segment {status}")
                        continue
                    self.segments += 1
                now = time.monotonic()
                if new:
                    if self.clock.measuring:
                        self.max_wait = max(self.max_wait, now - last_new)
                    last_new = now
                await asyncio.sleep(target if new else target / 2)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self._error(type(exc).__name__)
        finally:
            self.closed = True
            writer.close()

    def _error(self, what: str) -> None:
        if self.clock.measuring:  # not the 404s once the benchmark's publisher has stopped
            self.errors += 1
            self.problems[what] = self.problems.get(what, 0) + 1

    async def _get(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bytes]:
        status, head, body = await keepalive_get(reader, writer, self.host, path)
        self.requests += 1
        self.bytes += head + len(body)
        return status, body


async def keepalive_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                        path: str) -> tuple[int, int, bytes]:
    """One GET on a kept-alive HTTP/1.1 connection: the status, the head's size and the body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return int(head[9:12]), len(head), await reader.readexactly(length)
