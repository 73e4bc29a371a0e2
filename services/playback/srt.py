"""SRT viewers, playback's side of an SRT port (castmesh.srt.server): callers whose stream id says
m=request (`#!::r=live/cam,m=request`, `read:live/cam`, or a bare `live/cam`) are sent the stream as
MPEG-TS, as ffplay, VLC, OBS and ffmpeg play `srt://`.

A stream's TS is made once per flush for all its SRT viewers (services.playback.formats.MpegTs); each
viewer is a sink of the stream's feed whose transport is its SRT socket. The bytes go out in live-mode
messages of seven TS packets (1316 bytes, what SRT players expect), sent without blocking; what libsrt's
send buffer cannot take now waits in the viewer's own queue, which the feed reads as its backlog, like a
TCP socket's (skip to a keyframe past --max-lag-ms, disconnect past twice that), and which is retried
every RETRY and never holds more than MAX_QUEUE. A viewer whose player goes away or goes silent is
broken by libsrt (its idle timeout) and leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from castmesh.mesh.access import AccessLists, ip_of
from castmesh.mesh.auth import Signer
from castmesh.mesh.logs import event
from castmesh.srt import libsrt as s
from castmesh.srt.poller import Accepted, SrtPoller
from castmesh.srt.streamid import StreamId
from services.playback.formats import MpegTs

if TYPE_CHECKING:
    from services.playback.viewer import Viewer, ViewerSink

log = logging.getLogger("castmesh.playback")

MESSAGE = 7 * 188  # TS packets per SRT message: 1316 bytes
RETRY = 0.01  # seconds between tries to send what libsrt's send buffer had no room for
MAX_QUEUE = 16 << 20  # bytes one viewer may have waiting; past it, it is disconnected

Watch = Callable[[str, str, "ViewerSink", str, dict[str, str], str], None]


class SrtViewers:
    """Playback's SRT side: who may play, and each accepted caller started as a viewer of its stream."""

    def __init__(self, watch: Watch, gone: Callable[[ViewerSink], None], access: AccessLists,
                 signer: Signer) -> None:
        self.watch = watch  # Playback._watch: the on_play hook, then the stream's feed
        self.gone = gone  # Playback._gone
        self.access = access
        self.signer = signer
        self.formats: dict[str, tuple[MpegTs, int]] = {}  # stream path -> its TS and how many viewers use it
        self.viewers: set[SrtViewer] = set()

    def refuse(self, wanted: StreamId, peer: str) -> str:
        return (self.access.refuse("play", wanted.app, ip_of(peer))
                or self.signer.refuse(wanted.app, wanted.name, wanted.query) or "")

    def accepted(self, new: Accepted, wanted: StreamId, poller: SrtPoller) -> None:
        path = f"{wanted.app}/{wanted.name}"
        fmt, users = self.formats.get(path) or (MpegTs(), 0)
        self.formats[path] = (fmt, users + 1)
        viewer = SrtViewer(self, poller, new.sock, new.peer, path, fmt)
        self.viewers.add(viewer)
        poller.watch(new.sock, lambda received: None, viewer.closed)
        self.watch(wanted.app, wanted.name, viewer, "srt", wanted.query, new.peer)

    def left(self, viewer: SrtViewer) -> None:
        self.viewers.discard(viewer)
        fmt, users = self.formats.get(viewer.path, (None, 0))
        if fmt is viewer.format:
            if users > 1:
                self.formats[viewer.path] = (fmt, users - 1)
            else:
                del self.formats[viewer.path]
        self.gone(viewer)

    def close(self) -> None:
        for viewer in list(self.viewers):
            viewer.finish("the node is stopping")


class SrtViewer:
    """One SRT caller playing: a sink of its stream's feed, and its own transport (Output)."""

    def __init__(self, side: SrtViewers, poller: SrtPoller, sock: int, peer: str, path: str, fmt: MpegTs) -> None:
        self.side = side
        self.poller = poller
        self.sock = sock
        self.peer = peer
        self.path = path
        self.format = fmt
        self.viewer: Viewer | None = None
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.retry: asyncio.TimerHandle | None = None
        self.totals = s.Totals(sock)
        self.done = False

    @property
    def transport(self) -> SrtViewer:
        return self

    # The sink --------------------------------------------------------------------------------------------

    def start(self, head: bytes) -> bool:
        if self.done:
            return False
        self.write(head)
        event(log, "viewer.start", peer=self.peer, path=f"/{self.path}", protocol="srt")
        return not self.done

    def refuse(self, status: int, reason: str) -> None:
        self._end(reason)

    def finish(self, reason: str) -> None:
        self._end(reason)

    def discontinuity(self) -> None:
        """Nothing to say: the feed keeps timestamps going, and new tracks come with new tables."""

    def watching(self) -> int:
        return 1

    # The transport -----------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.done:
            return
        view = memoryview(data)
        for at in range(0, len(data), MESSAGE):
            self.queue.append(bytes(view[at:at + MESSAGE]))
        self.queued += len(data)
        self.totals.sample(time.monotonic())
        if self.queued > MAX_QUEUE:
            self._end(f"more than {MAX_QUEUE >> 20} MiB waited to be sent")
            return
        if self.retry is None:
            self._send()

    def get_write_buffer_size(self) -> int:
        return self.queued

    def abort(self) -> None:
        self._end("disconnected")

    def closed(self, reason: str) -> None:
        """libsrt says the connection is gone (the poller has stopped watching it)."""
        self._end(reason)

    def _send(self) -> None:
        self.retry = None
        srt = s.lib()
        queue = self.queue
        while queue:
            chunk = queue[0]
            if srt.srt_sendmsg(self.sock, chunk, len(chunk), -1, 0) < 0:
                code = srt.srt_getlasterror(None)
                srt.srt_clearlasterror()
                if code != s.EASYNCSND:
                    self._end("the connection broke or the player closed it")
                    return
                self.retry = asyncio.get_running_loop().call_later(RETRY, self._send)
                return
            queue.popleft()
            self.queued -= len(chunk)

    def _end(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if self.retry is not None:
            self.retry.cancel()
        self.queue.clear()
        self.queued = 0
        self.poller.forget(self.sock)
        totals = self.totals.final()
        s.lib().srt_close(self.sock)
        event(log, "viewer.stop", peer=self.peer, path=f"/{self.path}", protocol="srt", reason=reason, **totals)
        self.side.left(self)
