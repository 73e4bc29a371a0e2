"""The ingest's RTMP listener: a thin asyncio adapter around castmesh.rtmp.ServerConnection.

It only moves bytes between the socket and the state machine, decides publishes (by asking the relay,
which knows whether the stream is already live), and forwards frames with RelayPublish. A protocol error
closes that one connection with a log line that says why; nothing else is touched. Plays are refused,
unless the process also runs playback (`castmesh up`): then `play` takes them, and one port serves both.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from prometheus_client import Counter, Gauge

from castmesh.media.frames import make_frame, stream_key, stream_path
from castmesh.mesh import tracing
from castmesh.mesh.auth import Signer
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.hooks import Hooks
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.tracing import SessionSpan
from castmesh.proto.v1.media_pb2 import StreamKey
from castmesh.rtmp.connection import (
    Connected,
    Event,
    MediaReceived,
    PlayFinished,
    PlayRequested,
    PublishFinished,
    PublishRequested,
    RtmpLimits,
    ServerConnection,
)
from castmesh.rtmp.errors import RtmpError
from services.ingest.forward import PublishRefused, RelayPublish
from services.ingest.lease import Lease

log = logging.getLogger("castmesh.ingest")

PUBLISHES = Gauge("castmesh_ingest_publishing", "RTMP publishes being forwarded")
PROTOCOL_ERRORS = Counter("castmesh_ingest_protocol_errors", "RTMP connections closed for a protocol error")
BYTES_IN = Counter("castmesh_ingest_bytes_in", "Bytes received from RTMP publishers")
RELAY_QUEUE = Gauge("castmesh_ingest_relay_queue_batches", "Frame batches waiting to be written to origins, "
                    "all publishes together (reading a publisher pauses past 64 of its own)")

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0  # a publisher sends media many times a second; silence this long is a dead peer
SWEEP_EVERY = 2.0
# Media a client sends before its publish is answered (while the hook and the lease are asked), kept to
# forward once it is: at most this many messages and bytes; the rest is dropped.
MAX_EARLY_FRAMES = 256
MAX_EARLY_BYTES = 4 << 20

_session_ids = itertools.count(1)
# A publish session id must never repeat: downstream nodes drop frames whose sequence they have passed
# within one session, so an ingest restarted with the same node id must not reuse its old session ids.
_RUN = secrets.token_hex(3)

LeaseFactory = Callable[[StreamKey, str, str], Lease]  # (stream, holder, client address) -> lease
# (app, stream name, message stream id, connection, transport, peer) -> what to call when the play ends
PlayRtmp = Callable[[str, str, dict[str, str], int, ServerConnection, asyncio.Transport, str], Callable[[], None]]


class Ingest:
    def __init__(self, leases: LeaseFactory, batch_ms: float = 10.0, limits: RtmpLimits | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 node_id: str = "ingest", signer: Signer | None = None, caps: ConnectionCaps | None = None,
                 hooks: Hooks | None = None) -> None:
        self.leases = leases
        self.hooks = hooks or Hooks()
        self.signer = signer or Signer()
        self.caps = caps or ConnectionCaps("ingest")
        self.links = RelayLinks()
        self.node_id = node_id
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.batch_ms = batch_ms
        self.limits = limits or RtmpLimits()
        self.sessions: set[RtmpSession] = set()
        RELAY_QUEUE.set_function(lambda: sum(s.publish.queue.qsize() for s in self.sessions if s.publish is not None))
        self.play: PlayRtmp | None = None
        self.sweeper: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: RtmpSession(self), host, port, reuse_address=True,
                                              backlog=1024)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (RTMP): {exc.strerror or exc}") from exc
        self.sweeper = loop.create_task(self._sweep())
        return server

    def kick(self, key: StreamKey, reason: str = "") -> int:
        """End the publish of `key` on this node, cleanly: its viewers' responses end, no grace period."""
        path = stream_path(key)
        doomed = [s for s in self.sessions if s.publish is not None and stream_path(s.publish.key) == path]
        for session in doomed:
            session.close(f"kicked: {reason or 'by an administrator'}", clean=True)
        return len(doomed)

    async def _sweep(self) -> None:
        """Close connections that never finish the handshake or go silent (half-open, stuck)."""
        while True:
            await asyncio.sleep(min(SWEEP_EVERY, self.handshake_timeout / 2))
            now = time.monotonic()
            for session in list(self.sessions):
                if not session.conn.handshake.done and now - session.opened > self.handshake_timeout:
                    session.close(f"no complete handshake within {self.handshake_timeout:g}s", level=logging.WARNING)
                elif now - session.last_data > self.idle_timeout and session.stop_play is None:
                    session.close(f"no data for {self.idle_timeout:g}s", level=logging.WARNING)


