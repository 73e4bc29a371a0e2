"""RTMP play on a playback node: rtmp://host/{app}/{stream} for ffplay, VLC, OBS media sources, ffmpeg.

RtmpPlayer is one play as a viewer of the stream's feed: the feed writes the stream's shared RTMP
messages (castmesh.rtmp.play) straight to its socket; the start, refusal and end go through the RTMP
adapter (castmesh.mesh.rtmp_server), the connection's one owner. The same adapter serves this node's own
RTMP port (plays only) and, in `castmesh up`, the one port for publish and play.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from castmesh.mesh.logs import event
from castmesh.mesh.rtmp_server import RtmpPlay
from services.playback.formats import OutputFormat
from services.playback.formats import RtmpPlay as RtmpPlayFormat

if TYPE_CHECKING:
    from services.playback.viewer import Viewer

log = logging.getLogger("castmesh.playback")


class RtmpPlayer:
    """One RTMP play as a viewer of its stream's feed, on a connection the RTMP adapter owns."""

    def __init__(self, play: RtmpPlay, peer: str, path: str) -> None:
        self.play = play
        self.transport = play.transport
        self.peer = peer
        self.path = path
        self.format: OutputFormat = RtmpPlayFormat(play.stream_id)
        self.viewer: Viewer | None = None
        self.done = False

    def start(self, head: bytes) -> bool:
        if self.done or not self.play.start(head):
            return False
        event(log, "viewer.start", peer=self.peer, path=self.path, protocol="rtmp")
        return True

    def refuse(self, status: int, reason: str) -> None:
        self._end(lambda: self.play.refuse(reason), reason)

    def finish(self, reason: str) -> None:
        self._end(self.play.end, reason)

    def discontinuity(self) -> None:
        """RTMP carries on across a new upstream or publish session: the feed keeps its timestamps going."""

    def watching(self) -> int:
        return 1

    def _end(self, tell: Callable[[], None], reason: str) -> None:
        if self.done:
            return
        self.done = True
        tell()
        event(log, "viewer.stop", peer=self.peer, path=self.path, protocol="rtmp", reason=reason)
