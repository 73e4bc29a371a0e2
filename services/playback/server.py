"""The playback service: HTTP-FLV and RTMP viewers, served from one shared StreamFeed per stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from castmesh.media.frames import stream_key, stream_path
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.subscription import Locate
from castmesh.rtmp.connection import ServerConnection
from services.playback.feed import StreamFeed, ViewerSink
from services.playback.http import HttpSession
from services.playback.rtmp import RtmpPlayer, RtmpPlaySession


class Playback:
    def __init__(self, locate: Locate, merge_ms: float = 30.0, max_lag: float = 3.0,
                 node_id: str = "playback") -> None:
        self.locate = locate
        self.links = RelayLinks()
        self.node_id = node_id
        self.merge_ms = merge_ms
        self.max_lag = max_lag
        self.feeds: dict[str, StreamFeed] = {}
        self.sessions: dict[ViewerSink, StreamFeed | None] = {}

    async def listen(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(self._session, host, port, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from exc

    async def listen_rtmp(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(lambda: RtmpPlaySession(self.play_rtmp), host, port,
                                            reuse_address=True, backlog=1024)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (RTMP play): {exc.strerror or exc}") from exc

    def play_rtmp(self, app: str, name: str, stream_id: int, conn: ServerConnection, transport: asyncio.Transport,
                  peer: str) -> Callable[[], None]:
        """Start an RTMP play (from this node's RTMP port, or handed over by ingest in `castmesh up`); the
        function to call once the connection is gone."""
        player = RtmpPlayer(conn, transport, stream_id, peer, f"/{app}/{name}")
        if not app:
            player.refuse(404, "connect named no application (rtmp://host/APP/stream)")
            return lambda: None
        self.sessions[player] = None
        self._open_stream(app, name, player)
        return lambda: self._gone(player)

    def _session(self) -> HttpSession:
        session = HttpSession(self._open_stream, self._gone)
        self.sessions[session] = None
        return session

    def _open_stream(self, app: str, name: str, session: ViewerSink) -> None:
        key = stream_key(app, name)
        path = stream_path(key)
        feed = self.feeds.get(path)
        if feed is None or feed.closed:
            feed = self.feeds[path] = StreamFeed(self.locate, self.links, key, self.merge_ms, self.max_lag,
                                                 self._feed_closed, self.node_id)
        self.sessions[session] = feed
        feed.add(session)

    def _gone(self, session: ViewerSink) -> None:
        feed = self.sessions.pop(session, None)
        if feed is not None:
            feed.remove(session)

    def _feed_closed(self, feed: StreamFeed) -> None:
        if self.feeds.get(feed.path) is feed:
            del self.feeds[feed.path]
