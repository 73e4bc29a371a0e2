"""Ingest's publish sessions, whatever protocol brings the stream (castmesh.mesh.sessions): RTMP is the
first adapter (castmesh.mesh.rtmp_server), WHIP, SRT and pulled sources will be the next, and they need
nothing else.

A PublishSession asks for the stream (a signed URL, the on_publish hook, the lease: one publisher per stream
cluster-wide, and the origin's acceptance), then forwards its frames with RelayPublish (batching, GOP cache,
failover to another origin), and ends with the on_unpublish hook. Frames a source sends before its publish
is answered are kept, at most MAX_EARLY_FRAMES and MAX_EARLY_BYTES, and freed as soon as the session ends.
Each session is a span (`{protocol}.publish`) with one log line per event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter, Gauge

from castmesh.media.frames import stream_key, stream_path
from castmesh.mesh import tracing
from castmesh.mesh.access import AccessLists
from castmesh.mesh.auth import Signer
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.hooks import Hooks
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.rtmp_server import RtmpPlays, RtmpServer
from castmesh.mesh.sessions import Refused, StreamRequest
from castmesh.mesh.tracing import SessionSpan
from castmesh.proto.v1.media_pb2 import Frame, StreamKey
from castmesh.rtmp.connection import RtmpLimits
from services.ingest.forward import PublishRefused, RelayPublish
from services.ingest.lease import Lease

log = logging.getLogger("castmesh.ingest")

PUBLISHES = Gauge("castmesh_ingest_publishing", "Publishes being forwarded")
BYTES_IN = Counter("castmesh_ingest_bytes_in", "Bytes received on ingest's RTMP port")
PROTOCOL_ERRORS = Counter("castmesh_ingest_protocol_errors", "RTMP connections to ingest closed for a protocol error")
RELAY_QUEUE = Gauge("castmesh_ingest_relay_queue_batches", "Frame batches waiting to be written to origins, "
                    "all publishes together (reading a publisher pauses past 64 of its own)")

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0  # a publisher sends media many times a second; silence this long is a dead peer
# Media a source sends before its publish is answered (while the hook and the lease are asked), kept to
# forward once it is: at most this many frames and bytes; the rest is dropped.
MAX_EARLY_FRAMES = 256
MAX_EARLY_BYTES = 4 << 20

_session_ids = itertools.count(1)
# A publish session id must never repeat: downstream nodes drop frames whose sequence they have passed
# within one session, so an ingest restarted with the same node id must not reuse its old session ids.
_RUN = secrets.token_hex(3)

LeaseFactory = Callable[[StreamKey, str, str], Lease]  # (stream, holder, client address) -> lease


class Ingest:
    """The node's publish side: it makes the publish sessions and knows the live ones (for kicks)."""

    def __init__(self, leases: LeaseFactory, batch_ms: float = 50.0, limits: RtmpLimits | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 node_id: str = "ingest", signer: Signer | None = None, caps: ConnectionCaps | None = None,
                 hooks: Hooks | None = None, access: AccessLists | None = None) -> None:
        self.leases = leases
        self.hooks = hooks or Hooks()
        self.signer = signer or Signer()
        self.access = access or AccessLists()
        self.caps = caps or ConnectionCaps("ingest")
        self.links = RelayLinks()
        self.node_id = node_id
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.batch_ms = batch_ms
        self.limits = limits or RtmpLimits()
        self.sessions: set[PublishSession] = set()
        RELAY_QUEUE.set_function(lambda: sum(s.forward.queue.qsize() for s in self.sessions if s.forward is not None))

    def rtmp(self, plays: RtmpPlays | None = None) -> RtmpServer:
        """This node's RTMP listener: publishes come here; plays go to `plays` (a playback in the same
        process), or are refused."""
        return RtmpServer(self, plays, self.limits, self.caps, self.handshake_timeout, self.idle_timeout,
                          node_id=self.node_id, bytes_in=BYTES_IN, protocol_errors=PROTOCOL_ERRORS)

    async def listen(self, host: str, port: int) -> asyncio.Server:
        return await self.rtmp().listen(host, port)

    def publish(self, request: StreamRequest, pause: Callable[[bool], None],
                stop: Callable[[str], None]) -> PublishSession:
        return PublishSession(self, request, pause, stop)

    def kick(self, key: StreamKey, reason: str = "") -> int:
        """End the publish of `key` on this node, cleanly: its viewers' responses end, no grace period."""
        path = stream_path(key)
        doomed = [s for s in self.sessions if s.forward is not None and stream_path(s.key) == path]
        for session in doomed:
            session.kick(f"kicked: {reason or 'by an administrator'}")
        return len(doomed)