class RtmpSession(asyncio.Protocol):
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.conn = ServerConnection(ingest.limits)
        self.id = f"{ingest.node_id}/rtmp-{_RUN}-{next(_session_ids)}"
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.app = ""
        self.publish: RelayPublish | None = None
        self.publish_stream_id = 0
        self.early: list[MediaReceived] = []
        self.early_bytes = 0
        self.early_full = False
        self.stop_play: Callable[[], None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.opened = self.last_data = time.monotonic()
        self.closed = False
        self.ip = "?"
        self.trace: SessionSpan | None = None
        self.keyframe_seen = False

    # asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ip = peer[0] if peer else "?"
        refused = self.ingest.caps.admit(self.ip, "rtmp")
        if refused:  # before the handshake RTMP has no way to say why: the log does
            self.closed = True
            self.transport.abort()
            event(log, "rtmp.refused", level=logging.WARNING, peer=self.peer, reason=refused)
            return
        self.ingest.sessions.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        BYTES_IN.inc(len(data))
        self.last_data = time.monotonic()
        try:
            events = self.conn.receive_data(data)
        except RtmpError as exc:
            PROTOCOL_ERRORS.inc()
            self.close(f"protocol error: {type(exc).__name__}: {exc}", level=logging.WARNING)
            return
        out = self.conn.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)
        for ev in events:
            self._handle(ev)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.close("client disconnected" if exc is None else f"connection lost: {exc}")

    # Events ---------------------------------------------------------------------------------------------

    def _handle(self, ev: Event) -> None:
        if isinstance(ev, MediaReceived):
            if self.publish is not None and ev.stream_id == self.publish_stream_id:
                frame = make_frame(ev.kind, ev.timestamp, ev.payload, time.time_ns() // 1000)
                self.publish.push(frame)
                if frame.keyframe and not self.keyframe_seen and self.trace is not None:
                    self.keyframe_seen = True
                    self.trace.event("first keyframe", timestamp=frame.timestamp)
            elif not self.early_full:
                if len(self.early) < MAX_EARLY_FRAMES and self.early_bytes + len(ev.payload) <= MAX_EARLY_BYTES:
                    self.early.append(ev)
                    self.early_bytes += len(ev.payload)
                else:  # keep nothing after a gap: a frame after a dropped one may not decode
                    self.early_full = True
        elif isinstance(ev, Connected):
            self.app = ev.app
            event(log, "rtmp.connect", session=self.id, peer=self.peer, app=ev.app, tc_url=ev.tc_url,
                  handshake="digest" if self.conn.handshake.digest_used else "plain")
        elif isinstance(ev, PublishRequested):
            self._spawn(self._start_publish(ev))
        elif isinstance(ev, PublishFinished):
            if ev.stream_id == self.publish_stream_id and self.publish is not None:
                self._spawn(self._stop_publish("publisher unpublished", clean=True))
        elif isinstance(ev, PlayRequested):
            if self.ingest.play is None or self.stop_play is not None or self.transport is None:
                self.conn.reject_play(ev.stream_id, "this is the RTMP ingest; play from the playback service")
                self._send()
            else:
                self.stop_play = self.ingest.play(self.app, ev.name, ev.query, ev.stream_id, self.conn, self.transport,
                                                  self.peer)
        elif isinstance(ev, PlayFinished):
            if self.stop_play is not None:
                self.close("player stopped")

    async def _start_publish(self, ev: PublishRequested) -> None:
        if self.publish is not None:
            self.conn.reject_publish(ev.stream_id, "this connection is already publishing")
            self._send()
            return
        if not self.app:
            self.conn.reject_publish(ev.stream_id, "connect named no application (rtmp://host/APP/stream)")
            self._send()
            self.close("publish without an application name")
            return
        key = stream_key(self.app, ev.name)
        path = f"{self.app}/{ev.name}"
        refused = self.ingest.signer.refuse(self.app, ev.name, ev.query) or await self.ingest.hooks.ask(
            "on_publish", self._hook_body(ev.name, ev.query))
        if self.closed:
            return
        if refused:
            event(log, "publish.unauthorized", session=self.id, peer=self.peer, stream=path, reason=refused)
            self.conn.reject_publish(ev.stream_id, f"{path}: {refused}", code="NetStream.Publish.Unauthorized")
            self._send()
            self.close(f"publish refused: {refused}")
            return
        lease = self.ingest.leases(key, self.id, self.peer)
        forward = RelayPublish(self.ingest.links, lease, key, self.id, self.peer, self.ingest.batch_ms,
                               self._pause, self._relay_lost)
        # The session's span starts before the lease, so the lease and the origin's spans are its children.
        trace = forward.trace = SessionSpan("rtmp.publish", {
            "castmesh.stream": path, "castmesh.session": self.id, "net.peer": self.peer,
            "castmesh.node": self.ingest.node_id}, counters=lambda: {"frames": forward.sequence,
                                                                     "failovers": forward.failovers})
        try:
            with tracing.current(trace.span):
                await forward.open()
        except PublishRefused as exc:
            trace.end(f"rejected: {exc}")
            forward.abort()
            event(log, "publish.rejected", session=self.id, peer=self.peer, stream=path, reason=str(exc))
            self.conn.reject_publish(ev.stream_id, f"{path}: {exc}")
            self._send()
            self.close(f"publish rejected: {exc}")
            return
        except ConnectionError as exc:
            trace.end(f"relay unreachable: {exc}")
            forward.abort()
            event(log, "publish.failed", level=logging.WARNING, session=self.id, stream=path,
                  reason=f"relay unreachable: {exc}")
            self.conn.reject_publish(ev.stream_id, "relay unavailable", code="NetStream.Publish.Failed")
            self._send()
            self.close("relay unavailable")
            return
        if self.closed:
            trace.end("publisher left while the publish was being set up")
            forward.abort()
            return
        self.publish = forward
        self.publish_stream_id = ev.stream_id
        self.trace = trace
        trace.span.set_attribute("castmesh.origin", forward.origin)
        PUBLISHES.inc()
        self.conn.accept_publish(ev.stream_id)
        self._send()
        event(log, "publish.start", session=self.id, peer=self.peer, stream=path, origin=forward.origin)
        for early in self.early:
            if early.stream_id == ev.stream_id:
                forward.push(make_frame(early.kind, early.timestamp, early.payload))
        self.early.clear()
        self.early_bytes = 0
        self._spawn(forward.watch())

    def _relay_lost(self, reason: str) -> None:
        self.close(reason, level=logging.WARNING)

    async def _stop_publish(self, reason: str, clean: bool) -> None:
        forward, self.publish = self.publish, None
        if forward is not None:
            PUBLISHES.dec()
            await forward.close(clean)
            event(log, "publish.stop", session=self.id, peer=self.peer,
                  stream=f"{self.app}/{forward.key.name}", reason=reason, clean=clean, failovers=forward.failovers)
            self.ingest.hooks.tell("on_unpublish", {**self._hook_body(forward.key.name, {}), "reason": reason})
            if self.trace is not None:
                self.trace.end(reason, clean=int(clean))
                self.trace = None

    def _hook_body(self, name: str, query: dict[str, str]) -> dict[str, Any]:
        return {"app": self.app, "stream": name, "client_ip": self.ip, "client_id": self.id,
                "node": self.ingest.node_id, "protocol": "rtmp", "query": query}

    # Plumbing -------------------------------------------------------------------------------------------

    def _send(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _pause(self, paused: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self, reason: str, level: int = logging.INFO, clean: bool = False) -> None:
        """Close the connection. A publish ends in grace (the publisher may come back) unless `clean`."""
        if self.closed:
            return
        self.closed = True
        self.early.clear()  # now, not when a pending publish's hook or lease answers
        self.early_bytes = 0
        if self.transport is not None:
            self.transport.close()
        self.ingest.sessions.discard(self)
        self.ingest.caps.release(self.ip, "rtmp")
        event(log, "rtmp.close", level=level, session=self.id, peer=self.peer, reason=reason)
        if self.publish is not None:
            self._spawn(self._stop_publish(reason, clean=clean))
        if self.stop_play is not None:
            self.stop_play()
