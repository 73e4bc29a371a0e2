"""HLS on a playback node: one muxer per stream and container, a viewer of the stream's StreamFeed like
any other (its sink, taking frames where a socket takes bytes), answering playlist and segment requests
from memory.

A muxer exists only while someone asks for it: the first playlist request starts it (from the feed's GOP
cache, so the first segment begins at once), and it stops after `idle` seconds without a request, which
lets the feed drop its upstream subscription when nobody else watches. A playlist request that arrives
before the first segment is complete waits for it, as long as about three target durations.

Segment names carry the muxer's id, so a name always means the same bytes and segments can be cached.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from castmesh.media.gop import GopCache
from castmesh.media.hls import HlsError, Segmenter
from castmesh.mesh.logs import event
from castmesh.proto.v1.media_pb2 import Frame
from services.playback.formats import HLS_FRAMES, start_frames

if TYPE_CHECKING:
    from services.playback.viewer import Viewer

log = logging.getLogger("castmesh.playback")

MUXERS = Gauge("castmesh_playback_hls_muxers", "HLS muxers running")
SEGMENTS = Counter("castmesh_playback_hls_segments", "HLS segments made")
HLS_REQUESTS = Counter("castmesh_playback_hls_requests", "HLS playlist and segment requests", ["kind"])
CLIENT_WINDOW = 3  # target durations: a client that fetched a playlist within this is counted as watching
MAX_CLIENTS = 100_000  # per muxer: clients remembered for the viewer count (the oldest go first)

Answer = Callable[[int, bytes, str], None]  # status, body, reason


class HlsMuxer:
    def __init__(self, path: str, container: str, target_ms: int, window: int, idle: float,
                 on_stop: Callable[[HlsMuxer], None]) -> None:
        self.id = secrets.token_hex(4)
        self.transport = self  # its output is its own memory, which never falls behind
        self.format = HLS_FRAMES
        self.viewer: Viewer | None = None
        self.path = path
        self.container = container
        self.segmenter = Segmenter(container, target_ms, window)
        self.idle = idle
        self.on_stop = on_stop
        self.waiters: list[Answer] = []
        self.rendered: dict[tuple[str, str], bytes] = {}  # (prefix, suffix) -> the playlist, until it changes
        self.clients: dict[str, float] = {}  # client -> last playlist request, oldest first
        self.last_request = time.monotonic()
        self.stopped = False
        self.ended = ""
        self.end_status = 404
        self.idle_handle = asyncio.get_running_loop().call_later(idle, self._check_idle)
        MUXERS.inc()
        event(log, "hls.start", stream=path, muxer=self.id, container=container)

    # The feed's viewer --------------------------------------------------------------------------------

    def start(self, cache: GopCache) -> bool:
        """The stream is live: what it carries is in `cache`, with the current GOP."""
        self.segmenter.has_video, self.segmenter.has_audio = cache.has_video, cache.has_audio
        self.write(start_frames(cache))
        return not self.stopped

    def write(self, frames: list[Frame]) -> None:
        try:
            done = self.segmenter.push(frames)
        except HlsError as exc:
            self.end(str(exc), 415)
            return
        if done:
            SEGMENTS.inc(len(done))
            self.rendered.clear()  # the playlist only changes when a segment completes
            waiters, self.waiters = self.waiters, []
            for answer in waiters:
                answer(200, b"", "")

    def discontinuity(self) -> None:
        self.segmenter.mark_discontinuity()

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.stop("dropped by its feed")

    def refuse(self, status: int, reason: str) -> None:
        self.end(reason, status)

    def finish(self, reason: str) -> None:
        self.end(reason, 0)

    def end(self, reason: str, status: int) -> None:
        """The stream ended: waiting requests get `status` (404 when it never started); the muxer goes."""
        self.ended, self.end_status = reason, status or 404
        waiters, self.waiters = self.waiters, []
        for answer in waiters:
            answer(self.end_status, b"", reason)
        self.stop(reason)

    # Requests -------------------------------------------------------------------------------------------

    def playlist(self, prefix: str, client: str, answer: Answer, wait: bool = True, suffix: str = "") -> None:
        """Answer with the playlist now, or once the first segment is done."""
        now = self.last_request = time.monotonic()
        self.clients.pop(client, None)
        self.clients[client] = now
        self._forget_clients(now)
        HLS_REQUESTS.labels("playlist").inc()
        body = self.rendered.get((prefix, suffix))
        if body is None:
            body = self.rendered[(prefix, suffix)] = self.segmenter.playlist(prefix, suffix).encode()
        if body:
            answer(200, body, "")
        elif self.ended or self.stopped:
            answer(self.end_status, b"", self.ended or "stream ended")
        elif wait:
            patience = max(10.0, 3 * self.segmenter.target_ms / 1000)

            def ready(status: int, body: bytes, reason: str) -> None:
                timer.cancel()
                if status == 200:
                    self.playlist(prefix, client, answer, wait=False, suffix=suffix)
                else:
                    answer(status, b"", reason)

            def expire() -> None:
                if ready in self.waiters:
                    self.waiters.remove(ready)
                answer(504, b"", f"no complete segment within {patience:g}s")

            timer = asyncio.get_running_loop().call_later(patience, expire)
            self.waiters.append(ready)
        else:
            answer(503, b"", "no segment yet")

    def file(self, name: str) -> tuple[bytes, str] | None:
        """A segment or initialization segment by name, with its Content-Type."""
        self.last_request = time.monotonic()
        HLS_REQUESTS.labels("segment").inc()
        stem, _, extension = name.partition(".")
        if extension == "mp4" and stem.startswith("init-") and stem[5:].isdigit():
            init = self.segmenter.inits.get(int(stem[5:]))
            return (init, "video/mp4") if init is not None else None
        if not stem.isdigit():
            return None
        segment = self.segmenter.segment(int(stem))
        if segment is None or segment.extension != extension:
            return None
        return segment.data, "video/mp2t" if extension == "ts" else "video/mp4"

    def watching(self) -> int:
        self._forget_clients(time.monotonic())
        return len(self.clients)

    def _forget_clients(self, now: float) -> None:
        """Drop clients that stopped asking (every request prunes, so the map holds one window of them)."""
        horizon = now - CLIENT_WINDOW * self.segmenter.target_duration
        clients = self.clients
        while clients:
            oldest = next(iter(clients))
            if clients[oldest] >= horizon and len(clients) <= MAX_CLIENTS:
                break
            del clients[oldest]

    # Stopping -------------------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        quiet = time.monotonic() - self.last_request
        if quiet >= self.idle:
            self.stop(f"no request for {self.idle:g}s")
        else:
            self.idle_handle = asyncio.get_running_loop().call_later(self.idle - quiet, self._check_idle)

    def stop(self, reason: str) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.idle_handle.cancel()
        MUXERS.dec()
        event(log, "hls.stop", stream=self.path, muxer=self.id, reason=reason,
              segments=self.segmenter.next_sequence, dropped_frames=self.segmenter.dropped_frames)
        self.on_stop(self)