class PublishSession:
    def __init__(self, ingest: Ingest, request: StreamRequest, pause: Callable[[bool], None],
                 stop: Callable[[str], None]) -> None:
        self.ingest = ingest
        self.request = request
        self.pause = pause
        self.stop = stop
        self.id = f"{ingest.node_id}/{request.protocol}-{_RUN}-{next(_session_ids)}"
        self.key = stream_key(request.app, request.name)
        self.path = f"{request.app}/{request.name}"
        self.forward: RelayPublish | None = None  # once accepted
        self.trace: SessionSpan | None = None
        self.early: list[Frame] = []
        self.early_bytes = 0
        self.early_full = False
        self.keyframe_seen = False
        self.ended = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        request = self.request
        if not request.app:
            raise Refused("rejected", "connect named no application (rtmp://host/APP/stream)"
                          if request.protocol == "rtmp" else "no application named")
        refused = (self.ingest.access.refuse("publish", request.app, request.ip, request.headers)
                   or self.ingest.signer.refuse(request.app, request.name, request.query)
                   or await self.ingest.hooks.ask("on_publish", self._hook_body()))
        if self.ended:
            raise Refused("rejected", "the publisher left while its publish was being asked for")
        if refused:
            event(log, "publish.unauthorized", session=self.id, peer=request.peer, stream=self.path, reason=refused)
            raise Refused("unauthorized", f"{self.path}: {refused}")
        lease = self.ingest.leases(self.key, self.id, request.peer)
        forward = RelayPublish(self.ingest.links, lease, self.key, self.id, request.peer, self.ingest.batch_ms,
                               self.pause, self._lost)
        # The session's span starts before the lease, so the lease and the origin's spans are its children.
        trace = forward.trace = SessionSpan(f"{request.protocol}.publish", {
            "castmesh.stream": self.path, "castmesh.session": self.id, "net.peer": request.peer,
            "castmesh.node": self.ingest.node_id}, counters=lambda: {"frames": forward.sequence,
                                                                     "failovers": forward.failovers})
        try:
            with tracing.current(trace.span):
                await forward.open()
        except PublishRefused as exc:
            trace.end(f"rejected: {exc}")
            forward.abort()
            event(log, "publish.rejected", session=self.id, peer=request.peer, stream=self.path, reason=str(exc))
            raise Refused("rejected", f"{self.path}: {exc}") from None
        except ConnectionError as exc:
            trace.end(f"relay unreachable: {exc}")
            forward.abort()
            event(log, "publish.failed", level=logging.WARNING, session=self.id, stream=self.path,
                  reason=f"relay unreachable: {exc}")
            raise Refused("unavailable", "relay unavailable") from None
        if self.ended:
            trace.end("publisher left while the publish was being set up")
            forward.abort()
            raise Refused("rejected", "the publisher left while its publish was being set up")
        self.forward, self.trace = forward, trace
        self.ingest.sessions.add(self)
        trace.span.set_attribute("castmesh.origin", forward.origin)
        PUBLISHES.inc()
        event(log, "publish.start", session=self.id, peer=request.peer, stream=self.path, origin=forward.origin)
        for frame in self.early:
            forward.push(frame)
        self._free_early()
        self._spawn(forward.watch())

    def push(self, frame: Frame) -> None:
        if self.forward is not None:
            self.forward.push(frame)
            if frame.keyframe and not self.keyframe_seen and self.trace is not None:
                self.keyframe_seen = True
                self.trace.event("first keyframe", timestamp=frame.timestamp)
        elif not self.early_full and not self.ended:
            if len(self.early) < MAX_EARLY_FRAMES and self.early_bytes + len(frame.payload) <= MAX_EARLY_BYTES:
                self.early.append(frame)
                self.early_bytes += len(frame.payload)
            else:  # keep nothing after a gap: a frame after a dropped one may not decode
                self.early_full = True

    def end(self, reason: str, clean: bool) -> None:
        """The source is gone or unpublished; the publish ends (in grace unless `clean`)."""
        if self.ended:
            return
        self.ended = True
        self._free_early()  # now, not when a pending publish's hook or lease answers
        if self.forward is not None:
            self._spawn(self._stop(reason, clean))

    def kick(self, reason: str) -> None:
        self.end(reason, clean=True)
        self.stop(reason)

    def _lost(self, reason: str) -> None:
        self.end(reason, clean=False)
        self.stop(reason)

    async def _stop(self, reason: str, clean: bool) -> None:
        forward = self.forward
        assert forward is not None
        self.ingest.sessions.discard(self)
        PUBLISHES.dec()
        await forward.close(clean)
        event(log, "publish.stop", session=self.id, peer=self.request.peer, stream=self.path, reason=reason,
              clean=clean, failovers=forward.failovers)
        self.ingest.hooks.tell("on_unpublish", {**self._hook_body(), "reason": reason})
        if self.trace is not None:
            self.trace.end(reason, clean=int(clean))
            self.trace = None

    def _free_early(self) -> None:
        self.early = []
        self.early_bytes = 0

    def _hook_body(self) -> dict[str, Any]:
        request = self.request
        return {"app": request.app, "stream": request.name, "client_ip": request.ip, "client_id": self.id,
                "node": self.ingest.node_id, "protocol": request.protocol, "query": request.query}

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
