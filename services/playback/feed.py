"""One stream on one playback node: a single upstream Relay.Subscribe, shared by all of its viewers.

Serialize once, write many: frames from upstream are gathered for merge_ms, turned into each format's
bytes once (HTTP-FLV chunks, RTMP messages: services.playback.formats), and the same bytes object is
written to every viewer of that format (SRS's merged writes). An HLS muxer is a viewer too, one per
container, that takes the frames themselves (services.playback.hls). The feed keeps its own GOP cache, filled
at flush time so that it always matches what viewers have been sent: a viewer joining between flushes
gets the cache, then the next flush, with no duplicate.

Each viewer's backlog is measured in time: the age of the oldest byte still in its transport buffer.
Past max_lag the viewer stops receiving, and once its buffer drains it resumes at the next keyframe
(a skip). If it does not drain within another max_lag it is disconnected (castmesh.media.lag, the policy
relay subscribers follow too). So a stuck viewer holds at most about max_lag of data and costs the others
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable
from typing import Any

from prometheus_client import Counter, Gauge

from castmesh.media.frames import VIDEO, stream_path
from castmesh.media.gop import GopCache
from castmesh.media.lag import Verdict
from castmesh.media.timeline import Jitter
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.metrics import frame_age_histogram, observe_age
from castmesh.mesh.subscription import Locate, UpstreamSubscription
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader, StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd
from services.playback.viewer import Viewer

log = logging.getLogger("castmesh.playback")

FRAMES_OUT = Counter("castmesh_playback_frames_out", "Frames written to viewers")
FRAMES_DROPPED = Counter("castmesh_playback_frames_dropped", "Frames lagging viewers never got (while they skipped)")
FEEDS = Gauge("castmesh_playback_streams", "Streams with an upstream subscription on this node")
BYTES_OUT = Counter("castmesh_playback_bytes_out", "Media bytes written to viewers")
SKIPS = Counter("castmesh_playback_viewer_skips", "Times a lagging viewer skipped to a keyframe")
DROPS = Counter("castmesh_playback_viewer_drops", "Viewers disconnected for staying behind")
FRAME_AGE = frame_age_histogram("castmesh_playback_frame_age_seconds", "this playback node")
BUFFERED = Gauge("castmesh_playback_viewer_buffered_bytes", "Bytes written to viewers' sockets that the kernel "
                 "has not taken yet: the viewers' queues, all together")
JITTER = Counter("castmesh_playback_timestamp_corrections", "Timestamps normalised (backwards or jumping)")

IDLE_LINGER = 5.0  # keep an upstream subscription this long after its last viewer leaves


class WriteLoad:
    """How much of this process's time the feeds' writes to viewers take lately, and so how long a picture
    may wait to be written with the next ones.

    A write to a socket costs about the same whatever its size (perf, 1000 viewers of a 2 Mbps stream on
    loopback: copying the bytes is a tenth of the time, the rest is per write), so writing each picture at
    once costs 30 writes a second per viewer where gathering 50 ms costs 20, a third more CPU. While the
    writes take less than LOW of the time, every picture goes out at once; from LOW to HIGH the window
    grows to the merge window, so a large fan-out trades latency for CPU instead of taking more of the
    core (docs/BENCHMARKS.md: 500 viewers of one stream are written each picture at once, 1000 mostly
    gathered).
    """

    LOW, HIGH = 0.25, 0.35
    TAU = 1.0  # seconds: the share is an average over about this long

    def __init__(self) -> None:
        self.share = 0.0
        self.at = 0.0

    def spent(self, busy: float, end: float) -> None:
        """`busy` seconds of this thread's CPU (user and kernel) went into writes that ended at `end`
        (time.monotonic). CPU time, not wall time: a machine that stalls the process mid-write (another
        process, a hypervisor's steal) must not read as writes costing more and make pictures wait."""
        self.share = self.share * math.exp(min(0.0, self.at - end) / self.TAU) + busy / self.TAU
        self.at = end

    def current(self) -> float:
        return self.share * math.exp(min(0.0, self.at - time.monotonic()) / self.TAU)

    def window(self, merge: float) -> float:
        """The least time between two writes of one stream, at most merge."""
        return merge * min(1.0, max(0.0, (self.current() - self.LOW) / (self.HIGH - self.LOW)))


WRITES = WriteLoad()
Gauge("castmesh_playback_write_share", "Share of this process's time spent writing to viewers lately (about "
      "1 s); past 0.25 pictures are gathered for longer, up to --merge-ms at 0.35").set_function(WRITES.current)


class StreamFeed:
    def __init__(self, locate: Locate, links: RelayLinks, key: StreamKey, merge_ms: float, max_lag: float,
                 on_closed: Callable[[StreamFeed], None], node_id: str = "playback") -> None:
        self.key = key
        self.path = stream_path(key)
        self.merge = merge_ms / 1000
        self.max_lag = max_lag
        self.on_closed = on_closed
        self.cache = GopCache(key)
        self.live = False
        self.closed = False
        self.viewers: dict[Viewer, None] = {}  # an ordered set: the viewers being sent the stream
        self.waiting: list[Viewer] = []  # admitted before the stream is live
        self.pending: list[Frame] = []
        self.flush_handle: asyncio.Handle | None = None  # the next write of what is pending
        self.flush_at = 0.0  # when it is due (time.monotonic)
        self.last_flush = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.close_reason = ""
        self.jitter = Jitter()
        self.publisher_trace: dict[str, str] = {}
        self.subscription = UpstreamSubscription(key, locate, links, f"{node_id}:{self.path}",
                                                 self._on_header, self._on_frames, span_name="playback.feed")
        self.task = asyncio.get_running_loop().create_task(self._run())
        FEEDS.inc()

    # Viewers --------------------------------------------------------------------------------------------

    def add(self, viewer: Viewer) -> None:
        if viewer.span is not None:
            viewer.span.link(self.subscription.trace.carrier(), "feed")
            viewer.span.link(self.publisher_trace, "publisher")
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if self.live:
            self._start(viewer)
        else:
            self.waiting.append(viewer)

    def remove(self, viewer: Viewer) -> None:
        self.viewers.pop(viewer, None)
        if viewer in self.waiting:
            self.waiting.remove(viewer)
        if not self.viewers and not self.waiting and not self.closed and self.idle_handle is None:
            self.idle_handle = asyncio.get_running_loop().call_later(
                IDLE_LINGER, self.close, "no viewers left")

    def _start(self, viewer: Viewer) -> None:
        sink = viewer.sink
        if sink.start(sink.format.head(self.cache)):
            self.viewers[viewer] = None

    # Upstream -------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        reason, status = "upstream ended", 0
        try:
            end = await self.subscription.run()
            reason = end.detail or StreamEnd.Reason.Name(end.reason)
            status = 404 if end.reason == StreamEnd.REASON_NOT_FOUND else 0
        except asyncio.CancelledError:
            reason = "cancelled"
        finally:
            self._finish(self.close_reason or reason, status)

    def _on_header(self, header: StreamHeader, new_timeline: bool) -> None:
        if self.live and self.viewers:
            self.flush()  # what came before belongs before the discontinuity
            for viewer in self.viewers:
                viewer.sink.discontinuity()
        self.publisher_trace = dict(header.publisher_trace)
        for viewer in (*self.viewers, *self.waiting):
            if viewer.span is not None:
                viewer.span.link(self.publisher_trace, "publisher")
                if self.live:  # a new publish session, or the same one from another upstream
                    viewer.span.event("republish" if new_timeline else "failover", session=header.session_id)
        self.cache.apply_header(header)
        if not self.live:
            self._go_live()
        elif new_timeline:
            event(log, "feed.new_timeline", stream=self.path, session=header.session_id)

    def _go_live(self) -> None:
        """Start the waiting viewers, once the stream says what it carries: a header from a publisher that
        has only just connected is empty, and an FLV header must name its tracks up front."""
        cache = self.cache
        if cache.metadata is None and cache.video_config is None and cache.audio_config is None and not cache.frames:
            return
        self.live = True
        waiting, self.waiting = self.waiting, []
        for viewer in waiting:
            self._start(viewer)
        event(log, "feed.start", stream=self.path, viewers=len(self.viewers))

    def _on_frames(self, frames: list[Frame]) -> None:
        observe_age(FRAME_AGE, frames)
        before = self.jitter.corrections
        for frame in frames:
            self.jitter.apply(frame)
        if self.jitter.corrections != before:
            JITTER.inc(self.jitter.corrections - before)
        self.pending.extend(frames)
        if not self.merge:
            self.flush()  # every frame at once
            return
        now = time.monotonic()
        if not self.cache.has_video or any(frame.kind == VIDEO for frame in frames):
            # A picture goes out at once, with whatever waited for it (so does everything of a stream with no
            # video), unless the writes keep the loop busy: then it may wait the window WRITES says.
            due = max(now, self.last_flush + WRITES.window(self.merge))
        else:
            due = now + self.merge  # audio or data: it rides along with the next picture, or waits merge
        if self.flush_handle is not None:
            if self.flush_at <= due:
                return
            self.flush_handle.cancel()
        loop = asyncio.get_running_loop()
        self.flush_at = due  # batches arriving together (one upstream message) still go out in one write
        self.flush_handle = loop.call_soon(self.flush) if due <= now else loop.call_at(
            loop.time() + due - now, self.flush)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        frames, self.pending = self.pending, []
        if not frames:
            return
        now = self.last_flush = time.monotonic()
        cpu = time.thread_time()
        self.cache.add_all(frames)
        encoded: dict[Hashable, tuple[Any, int]] = {}  # per format: these frames, made once, and their size
        resumed: dict[tuple[Hashable, int], tuple[Any, int]] = {}  # per format and resume point: from there on
        has_video = self.cache.has_video
        max_lag = self.max_lag
        delivered = sent = 0
        for viewer in list(self.viewers):
            behind = viewer.behind(now)
            lag = viewer.lag
            fmt = viewer.sink.format
            if not lag.skipping and behind <= max_lag:  # flowing and close enough: the policy says go, at once
                made = encoded.get(fmt.key)
                if made is None:
                    body = fmt.body(frames)
                    made = encoded[fmt.key] = (body, fmt.size(body))
                data, size = made
                viewer.write(data, size, now)
                delivered += size
                sent += len(frames)
                continue
            if behind == 0.0:
                lag.progressed()  # its socket drained
            verdict = lag.check(now, behind, caught_up=behind == 0.0)
            if verdict is Verdict.DROP:
                DROPS.inc()
                self._drop(viewer, f"stayed more than {2 * max_lag:g}s behind")
                continue
            if verdict is Verdict.SKIP:  # the bytes its socket holds cannot be taken back: it waits for them
                SKIPS.inc()
                viewer.moment("skip to keyframe", lag_ms=round(behind * 1000))
            start = lag.resume_at(frames, has_video, caught_up=behind == 0.0)
            if start is None:
                continue
            made = resumed.get((fmt.key, start))
            if made is None:
                body = fmt.body(frames, start)
                made = resumed[(fmt.key, start)] = (body, fmt.size(body))
            data, size = made
            viewer.write(data, size, now)
            delivered += size
            sent += len(frames) - start
        BYTES_OUT.inc(delivered)
        FRAMES_OUT.inc(sent)
        FRAMES_DROPPED.inc(max(0, len(frames) * len(self.viewers) - sent))
        WRITES.spent(time.thread_time() - cpu, time.monotonic())
        if not self.live:
            self._go_live()  # after the writes: the waiting viewers get these frames from the cache

    def _drop(self, viewer: Viewer, reason: str) -> None:
        self.viewers.pop(viewer, None)
        event(log, "viewer.drop", stream=self.path, reason=reason, skips=viewer.lag.skips)
        viewer.moment("disconnect", reason=reason)
        viewer.sink.transport.abort()

    # Ending ---------------------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.task.cancel()

    def _finish(self, reason: str, status: int) -> None:
        self.closed = True
        if self.pending:
            self.flush()
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        waiting, self.waiting = self.waiting, []  # (a refused sink may remove its viewer from it: an HLS muxer)
        for viewer in waiting:
            viewer.sink.refuse(status or 404, reason)
        for viewer in list(self.viewers):
            viewer.moment("disconnect", reason=reason)
            viewer.sink.finish(reason)
        self.viewers.clear()
        self.waiting.clear()
        FEEDS.dec()
        event(log, "feed.stop", stream=self.path, reason=reason, switches=self.subscription.switches,
              repeats_dropped=self.subscription.continuity.dropped, timestamp_fixes=self.jitter.corrections)
        self.on_closed(self)
