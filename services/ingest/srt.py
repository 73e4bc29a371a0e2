"""SRT publishers, ingest's side of an SRT port (castmesh.srt.server): callers whose stream id says
m=publish (or names no mode, on an ingest-only port) send MPEG-TS, which becomes the same frames, in the
same publish session (lease, one publisher per stream, hooks, failover), as an RTMP publish's.
"""

from __future__ import annotations

import asyncio
import logging
import time

from castmesh.media.elementary import TsFrames
from castmesh.media.frames import make_frame
from castmesh.mesh.access import ip_of
from castmesh.mesh.logs import event
from castmesh.mesh.sessions import Publish, Refused, StreamRequest
from castmesh.srt import libsrt as s
from castmesh.srt.poller import Accepted, SrtPoller
from castmesh.srt.streamid import StreamId
from services.ingest.session import Ingest

log = logging.getLogger("castmesh.ingest")

MAX_EARLY = 4 << 20  # TS bytes kept while a publish is being asked for


class SrtIngest:
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.publishers: set[SrtPublisher] = set()

    def refuse(self, wanted: StreamId, peer: str) -> str:
        return (self.ingest.access.refuse("publish", wanted.app, ip_of(peer))
                or self.ingest.signer.refuse(wanted.app, wanted.name, wanted.query) or "")

    def accepted(self, new: Accepted, wanted: StreamId, poller: SrtPoller) -> None:
        request = StreamRequest(wanted.app, wanted.name, wanted.query, new.peer, "srt")
        publisher = SrtPublisher(self, poller, new.sock, request)
        self.publishers.add(publisher)
        publisher.begin()

    def close(self) -> None:
        for publisher in list(self.publishers):
            publisher.stop("the node is stopping")


class SrtPublisher:
    """One SRT caller publishing: its TS into frames, pushed into its publish session."""

    def __init__(self, owner: SrtIngest, poller: SrtPoller, sock: int, request: StreamRequest) -> None:
        self.owner = owner
        self.poller = poller
        self.sock = sock
        self.request = request
        self.frames = TsFrames(encoder="castmesh SRT")
        self.publish: Publish = owner.ingest.publish(request, pause=lambda paused: None, stop=self.stop)
        self.started = False
        self.early = 0
        self.ended = False
        self.task: asyncio.Task[None] | None = None
        self.totals = s.Totals(sock)

    def begin(self) -> None:
        self.poller.watch(self.sock, self._data, self.stop)
        self.task = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        try:
            await self.publish.start()
        except Refused as exc:
            self.stop(f"refused: {exc.reason}", publish_end=False)
            return
        self.started = True
        event(log, "srt.publish", session=self.publish.id, peer=self.request.peer,
              stream=f"{self.request.app}/{self.request.name}")

    def _data(self, data: bytes) -> None:
        if self.ended:
            return
        self.totals.sample(time.monotonic())
        if not self.started:
            self.early += len(data)
            if self.early > MAX_EARLY:
                return  # the publish is slow to be granted: what it will miss is the start of the stream
        for kind, ms, payload in self.frames.feed(data):
            self.publish.push(make_frame(kind, ms, payload))

    def stop(self, reason: str, publish_end: bool = True) -> None:
        """End this caller: its socket closed, its publish ended (the stream waits in grace for it: SRT
        callers on bad links come back)."""
        if self.ended:
            return
        self.ended = True
        self.owner.publishers.discard(self)
        self.poller.forget(self.sock)
        totals = self.totals.final()
        s.lib().srt_close(self.sock)
        if publish_end:
            self.publish.end(reason, clean=False)
        event(log, "srt.end", session=self.publish.id, peer=self.request.peer,
              stream=f"{self.request.app}/{self.request.name}", reason=reason, ts_errors=self.frames.errors, **totals)
