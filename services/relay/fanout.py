"""The relay's streams: one source in (a publisher, or for an edge the upstream relay), many subscribers
out, each subscriber behind its own queue.

Invariants:
- One publisher per stream in this relay. When a publisher vanishes without unpublishing, the stream
  waits `grace` seconds for a publisher of the same stream; its subscribers stay and continue with the new
  publish session, announced in-band with a new header.
- A subscriber's queue is bounded in time (max_lag), by the lag policy playback viewers follow too
  (castmesh.media.lag): when its oldest item is older than that, the queued frames are dropped and the
  subscriber resumes at the next keyframe (a skip, counted). A subscriber that has taken nothing since its
  last skip when the bound is hit again is ended with REASON_TOO_SLOW.
- The source never waits for a subscriber: offering a batch is a few list operations per subscriber.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from castmesh.media.describe import PictureRate, RateMeter, describe
from castmesh.media.frames import VIDEO, stream_path
from castmesh.media.gop import GopCache
from castmesh.media.lag import LagPolicy, Verdict
from castmesh.mesh.metrics import frame_age_histogram, observe_age
from castmesh.proto.v1.media_pb2 import FrameBatch, StreamHeader, StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd, StreamStats

STREAMS = Gauge("castmesh_relay_streams", "Streams in this relay (published, pulled or in grace)")
SUBSCRIBERS = Gauge("castmesh_relay_subscribers", "Open Relay.Subscribe calls")
FRAMES_IN = Counter("castmesh_relay_frames_in", "Frames received from publishers or upstream")
BYTES_IN = Counter("castmesh_relay_bytes_in", "Media bytes received from publishers or upstream")
FRAMES_OUT = Counter("castmesh_relay_frames_out", "Frames sent to subscribers")
BYTES_OUT = Counter("castmesh_relay_bytes_out", "Media bytes sent to subscribers")
FRAMES_DROPPED = Counter("castmesh_relay_frames_dropped", "Frames a lagging subscriber never got: dropped from "
                         "its queue or passed over until the next keyframe")
QUEUED = Gauge("castmesh_relay_subscriber_queued_bytes", "Media bytes waiting in subscribers' queues")
OLDEST = Gauge("castmesh_relay_subscriber_lag_max_seconds", "Age of the oldest item in any subscriber's queue")
SKIPS = Counter("castmesh_relay_subscriber_skips", "Times a lagging subscriber skipped to a keyframe")
SLOW_DROPS = Counter("castmesh_relay_subscriber_drops", "Subscribers ended for staying behind")
FRAME_AGE = frame_age_histogram("castmesh_relay_frame_age_seconds", "this relay")

Item = FrameBatch | StreamHeader


class Subscriber:
    """One subscription: a channel of a Relay.Subscribe call (an edge's pull, or a playback node's feed).
    Whoever sends for it is told through on_ready when it has something, and collects it with take()."""

    def __init__(self, subscriber_id: str, max_lag: float, on_ready: Callable[[Subscriber], object] = lambda s: None,
                 channel: int = 0) -> None:
        self.id = subscriber_id
        self.channel = channel
        self.max_lag = max_lag
        self.on_ready = on_ready
        self.queue: deque[tuple[float, Item, int]] = deque()  # (when queued, item, its size in bytes)
        self.end: StreamEnd | None = None
        self.lag = LagPolicy(max_lag)
        # Told when the subscriber is dropped for being slow: its call may be parked in a flow-controlled
        # write that never returns, so an end in the queue may never be sent.
        self.on_drop: Callable[[Subscriber], object] = lambda s: None

    @property
    def skips(self) -> int:
        return self.lag.skips

    def offer_header(self, header: StreamHeader) -> None:
        if self.end is None:
            self.queue.append((time.monotonic(), header, header.ByteSize()))
            self.on_ready(self)

    def offer(self, batch: FrameBatch, has_video: bool, size: int) -> None:
        """Queue `batch` (`size` bytes, measured once by the caller for every subscriber)."""
        if self.end is not None:
            return
        now = time.monotonic()
        lag = self.lag
        behind = now - self.queue[0][0] if self.queue else 0.0
        if not lag.skipping and behind <= lag.max_lag:  # flowing and close enough: the policy says go, at once
            self.queue.append((now, batch, size))
            self.on_ready(self)
            return
        # Its queue is all the backlog it has, and a skip empties it: it is always caught up for the policy.
        verdict = lag.check(now, behind, caught_up=True)
        if verdict is Verdict.DROP:
            SLOW_DROPS.inc()
            self.finish(StreamEnd(reason=StreamEnd.REASON_TOO_SLOW,
                                  detail=f"stayed more than {self.max_lag:g}s behind after skipping"))
            self.queue.clear()
            self.on_drop(self)
            return
        if verdict is Verdict.SKIP:
            headers = [item for item in self.queue if isinstance(item[1], StreamHeader)]
            FRAMES_DROPPED.inc(sum(len(item.frames) for _, item, _ in self.queue if isinstance(item, FrameBatch)))
            self.queue.clear()
            self.queue.extend(headers[-1:])  # a session change must still reach the subscriber
            SKIPS.inc()
        start = self.lag.resume_at(batch.frames, has_video, caught_up=True)
        if start is None:
            FRAMES_DROPPED.inc(len(batch.frames))
            return
        if start:
            FRAMES_DROPPED.inc(start)
            batch = FrameBatch(frames=batch.frames[start:])
            size = batch.ByteSize()
        self.queue.append((now, batch, size))
        self.on_ready(self)

    def finish(self, end: StreamEnd) -> None:
        if self.end is None:
            self.end = end
            self.on_ready(self)

    def take(self, budget: int) -> tuple[list[Item], int, StreamEnd | None]:
        """What is queued, in order, up to about `budget` bytes (at least one item), and its size; and the
        end once the queue is drained and the subscription is over."""
        items: list[Item] = []
        size = 0
        while self.queue and (size < budget or not items):
            _, item, item_size = self.queue.popleft()
            items.append(item)
            size += item_size
        if items:
            self.lag.progressed()
        return items, size, (self.end if not self.queue else None)


class RelayStream:
    def __init__(self, key: StreamKey, session_id: str, pulled: bool = False) -> None:
        self.key = key
        self.path = stream_path(key)
        self.session_id = session_id
        self.pulled = pulled
        self.publishing = True
        self.cache = GopCache(key)
        self.subscribers: set[Subscriber] = set()
        self.frames_in = 0
        self.rate = RateMeter()
        self.pictures = PictureRate()  # the stream's frame rate, as it is
        self.since_us = time.time_ns() // 1000
        self.grace_handle: asyncio.TimerHandle | None = None
        self.publisher_trace: dict[str, str] = {}  # the publish session's trace context, for links
        self.ready = asyncio.Event()  # set once the stream has a header (at once unless pulled)
        if not pulled:
            self.ready.set()

    def header(self) -> StreamHeader:
        header = self.cache.header()
        header.session_id = self.session_id
        header.publisher_trace.update(self.publisher_trace)
        return header

    def new_session(self, session_id: str, header: StreamHeader | None = None) -> None:
        """A new publish session (a reconnected publisher), or for a pulled stream a header from upstream:
        start the caches afresh and tell every subscriber in-band."""
        if session_id != self.session_id or header is not None:
            if session_id != self.session_id:
                self.cache = GopCache(self.key)
            self.session_id = session_id
            if header is not None:
                self.cache.apply_header(header)
                self.publisher_trace = dict(header.publisher_trace)
            announced = self.header()
            for sub in self.subscribers:
                sub.offer_header(announced)
        self.publishing = True
        self.ready.set()
        if self.grace_handle is not None:
            self.grace_handle.cancel()
            self.grace_handle = None

    def publish(self, batch: FrameBatch) -> None:
        observe_age(FRAME_AGE, batch.frames)
        self.cache.add_all(batch.frames)
        self.frames_in += len(batch.frames)
        FRAMES_IN.inc(len(batch.frames))
        has_video = self.cache.has_video
        size = batch.ByteSize()
        BYTES_IN.inc(size)
        self.rate.add(size)
        for frame in batch.frames:
            if frame.kind == VIDEO and not frame.sequence_header:
                self.pictures.add(frame.timestamp)
        for sub in self.subscribers:
            sub.offer(batch, has_video, size)

    def subscribe(self, sub: Subscriber, from_gop: bool) -> None:
        """Start `sub` with the header and, from_gop, the GOP cache. A pulled stream that has no header
        yet gives it both with the first header from upstream."""
        if self.ready.is_set():
            sub.offer_header(self.header())
            if from_gop and self.cache.frames:
                gop = FrameBatch(frames=self.cache.frames)
                sub.offer(gop, self.cache.has_video, gop.ByteSize())
        self.subscribers.add(sub)
        SUBSCRIBERS.inc()

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            SUBSCRIBERS.dec()

    def end(self, end: StreamEnd) -> None:
        if self.grace_handle is not None:
            self.grace_handle.cancel()
            self.grace_handle = None
        self.ready.set()
        for sub in self.subscribers:
            sub.finish(end)

    def stats(self) -> StreamStats:
        return StreamStats(stream=self.key, session_id=self.session_id, publishing=self.publishing,
                           pulled=self.pulled, subscribers=sorted(s.id for s in self.subscribers),
                           frames_in=self.frames_in, skips=sum(s.skips for s in self.subscribers),
                           media=describe(self.cache, self.rate.rate(), self.pictures.rate()), since_us=self.since_us)


class StreamTable:
    """The streams of one relay, by vhost/app/name."""

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.streams: dict[str, RelayStream] = {}
        QUEUED.set_function(lambda: sum(size for sub in self._subscribers() for _, _, size in sub.queue))
        OLDEST.set_function(lambda: max((time.monotonic() - sub.queue[0][0] for sub in self._subscribers()
                                         if sub.queue), default=0.0))

    def _subscribers(self) -> list[Subscriber]:
        return [sub for stream in self.streams.values() for sub in stream.subscribers]

    def claim(self, key: StreamKey, session_id: str,
              publisher_trace: dict[str, str] | None = None) -> RelayStream | None:
        """The stream for a new publish; None if someone is publishing it. A stream waiting in grace for
        its publisher is taken over, and its subscribers carry on."""
        path = stream_path(key)
        stream = self.streams.get(path)
        if stream is not None:
            if stream.publishing or stream.pulled:
                return None
            stream.publisher_trace = publisher_trace or {}
            stream.new_session(session_id)
            return stream
        stream = self.streams[path] = RelayStream(key, session_id)
        stream.publisher_trace = publisher_trace or {}
        STREAMS.inc()
        return stream

    def add_pulled(self, key: StreamKey) -> RelayStream:
        stream = self.streams[stream_path(key)] = RelayStream(key, "", pulled=True)
        STREAMS.inc()
        return stream

    def release(self, stream: RelayStream, end: StreamEnd) -> None:
        if self.streams.get(stream.path) is stream:
            del self.streams[stream.path]
            STREAMS.dec()
        stream.end(end)

    def hold(self, stream: RelayStream, on_expiry: Callable[[], None]) -> None:
        """The publisher vanished: keep the stream and its subscribers for `grace` seconds."""
        stream.publishing = False
        if self.grace <= 0:
            on_expiry()
            return
        stream.grace_handle = asyncio.get_running_loop().call_later(self.grace, on_expiry)

    def get(self, key: StreamKey) -> RelayStream | None:
        return self.streams.get(stream_path(key))
