"""One stream on one playback node: a single upstream Relay.Subscribe, shared by all of its viewers.

Serialize once, write many: frames from upstream are gathered for merge_ms, turned into each format's
bytes once (HTTP-FLV chunks, RTMP messages: services.playback.formats), and the same bytes object is
written to every viewer of that format (SRS's merged writes). The feed keeps its own GOP cache, filled
at flush time so that it always matches what viewers have been sent: a viewer joining between flushes
gets the cache, then the next flush, with no duplicate.

Each viewer's backlog is measured in time: the age of the oldest byte still in its transport buffer.
Past max_lag the viewer stops receiving, and once its buffer drains it resumes at the next keyframe
(a skip). If it does not drain within another max_lag it is disconnected. So a stuck viewer holds at most
about max_lag of data and costs the others nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

from prometheus_client import Counter, Gauge

from castmesh.media.frames import stream_path
from castmesh.media.gop import GopCache, is_resume_point
from castmesh.media.timeline import Jitter
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.metrics import frame_age_histogram, observe_age
from castmesh.mesh.subscription import Locate, UpstreamSubscription
from castmesh.mesh.tracing import SessionSpan
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader, StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd
from services.playback.formats import OutputFormat

log = logging.getLogger("castmesh.playback")

VIEWERS = Gauge("castmesh_playback_viewers", "Viewers by protocol (HLS: clients that fetched lately)", ["protocol"])
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


class ViewerSink(Protocol):
    """What a feed needs from a viewer's connection (an HTTP-FLV session, an RTMP player)."""

    transport: asyncio.Transport
    format: OutputFormat

    def start(self, body: bytes) -> bool: ...
    def refuse(self, status: int, reason: str) -> None: ...
    def finish(self, reason: str) -> None: ...


class FrameTap(Protocol):
    """Something that consumes a stream's frames without a socket of its own (an HLS muxer)."""

    def begin(self, cache: GopCache) -> None:
        """The stream is live: what it carries is in `cache`, with the current GOP."""

    def frames(self, frames: list[Frame]) -> None: ...

    def discontinuity(self) -> None:
        """What follows comes from a new upstream or a new publish session."""

    def end(self, reason: str, status: int) -> None: ...


