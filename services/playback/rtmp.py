"""The playback node's RTMP front: rtmp://host/{app}/{stream} for ffplay, VLC, OBS media sources, ffmpeg.

RtmpPlayer is one play as a viewer of the stream's feed: the feed writes the stream's shared RTMP
messages (castmesh.rtmp.play) straight to its socket. RtmpPlaySession is the thin asyncio adapter around
castmesh.rtmp.ServerConnection for this node's own RTMP port; it refuses publishes (they go to ingest).
In `castmesh up` the ingest's listener hands its plays to Playback.play_rtmp instead, so one port serves
both publish and play.

A player sends almost nothing once it plays, so silence is no sign of a dead peer here: a viewer that
stops reading is found by the feed, as the age of its unsent bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.logs import event
from castmesh.rtmp.connection import (
    Connected,
    PlayFinished,
    PlayRequested,
    PublishRequested,
    RtmpLimits,
    ServerConnection,
)
from castmesh.rtmp.errors import RtmpError
from services.playback.formats import OutputFormat, RtmpPlay

log = logging.getLogger("castmesh.playback")

SETUP_TIMEOUT = 10.0  # from connecting to asking for a stream

# (app, stream name, query, message stream id, connection, transport, peer) -> what to call when the play ends
PlayRtmp = Callable[[str, str, dict[str, str], int, ServerConnection, asyncio.Transport, str], Callable[[], None]]


class RtmpPlayer:
    def __init__(self, conn: ServerConnection, transport: asyncio.Transport, stream_id: int, peer: str,
                 path: str) -> None:
        self.conn = conn
        self.transport = transport
        self.stream_id = stream_id
        self.peer = peer
        self.path = path
        self.format: OutputFormat = RtmpPlay(stream_id)
        self.done = False

    def start(self, head: bytes) -> bool:
        if self.done or self.transport.is_closing():
            return False
        self.conn.accept_play(self.stream_id)
        self.transport.write(self.conn.data_to_send() + head)
        event(log, "viewer.start", peer=self.peer, path=self.path, protocol="rtmp")
        return True

    def refuse(self, status: int, reason: str) -> None:
        self._end(lambda: self.conn.reject_play(self.stream_id, reason), reason)

    def finish(self, reason: str) -> None:
        self._end(lambda: self.conn.end_play(self.stream_id), reason)

    def _end(self, tell: Callable[[], None], reason: str) -> None:
        if self.done:
            return
        self.done = True
        if not self.transport.is_closing():
            tell()
            self.transport.write(self.conn.data_to_send())
            self.transport.close()  # after what is buffered: players wait for more otherwise
        event(log, "viewer.stop", peer=self.peer, path=self.path, protocol="rtmp", reason=reason)


class RtmpPlaySession(asyncio.Protocol):
    def __init__(self, play: PlayRtmp, limits: RtmpLimits | None = None, caps: ConnectionCaps | None = None,
                 setup_timeout: float = SETUP_TIMEOUT) -> None:
        self.play = play
        self.setup_timeout = setup_timeout
        self.caps = caps
        self.ip = ""
        self.conn = ServerConnection(limits or RtmpLimits())
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = "?"
        self.app = ""
        self.stop_play: Callable[[], None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.caps is not None:
            refused = self.caps.admit(peer[0] if peer else "?", "rtmp")
            if refused:  # before the handshake RTMP has no way to say why: the log does
                self.closed = True
                self.transport.abort()
                event(log, "rtmp.refused", level=logging.WARNING, peer=self.peer, reason=refused)
                return
            self.ip = peer[0] if peer else "?"
        self.timer = asyncio.get_running_loop().call_later(self.setup_timeout, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except RtmpError as exc:
            self.close(f"protocol error: {type(exc).__name__}: {exc}", level=logging.WARNING)
            return
        self._send()
        for ev in events:
            if isinstance(ev, Connected):
                self.app = ev.app
            elif isinstance(ev, PlayRequested) and self.stop_play is None:
                if self.timer is not None:
                    self.timer.cancel()
                self.stop_play = self.play(self.app, ev.name, ev.query, ev.stream_id, self.conn, self.transport,
                                           self.peer)
            elif isinstance(ev, PublishRequested):
                self.conn.reject_publish(ev.stream_id, "this is a playback node; publish to the ingest")
                self._send()
                self.close("publish on a playback node")
            elif isinstance(ev, PlayFinished):
                self.close("player stopped")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("client disconnected" if exc is None else f"connection lost: {exc}")

    def _timeout(self) -> None:
        if self.stop_play is None:
            self.close(f"no play within {self.setup_timeout:g}s", level=logging.WARNING)

    def _send(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def close(self, reason: str, level: int = logging.INFO) -> None:
        if self.closed:
            return
        self.closed = True
        if self.caps is not None and self.ip:
            self.caps.release(self.ip, "rtmp")
            self.ip = ""
        if self.timer is not None:
            self.timer.cancel()
        if self.stop_play is not None:
            self.stop_play()
        self.transport.close()
        event(log, "rtmp.close", level=level, peer=self.peer, reason=reason)
