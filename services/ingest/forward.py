"""Forwarding one RTMP publish to its origin relay over Relay.Publish, across origin failures.

A video frame is sent at once, as one FrameBatch on this stream's channel of the link to the origin
(castmesh.mesh.link, which carries every stream this ingest sends there, and gathers what arrives while a
write is in flight); the audio and data frames before it ride along in the same batch, waiting batch_ms
at most. A stream without video sends each frame at once. When the relay falls
behind, the queue grows past max_queued batches or max_queued_bytes and the owner is told to pause reading
the publisher's socket: TCP
then slows the publisher instead of ingest buffering without end.

Ingest keeps the stream's header and GOP cache. When the origin dies, the lease names another origin and
the publish continues there under the same session id: first the header and the GOP cache, then live
frames. Downstream nodes see the same session and drop what they already have (castmesh.media.timeline).
The search for another origin lasts FAILOVER_FOR seconds from the failure, however long the stream ran
before, and goes on through a dispatch restart (the lease is claimed again on the new dispatch).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import Counter

from castmesh.media.frames import VIDEO
from castmesh.media.gop import GopCache, header_frames
from castmesh.mesh.channels import Accepted, Rejected
from castmesh.mesh.link import PublishChannel, RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.metrics import FAILOVERS
from castmesh.mesh.retry import RetryWindow
from castmesh.mesh.tracing import SessionSpan
from castmesh.proto.v1.media_pb2 import Frame, FrameBatch, StreamKey
from castmesh.proto.v1.relay_pb2 import PublishOpen
from services.ingest.lease import Lease, LeaseRefused

log = logging.getLogger("castmesh.ingest")

MAX_BATCH_BYTES = 1 << 20
MAX_QUEUED_BYTES = 8 << 20  # media waiting for the origin before reading the publisher pauses
FAILOVER_FOR = 10.0  # seconds from an origin's failure to find another, before the publish is lost
FAILOVER_PAUSE = 0.1
RECLAIM_PAUSE = 0.1  # before the first re-claim; doubling after each failed one, up to RECLAIM_PAUSE_MAX
RECLAIM_PAUSE_MAX = 2.0
ANSWER_TIMEOUT = 5.0

FRAMES_IN = Counter("castmesh_ingest_frames_in", "Audio, video and data frames received from RTMP publishers")


class PublishRefused(Exception):
    pass


class RelayPublish:
    def __init__(self, links: RelayLinks, lease: Lease, key: StreamKey, session_id: str, client_addr: str,
                 batch_ms: float, on_pause: Callable[[bool], None], on_lost: Callable[[str], None],
                 max_queued: int = 64, trace: SessionSpan | None = None,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.links = links
        self.lease = lease
        self.key = key
        self.session_id = session_id
        self.client_addr = client_addr
        self.batch_delay = batch_ms / 1000
        self.on_pause = on_pause
        self.on_lost = on_lost
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self.trace = trace  # the publish session's span: its context goes to the origin with each open
        self.cache = GopCache(key)
        self.pending: list[Frame] = []
        self.pending_bytes = 0
        self.flush_handle: asyncio.TimerHandle | None = None
        self.queue: asyncio.Queue[tuple[list[Frame], int] | None] = asyncio.Queue()  # None: the end
        self.paused = False
        self.origin = ""
        self.channel: PublishChannel | None = None
        self.writer: asyncio.Task[None] | None = None
        self.keeper: asyncio.Task[None] | None = None
        self.closed = False
        self.clean_end = False
        self.failovers = 0
        self.sequence = 0
        self.switched = asyncio.Event()  # set when a new origin channel is in place (or on close)
        self.steady = asyncio.Event()  # clear while a failover looks for an origin (it claims the lease itself)
        self.steady.set()

    async def open(self) -> None:
        """Get the lease and the origin's acceptance; PublishRefused (with the reason) if either says no."""
        try:
            self.origin = await self.lease.acquire()
        except LeaseRefused as exc:
            raise PublishRefused(str(exc)) from exc
        await self._connect(replay=False)
        loop = asyncio.get_running_loop()
        self.writer = loop.create_task(self._write_loop())
        self.keeper = loop.create_task(self._keep_lease())

    async def _connect(self, replay: bool) -> None:
        channel = self.links.publish(self.origin).open(PublishOpen(
            stream=self.key, session_id=self.session_id, client_addr=self.client_addr,
            trace_context=self.trace.carrier() if self.trace is not None else {}))
        answer = await channel.answer(ANSWER_TIMEOUT)
        if not isinstance(answer, Accepted):
            channel.close()
            if isinstance(answer, Rejected):
                raise PublishRefused(f"origin {self.origin}: {answer.detail}")
            raise ConnectionError(f"origin {self.origin}: {channel.lost or 'no answer'}")
        if replay:
            frames = [*header_frames(self.cache.header()), *self.cache.frames]
            if frames:
                channel.batch(FrameBatch(frames=frames), self.cache.size)
        self.channel = channel
        self.switched.set()

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        self.sequence += 1
        frame.sequence = self.sequence
        self.cache.add(frame)
        self.pending.append(frame)
        self.pending_bytes += len(frame.payload)
        if (frame.kind == VIDEO or not self.batch_delay or not self.cache.has_video
                or self.pending_bytes >= MAX_BATCH_BYTES):
            self.flush()  # a picture goes at once, with the audio that waited for it
        elif self.flush_handle is None:  # audio or data of a stream with video: wait for a picture, at most this
            self.flush_handle = asyncio.get_running_loop().call_later(self.batch_delay, self.flush)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if not self.pending:
            return
        self.queue.put_nowait((self.pending, self.pending_bytes))
        self.queued_bytes += self.pending_bytes
        FRAMES_IN.inc(len(self.pending))  # once per batch, not per frame
        self.pending = []
        self.pending_bytes = 0
        if not self.paused and (self.queue.qsize() > self.max_queued or self.queued_bytes > self.max_queued_bytes):
            self.paused = True
            self.on_pause(True)

    async def _write_loop(self) -> None:
        while True:
            queued = await self.queue.get()
            assert self.channel is not None
            if queued is None:
                # Wait until the relay has processed the end, so the stream is free when the lease is.
                self.channel.end(self.clean_end)
                await self.channel.answer(ANSWER_TIMEOUT)
                self.channel.close()
                return
            frames, size = queued
            while size < MAX_BATCH_BYTES and not self.queue.empty():  # what gathered while a write was in flight
                if (more := self.queue.get_nowait()) is None:
                    self.queue.put_nowait(None)
                    break
                frames = frames + more[0]
                size += more[1]
            self.queued_bytes -= size
            if not await self.channel.batch(FrameBatch(frames=frames), size):
                if not await self._failover(self.channel.lost):
                    return
            if (self.paused and self.queue.qsize() <= self.max_queued // 2
                    and self.queued_bytes <= self.max_queued_bytes // 2):
                self.paused = False
                self.on_pause(False)

    async def _failover(self, cause: str) -> bool:
        """The origin failed: publish into another one. False if none took it within FAILOVER_FOR seconds."""
        failed, window = self.origin, RetryWindow(FAILOVER_FOR)
        window.lose()
        avoid = failed  # the origin to name as failed in the next relocate: the last one that did
        if self.channel is not None:
            self.channel.close()
        self.steady.clear()
        attempt = 0
        try:
            while not window.expired() and not self.closed:
                attempt += 1
                try:
                    self.origin = await self.lease.relocate(avoid)
                    # What was queued is in the GOP cache, which the new origin gets first.
                    while not self.queue.empty():
                        if (drained := self.queue.get_nowait()) is None:
                            self.queue.put_nowait(None)
                            break
                        self.queued_bytes -= drained[1]
                    await self._connect(replay=True)
                except (LeaseRefused, PublishRefused, ConnectionError) as error:
                    if isinstance(error, ConnectionError):
                        avoid = self.origin
                    if attempt & (attempt - 1) == 0:  # attempts 1, 2, 4, 8...: a few lines, not one per 0.1 s
                        event(log, "publish.failover_retry", level=logging.WARNING, stream=self.key.name,
                              failed=failed, attempt=attempt, error=str(error))
                    await asyncio.sleep(FAILOVER_PAUSE)
                    continue
                self.failovers += 1
                FAILOVERS.labels("origin").inc()
                if self.trace is not None:
                    self.trace.event("failover", failed=failed, origin=self.origin, cause=cause)
                event(log, "publish.failover", stream=f"{self.key.app}/{self.key.name}", session=self.session_id,
                      failed=failed, origin=self.origin, took_ms=round(window.elapsed() * 1000), cause=cause)
                return True
        finally:
            self.steady.set()
        self.on_lost(f"origin {failed} failed and no other origin took the stream within {FAILOVER_FOR:g}s")
        return False

    async def _keep_lease(self) -> None:
        """If dispatch forgets the lease (it restarted), claim it again where the stream runs now. Attempts
        that fail back off from RECLAIM_PAUSE to RECLAIM_PAUSE_MAX and are logged at 1, 2, 4, 8..."""
        attempt = 0
        while not self.closed:
            await self.lease.lost.wait()
            if self.closed:
                return
            if attempt == 0:
                event(log, "lease.lost", level=logging.WARNING, stream=f"{self.key.app}/{self.key.name}",
                      origin=self.origin)
            await asyncio.sleep(min(RECLAIM_PAUSE * 2 ** attempt, RECLAIM_PAUSE_MAX))
            await self.steady.wait()  # a failover in progress claims the lease itself, for its new origin
            if not self.lease.lost.is_set():
                attempt = 0
                continue
            attempt += 1
            try:
                origin = await self.lease.reclaim(self.origin)
            except LeaseRefused as exc:
                if attempt & (attempt - 1) == 0:
                    event(log, "lease.reclaim_retry", level=logging.WARNING, stream=self.key.name, attempt=attempt,
                          error=str(exc))
                continue
            if origin != self.origin:
                # Dispatch does not know our origin (yet): do not let the directory point elsewhere.
                self.lease.lost.set()
                continue
            attempt = 0
            event(log, "lease.reclaimed", stream=f"{self.key.app}/{self.key.name}", origin=origin)

    async def watch(self) -> None:
        """Notice an origin that dies while nothing is being written (a quiet stream)."""
        while not self.closed and self.channel is not None:
            channel = self.channel
            await channel.done.wait()
            if self.channel is channel and not self.closed:
                self.switched.clear()
                self.queue.put_nowait(([], 0))  # the writer finds the link broken and fails over
                await self.switched.wait()

    async def close(self, clean: bool) -> None:
        """Send what is pending, then end the publish (clean: the publisher unpublished)."""
        if self.closed:
            return
        self.closed = True
        self.switched.set()
        if self.keeper is not None:
            self.keeper.cancel()
        self.clean_end = clean
        self.flush()
        if self.writer is not None:
            self.queue.put_nowait(None)
            try:
                await asyncio.wait_for(self.writer, timeout=5)
            except TimeoutError:
                pass
        if self.channel is not None:
            self.channel.close()
        self.lease.release()

    def abort(self) -> None:
        self.closed = True
        self.switched.set()
        if self.keeper is not None:
            self.keeper.cancel()
        if self.flush_handle is not None:
            self.flush_handle.cancel()
        if self.writer is not None:
            self.writer.cancel()
        if self.channel is not None:
            self.channel.close()  # ends it (not cleanly) if the origin still holds it
        self.lease.release()