class ViewerState:
    """Per-viewer delivery bookkeeping: how far behind the socket is, and whether it is skipping."""

    __slots__ = ("behind_since", "marks", "sink", "skipping", "skips", "written")

    def __init__(self, sink: ViewerSink) -> None:
        self.sink = sink
        self.written = 0
        self.marks: deque[tuple[float, int]] = deque()  # (when, total bytes written after that write)
        self.skipping = False
        self.behind_since = 0.0
        self.skips = 0

    def lag(self, now: float) -> float:
        """Age of the oldest byte not yet handed to the kernel."""
        unsent = self.sink.transport.get_write_buffer_size()
        if unsent == 0:
            self.marks.clear()
            return 0.0
        oldest = self.written - unsent
        marks = self.marks
        while len(marks) > 1 and marks[0][1] <= oldest:
            marks.popleft()
        return now - marks[0][0] if marks else 0.0

    def write(self, data: bytes, now: float) -> None:
        self.sink.transport.write(data)
        self.written += len(data)
        if self.sink.transport.get_write_buffer_size():
            self.marks.append((now, self.written))


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
        self.viewers: dict[ViewerSink, ViewerState] = {}
        self.waiting: list[ViewerSink] = []
        self.taps: list[FrameTap] = []
        self.pending: list[Frame] = []
        self.flush_handle: asyncio.TimerHandle | None = None
        self.last_flush = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.close_reason = ""
        self.jitter = Jitter()
        self.publisher_trace: dict[str, str] = {}
        self.traces: dict[ViewerSink, SessionSpan] = {}  # viewers' session spans, waiting ones included
        self.subscription = UpstreamSubscription(key, locate, links, f"{node_id}:{self.path}",
                                                 self._on_header, self._on_frames, span_name="playback.feed")
        self.task = asyncio.get_running_loop().create_task(self._run())
        FEEDS.inc()

    # Viewers --------------------------------------------------------------------------------------------

    def add(self, sink: ViewerSink, trace: SessionSpan | None = None) -> None:
        if trace is not None:
            self.traces[sink] = trace
            trace.link(self.subscription.trace.carrier(), "feed")
            trace.link(self.publisher_trace, "publisher")
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if self.live:
            self._start(sink)
        else:
            self.waiting.append(sink)

    def remove(self, sink: ViewerSink) -> None:
        self.traces.pop(sink, None)
        if self.viewers.pop(sink, None) is not None:
            VIEWERS.labels(sink.format.protocol).dec()
        if sink in self.waiting:
            self.waiting.remove(sink)
        self._linger()

    def viewer_counters(self, sink: ViewerSink) -> dict[str, int]:
        """What one viewer has been sent so far (for its session span), read only when asked."""
        state = self.viewers.get(sink)
        return {"bytes": state.written, "skips": state.skips} if state is not None else {}

    def add_tap(self, tap: FrameTap) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.taps.append(tap)
        if self.live:
            tap.begin(self.cache)

    def remove_tap(self, tap: FrameTap) -> None:
        if tap in self.taps:
            self.taps.remove(tap)
        self._linger()

    def _linger(self) -> None:
        if not self.viewers and not self.waiting and not self.taps and not self.closed and self.idle_handle is None:
            self.idle_handle = asyncio.get_running_loop().call_later(
                IDLE_LINGER, self.close, "no viewers left")

    def _start(self, sink: ViewerSink) -> None:
        if sink.start(sink.format.head(self.cache)):
            self.viewers[sink] = ViewerState(sink)
            VIEWERS.labels(sink.format.protocol).inc()

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
        if self.live and self.taps:
            self.flush()  # what came before belongs before the discontinuity
            for tap in self.taps:
                tap.discontinuity()
        self.publisher_trace = dict(header.publisher_trace)
        for trace in self.traces.values():
            trace.link(self.publisher_trace, "publisher")
            if self.live:  # a new publish session, or the same one from another upstream
                trace.event("republish" if new_timeline else "failover", session=header.session_id)
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
        for sink in waiting:
            self._start(sink)
        for tap in self.taps:
            tap.begin(self.cache)
        event(log, "feed.start", stream=self.path, viewers=len(self.viewers))

    def _on_frames(self, frames: list[Frame]) -> None:
        observe_age(FRAME_AGE, frames)
        before = self.jitter.corrections
        for frame in frames:
            self.jitter.apply(frame)
        if self.jitter.corrections != before:
            JITTER.inc(self.jitter.corrections - before)
        self.pending.extend(frames)
        if self.flush_handle is None:
            delay = self.last_flush + self.merge - time.monotonic()
            if delay <= 0:
                self.flush()
            else:
                self.flush_handle = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        frames, self.pending = self.pending, []
        if not frames:
            return
        now = time.monotonic()
        self.last_flush = now
        self.cache.add_all(frames)
        if self.live:
            for tap in self.taps:
                tap.frames(frames)
        encoded: dict[Hashable, bytes] = {}  # per format: these frames, made once
        resumed: dict[Hashable, bytes] = {}  # per format: from the first resume point on
        resume_at: int | None = -1
        delivered = sent = 0
        for state in list(self.viewers.values()):
            fmt = state.sink.format
            if state.skipping:
                if state.sink.transport.get_write_buffer_size():
                    if now - state.behind_since > self.max_lag:
                        DROPS.inc()
                        self._drop(state, f"stayed more than {2 * self.max_lag:g}s behind")
                    continue
                if resume_at == -1:
                    resume_at = self._resume_point(frames)
                if resume_at is not None:
                    data = resumed.get(fmt.key)
                    if data is None:
                        data = resumed[fmt.key] = fmt.body(frames[resume_at:])
                    state.skipping = False
                    state.write(data, now)
                    delivered += len(data)
                    sent += len(frames) - resume_at
                continue
            if state.lag(now) > self.max_lag:
                state.skipping = True
                state.behind_since = now
                state.skips += 1
                SKIPS.inc()
                self._tell(state.sink, "skip to keyframe", lag_ms=round(state.lag(now) * 1000))
                continue
            data = encoded.get(fmt.key)
            if data is None:
                data = encoded[fmt.key] = fmt.body(frames)
            state.write(data, now)
            delivered += len(data)
            sent += len(frames)
        BYTES_OUT.inc(delivered)
        FRAMES_OUT.inc(sent)
        FRAMES_DROPPED.inc(max(0, len(frames) * len(self.viewers) - sent))
        if not self.live:
            self._go_live()  # after the writes: the waiting viewers get these frames from the cache

    def _tell(self, sink: ViewerSink, moment: str, **attributes: str | int) -> None:
        """A key moment of one viewer's session, as an event on its span (if it has one)."""
        trace = self.traces.get(sink)
        if trace is not None:
            trace.event(moment, **attributes)

    def _resume_point(self, frames: list[Frame]) -> int | None:
        has_video = self.cache.has_video
        return next((i for i, frame in enumerate(frames) if is_resume_point(frame, has_video)), None)

    def _drop(self, state: ViewerState, reason: str) -> None:
        self.viewers.pop(state.sink, None)
        VIEWERS.labels(state.sink.format.protocol).dec()
        event(log, "viewer.drop", stream=self.path, reason=reason, skips=state.skips)
        self._tell(state.sink, "disconnect", reason=reason)
        state.sink.transport.abort()

    # Ending ---------------------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.task.cancel()

    def _finish(self, reason: str, status: int) -> None:
        self.closed = True
        if self.flush_handle is not None:
            self.flush_handle.cancel()
        if self.pending:
            self.flush()
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        for sink in self.waiting:
            sink.refuse(status or 404, reason)
        for sink in list(self.viewers):
            self._tell(sink, "disconnect", reason=reason)
            sink.finish(reason)
        for tap in list(self.taps):
            tap.end(reason, 0 if self.live else status or 404)
        self.taps.clear()
        for sink in self.viewers:
            VIEWERS.labels(sink.format.protocol).dec()
        self.viewers.clear()
        self.waiting.clear()
        self.traces.clear()
        FEEDS.dec()
        event(log, "feed.stop", stream=self.path, reason=reason, switches=self.subscription.switches,
              repeats_dropped=self.subscription.continuity.dropped, timestamp_fixes=self.jitter.corrections)
        self.on_closed(self)
