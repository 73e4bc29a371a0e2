"""One RTMP port for publish and play: the thin asyncio adapter around castmesh.rtmp.ServerConnection.

It is the only owner of each connection and of its state machine: it moves bytes between the socket and
ServerConnection, hands each publish to the node's publish side (castmesh.mesh.sessions.Publishes: ingest)
and each play to its play side (RtmpPlays: playback) as an RtmpPlay, through which alone the play side
answers. A node that runs both (`castmesh up`) gives both, so one port serves both; a side it lacks is
refused with the reason. A protocol error closes that one connection with a log line that says why;
nothing else is touched.

Timeouts, checked by one sweep per listener: no complete handshake within handshake_timeout; no data for
idle_timeout unless playing (a player sends nothing once it plays: a viewer that stops reading is found by
its feed, as the age of its unsent bytes); with setup_timeout (a play-only port), no play within it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

from prometheus_client import Counter

from castmesh.media.frames import make_frame
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.logs import event
from castmesh.mesh.sessions import Publish, Publishes, Refused, StreamRequest
from castmesh.mesh.tls import serve_tls
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

log = logging.getLogger("castmesh.rtmp")

SWEEP_EVERY = 2.0
# How each kind of refusal (castmesh.mesh.sessions.Refused) is said in RTMP.
REFUSAL_CODES = {"unauthorized": "NetStream.Publish.Unauthorized", "unavailable": "NetStream.Publish.Failed",
                 "rejected": "NetStream.Publish.BadName"}

_connections = itertools.count(1)


class RtmpPlay:
    """A play on one connection, as the adapter lends it to the play side: the transport, for the media
    bytes its feed writes, and start, refuse and end, which the adapter turns into RTMP's answers."""

    def __init__(self, session: RtmpServerSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.transport = session.transport

    def start(self, head: bytes) -> bool:
        """Answer the play as started, then `head` (the stream's first messages); False if it is gone."""
        if self.transport.is_closing():
            return False
        self.session.conn.accept_play(self.stream_id)
        self.transport.write(self.session.conn.data_to_send() + head)
        return True

    def refuse(self, reason: str) -> None:
        self._last_words(lambda: self.session.conn.reject_play(self.stream_id, reason))

    def end(self) -> None:
        self._last_words(lambda: self.session.conn.end_play(self.stream_id))

    def _last_words(self, say: Callable[[], None]) -> None:
        if not self.transport.is_closing():
            say()
            self.transport.write(self.session.conn.data_to_send())
            self.transport.close()  # after what is buffered: players wait for more otherwise


class RtmpPlays(Protocol):
    """The node's play side (playback)."""

    def play_rtmp(self, request: StreamRequest, play: RtmpPlay) -> Callable[[], None]:
        """Start a play; the function to call once its connection is gone."""
        ...


class RtmpServer:
    def __init__(self, publishes: Publishes | None, plays: RtmpPlays | None, limits: RtmpLimits | None = None,
                 caps: ConnectionCaps | None = None, handshake_timeout: float = 10.0, idle_timeout: float = 30.0,
                 setup_timeout: float | None = None, node_id: str = "ingest", bytes_in: Counter | None = None,
                 protocol_errors: Counter | None = None) -> None:
        self.publishes = publishes
        self.plays = plays
        self.limits = limits or RtmpLimits()
        self.caps = caps
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.setup_timeout = setup_timeout
        self.node_id = node_id
        self.bytes_in = bytes_in
        self.protocol_errors = protocol_errors
        self.connections: set[RtmpServerSession] = set()
        self.sweeper: asyncio.Task[None] | None = None
        self.servers: list[asyncio.Server] = []  # the plain port, and the TLS one if there is one

    async def listen(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: RtmpServerSession(self), host, port, reuse_address=True,
                                              backlog=1024)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (RTMP): {exc.strerror or exc}") from exc
        return self._sweeping(server)

    async def listen_tls(self, host: str, port: int, context: ssl.SSLContext, service: str) -> asyncio.Server:
        """RTMPS: the same sessions inside TLS (the handshake within handshake_timeout, then RTMP's)."""
        server = await serve_tls(host, port, context, lambda alpn: RtmpServerSession(self), self.handshake_timeout,
                                 service, "RTMPS")
        return self._sweeping(server)

    def _sweeping(self, server: asyncio.Server) -> asyncio.Server:
        self.servers.append(server)
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return server

    async def _sweep(self) -> None:
        """Close connections that never finish the handshake, never play, or go silent (half-open, stuck)."""
        every = min(SWEEP_EVERY, self.handshake_timeout / 2, *([self.setup_timeout / 2] if self.setup_timeout else []))
        while any(server.is_serving() for server in self.servers) or self.connections:
            await asyncio.sleep(every)
            now = time.monotonic()
            for session in list(self.connections):
                if not session.conn.handshake.done and now - session.opened > self.handshake_timeout:
                    session.close(f"no complete handshake within {self.handshake_timeout:g}s", level=logging.WARNING)
                elif (self.setup_timeout is not None and session.play is None and session.publish is None
                      and now - session.opened > self.setup_timeout):
                    session.close(f"no play within {self.setup_timeout:g}s", level=logging.WARNING)
                elif now - session.last_data > self.idle_timeout and session.play is None:
                    session.close(f"no data for {self.idle_timeout:g}s", level=logging.WARNING)


class RtmpServerSession(asyncio.Protocol):
    def __init__(self, server: RtmpServer) -> None:
        self.server = server
        self.conn = ServerConnection(server.limits)
        self.id = f"{server.node_id}/rtmp-conn-{next(_connections)}"
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = "?"
        self.ip = ""  # set once counted against the caps
        self.app = ""
        self.publish: Publish | None = None
        self.publish_stream_id = 0
        self.play: RtmpPlay | None = None
        self.stop_play: Callable[[], None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.opened = self.last_data = time.monotonic()
        self.closed = False

    # asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.server.caps is not None:
            ip = peer[0] if peer else "?"
            refused = self.server.caps.admit(ip, "rtmp")
            if refused:  # before the handshake RTMP has no way to say why: the log does
                self.closed = True
                self.transport.abort()
                event(log, "rtmp.refused", level=logging.WARNING, peer=self.peer, reason=refused)
                return
            self.ip = ip
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.server.bytes_in is not None:
            self.server.bytes_in.inc(len(data))
        self.last_data = time.monotonic()
        try:
            events = self.conn.receive_data(data)
        except RtmpError as exc:
            if self.server.protocol_errors is not None:
                self.server.protocol_errors.inc()
            self.close(f"protocol error: {type(exc).__name__}: {exc}", level=logging.WARNING)
            return
        self._send()
        for ev in events:
            self._handle(ev)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.close("client disconnected" if exc is None else f"connection lost: {exc}")

    # Events ---------------------------------------------------------------------------------------------

    def _handle(self, ev: Event) -> None:
        if isinstance(ev, MediaReceived):
            if self.publish is not None and ev.stream_id == self.publish_stream_id:
                self.publish.push(make_frame(ev.kind, ev.timestamp, ev.payload, time.time_ns() // 1000))
        elif isinstance(ev, Connected):
            self.app = ev.app
            event(log, "rtmp.connect", connection=self.id, peer=self.peer, app=ev.app, tc_url=ev.tc_url,
                  handshake="digest" if self.conn.handshake.digest_used else "plain")
        elif isinstance(ev, PublishRequested):
            self._publish(ev)
        elif isinstance(ev, PublishFinished):
            if ev.stream_id == self.publish_stream_id and self.publish is not None:
                # Before its answer too: the publisher gave up waiting, and gets no answer (the stream may
                # be gone from the connection already).
                publish, self.publish = self.publish, None
                publish.end("publisher unpublished", clean=True)
        elif isinstance(ev, PlayRequested):
            self._play(ev)
        elif isinstance(ev, PlayFinished):
            if self.stop_play is not None:
                self.close("player stopped")

    def _publish(self, ev: PublishRequested) -> None:
        if self.server.publishes is None:
            self.conn.reject_publish(ev.stream_id, "this is a playback node; publish to the ingest")
            self._send()
            self.close("publish on a playback node")
            return
        if self.publish is not None or self.play is not None:
            self.conn.reject_publish(ev.stream_id, "this connection is already publishing or playing")
            self._send()
            return
        request = StreamRequest(self.app, ev.name, ev.query, self.peer, "rtmp")
        self.publish = self.server.publishes.publish(request, self._pause, self._stopped)
        self.publish_stream_id = ev.stream_id
        self._spawn(self._start(self.publish, ev.stream_id))

    async def _start(self, publish: Publish, stream_id: int) -> None:
        try:
            await publish.start()
        except Refused as exc:
            if self.closed or self.publish is not publish:
                return  # the publisher left or unpublished while it was asked for
            self.publish = None
            self.conn.reject_publish(stream_id, exc.reason, code=REFUSAL_CODES.get(exc.kind, REFUSAL_CODES["rejected"]))
            self._send()
            self.close(f"publish {exc.kind}: {exc.reason}")
            return
        if self.closed or self.publish is not publish:
            return
        self.conn.accept_publish(stream_id)
        self._send()

    def _play(self, ev: PlayRequested) -> None:
        if self.server.plays is None or self.play is not None or self.publish is not None:
            self.conn.reject_play(ev.stream_id, "this is the RTMP ingest; play from the playback service"
                                  if self.server.plays is None else "this connection is already busy")
            self._send()
            return
        self.play = RtmpPlay(self, ev.stream_id)
        self.stop_play = self.server.plays.play_rtmp(StreamRequest(self.app, ev.name, ev.query, self.peer, "rtmp"),
                                                     self.play)

    def _stopped(self, reason: str) -> None:
        """The publish side ended the publish (kicked, or its stream was lost): the connection goes too."""
        self.close(reason, level=logging.WARNING if "kicked" not in reason else logging.INFO)

    # Plumbing -------------------------------------------------------------------------------------------

    def _send(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def _pause(self, paused: bool) -> None:
        if self.transport.is_closing():
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self, reason: str, level: int = logging.INFO) -> None:
        """Close the connection. A publish on it ends in grace (the publisher may come back)."""
        if self.closed:
            return
        self.closed = True
        self.transport.close()
        self.server.connections.discard(self)
        if self.server.caps is not None and self.ip:
            self.server.caps.release(self.ip, "rtmp")
        event(log, "rtmp.close", level=level, connection=self.id, peer=self.peer, reason=reason,
              session=self.publish.id if self.publish is not None else "")
        if self.publish is not None:
            self.publish.end(reason, clean=False)  # a publish still being asked for is dropped
        if self.stop_play is not None:
            self.stop_play()
