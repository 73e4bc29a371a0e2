"""The relay's streams: one publisher in, many subscribers out, each subscriber behind its own queue.

Invariants:
- One publisher per stream in this relay; a second publish of a live stream is refused.
- A subscriber's queue is bounded in time (max_lag): when its oldest batch is older than that, the queue
  is dropped and the subscriber resumes at the next keyframe (counted as a skip). A subscriber that has not
  taken anything since its last skip when the bound is hit again is ended with REASON_TOO_SLOW.
- The publisher never waits for a subscriber: offering a batch is a few list operations per subscriber.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import Counter, Gauge

from castmesh.media.frames import stream_path
from castmesh.media.gop import GopCache, is_resume_point
from castmesh.proto.v1.media_pb2 import FrameBatch, StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd

STREAMS = Gauge("castmesh_relay_streams", "Streams being published into this relay")
SUBSCRIBERS = Gauge("castmesh_relay_subscribers", "Open Relay.Subscribe calls")
FRAMES_IN = Counter("castmesh_relay_frames_in", "Frames received from publishers")
SKIPS = Counter("castmesh_relay_subscriber_skips", "Times a lagging subscriber skipped to a keyframe")
SLOW_DROPS = Counter("castmesh_relay_subscriber_drops", "Subscribers ended for staying behind")


class Subscriber:
    def __init__(self, subscriber_id: str, max_lag: float) -> None:
        self.id = subscriber_id
        self.max_lag = max_lag
        self.queue: deque[tuple[float, FrameBatch]] = deque()
        self.wake = asyncio.Event()
        self.end: StreamEnd | None = None
        self.skipping = False
        self.took_since_skip = True
        self.skips = 0

    def offer(self, batch: FrameBatch, has_video: bool) -> None:
        if self.end is not None:
            return
        now = time.monotonic()
        if self.queue and now - self.queue[0][0] > self.max_lag:
            if not self.took_since_skip:
                SLOW_DROPS.inc()
                self.finish(StreamEnd(reason=StreamEnd.REASON_TOO_SLOW,
                                      detail=f"stayed more than {self.max_lag:g}s behind after skipping"))
                return
            self.queue.clear()
            self.skipping = True
            self.took_since_skip = False
            self.skips += 1
            SKIPS.inc()
        if self.skipping:
            frames = batch.frames
            start = next((i for i, f in enumerate(frames) if is_resume_point(f, has_video)), None)
            if start is None:
                return
            self.skipping = False
            batch = FrameBatch(frames=frames[start:]) if start else batch
        self.queue.append((now, batch))
        self.wake.set()

    def finish(self, end: StreamEnd) -> None:
        if self.end is None:
            self.end = end
            self.wake.set()

    async def next(self) -> FrameBatch | StreamEnd:
        """Everything queued, merged into one batch; or the end once the queue is drained."""
        while not self.queue:
            if self.end is not None:
                return self.end
            self.wake.clear()
            await self.wake.wait()
        self.took_since_skip = True
        if len(self.queue) == 1:
            return self.queue.popleft()[1]
        merged = FrameBatch()
        while self.queue:
            merged.frames.extend(self.queue.popleft()[1].frames)
        return merged


class RelayStream:
    def __init__(self, key: StreamKey, session_id: str) -> None:
        self.key = key
        self.path = stream_path(key)
        self.session_id = session_id
        self.cache = GopCache(key)
        self.subscribers: set[Subscriber] = set()

    def publish(self, batch: FrameBatch) -> None:
        self.cache.add_all(batch.frames)
        FRAMES_IN.inc(len(batch.frames))
        has_video = self.cache.has_video
        for sub in self.subscribers:
            sub.offer(batch, has_video)

    def subscribe(self, subscriber_id: str, max_lag: float, from_gop: bool) -> Subscriber:
        sub = Subscriber(subscriber_id, max_lag)
        if from_gop and self.cache.frames:
            sub.offer(FrameBatch(frames=self.cache.frames), self.cache.has_video)
        self.subscribers.add(sub)
        SUBSCRIBERS.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            SUBSCRIBERS.dec()

    def end(self, end: StreamEnd) -> None:
        for sub in self.subscribers:
            sub.finish(end)


class StreamTable:
    """The streams of one relay, by vhost/app/name."""

    def __init__(self) -> None:
        self.streams: dict[str, RelayStream] = {}

    def claim(self, key: StreamKey, session_id: str) -> RelayStream | None:
        path = stream_path(key)
        if path in self.streams:
            return None
        stream = self.streams[path] = RelayStream(key, session_id)
        STREAMS.inc()
        return stream

    def release(self, stream: RelayStream, end: StreamEnd) -> None:
        if self.streams.get(stream.path) is stream:
            del self.streams[stream.path]
            STREAMS.dec()
        stream.end(end)

    def get(self, key: StreamKey) -> RelayStream | None:
        return self.streams.get(stream_path(key))
