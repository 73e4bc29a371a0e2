"""Thumbnails: a JPEG of each live stream's latest keyframe, made by workers only while someone asks.

The first request for /{app}/{stream}.jpg subscribes to the stream (as playback does) and waits for a
keyframe; after that, each keyframe that comes when the picture is REFRESH old is decoded (keyframes only,
each with a fresh decoder: castmesh.media.thumbnail) on a small thread pool, never on the event loop. A
stream nobody asked about for IDLE seconds is let go. Requests are answered with the newest picture at
once.

Which worker makes a stream's thumbnails: the one rendezvous hashing picks among the live workers, so a
stream is decoded by one worker however many ask (`pick_worker`, used by the gateway's redirect and by
playback nodes that pass the picture on).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from castmesh.media.frames import VIDEO, path_of, stream_key
from castmesh.media.thumbnail import ThumbnailError, thumbnail
from castmesh.mesh.logs import event
from castmesh.mesh.subscription import UpstreamSubscription
from castmesh.proto.v1.dispatch_pb2 import Node
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader, StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd

log = logging.getLogger("castmesh.worker")

REFRESH = 5.0  # seconds: a picture is made again from the first keyframe after it is this old
IDLE = 30.0  # seconds without a request before a stream is let go
FIRST_WAIT = 8.0  # seconds a request waits for a stream's first picture
MAX_STREAMS = 512  # streams a worker follows for thumbnails at once
DECODERS = 2  # threads decoding keyframes
JPEG = "image/jpeg"

MADE = Counter("castmesh_worker_thumbnails_made", "Thumbnails decoded from keyframes")
FAILED = Counter("castmesh_worker_thumbnails_failed", "Keyframes that did not become thumbnails")
DECODE_SECONDS = Counter("castmesh_worker_thumbnail_cpu_seconds", "Thread CPU time spent making thumbnails")
FOLLOWED = Gauge("castmesh_worker_thumbnail_streams", "Streams followed for thumbnails")

Answer = tuple[int, bytes, str]  # status, body, content type (or the reason, for an error)
Subscribe = Callable[[StreamKey, Callable[[StreamHeader, bool], None], Callable[[list[Frame]], None]],
                     UpstreamSubscription]


class StreamThumbnail:
    def __init__(self, owner: Thumbnails, key: StreamKey) -> None:
        self.owner = owner
        self.key = key
        self.config: Frame | None = None
        self.jpeg: bytes | None = None
        self.made_at = 0.0
        self.asked = time.monotonic()
        self.decoding = False
        self.has_video = True
        self.ended = ""
        self.ready = asyncio.Event()  # a picture exists, or there will be none
        self.task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        subscription = self.owner.subscribe(self.key, self._on_header, self._on_frames)
        end = await subscription.run()
        self.ended = end.detail or StreamEnd.Reason.Name(end.reason)
        self.ready.set()
        self.owner.forget(self)

    def _on_header(self, header: StreamHeader, new_timeline: bool) -> None:
        self.has_video = header.has_video
        if header.video_config.payload:
            self.config = header.video_config
        if not header.has_video:
            self.ready.set()

    def _on_frames(self, frames: list[Frame]) -> None:
        for frame in frames:
            if frame.kind != VIDEO:
                continue
            if frame.sequence_header:
                self.config = frame
            elif frame.keyframe and self._due():
                self._decode(frame)

    def _due(self) -> bool:
        return not self.decoding and self.config is not None and time.monotonic() - self.made_at >= REFRESH

    def _decode(self, keyframe: Frame) -> None:
        assert self.config is not None
        self.decoding = True
        config = self.config.payload

        def work() -> tuple[bytes, float]:
            started = time.thread_time()
            data, _, _ = thumbnail(config, keyframe.payload)
            return data, time.thread_time() - started

        async def run() -> None:
            try:
                data, spent = await asyncio.get_running_loop().run_in_executor(self.owner.pool, work)
            except ThumbnailError as exc:
                FAILED.inc()
                event(log, "thumbnail.failed", stream=f"{self.key.app}/{self.key.name}", error=str(exc)[:200])
            else:
                MADE.inc()
                DECODE_SECONDS.inc(spent)
                self.jpeg, self.made_at = data, time.monotonic()
                self.ready.set()
            finally:
                self.decoding = False

        self.owner.spawn(run())

    async def answer(self) -> Answer:
        self.asked = time.monotonic()
        if self.jpeg is None:
            try:
                await asyncio.wait_for(self.ready.wait(), FIRST_WAIT)
            except TimeoutError:
                return 504, b"", f"no keyframe came within {FIRST_WAIT:g}s"
        if self.jpeg is not None:
            return 200, self.jpeg, JPEG
        if not self.has_video:
            return 404, b"", "the stream has no video: no picture to show"
        return 404, b"", f"no such stream ({self.ended})" if self.ended else "no picture yet"

    def close(self) -> None:
        self.task.cancel()


class Thumbnails:
    def __init__(self, subscribe: Subscribe, max_streams: int = MAX_STREAMS) -> None:
        self.subscribe = subscribe
        self.max_streams = max_streams
        self.streams: dict[str, StreamThumbnail] = {}
        self.pool = ThreadPoolExecutor(DECODERS, thread_name_prefix="thumbnail")
        self.tasks: set[asyncio.Task[None]] = set()
        self.sweeper: asyncio.Task[None] | None = None
        FOLLOWED.set_function(lambda: len(self.streams))

    async def get(self, app: str, name: str) -> Answer:
        path = path_of(app, name)
        thumb = self.streams.get(path)
        if thumb is None:
            if len(self.streams) >= self.max_streams:
                return 503, b"", f"this worker follows {self.max_streams} streams for thumbnails already"
            thumb = self.streams[path] = StreamThumbnail(self, stream_key(app, name))
            if self.sweeper is None:
                self.sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return await thumb.answer()

    def forget(self, thumb: StreamThumbnail) -> None:
        path = path_of(thumb.key.app, thumb.key.name, thumb.key.vhost)
        if self.streams.get(path) is thumb:
            del self.streams[path]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for thumb in [t for t in self.streams.values() if now - t.asked > IDLE]:
                thumb.close()
                self.forget(thumb)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        for thumb in list(self.streams.values()):
            thumb.close()
        self.streams.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


def pick_worker(workers: list[Node], app: str, name: str) -> Node | None:
    """The worker that makes a stream's thumbnails: rendezvous hashing over the workers with an HTTP port."""
    candidates = [w for w in workers if w.meta.get("http")]
    key = f"{app}/{name}".encode()
    return max(candidates, key=lambda w: hashlib.blake2b(key + b"\0" + w.id.encode(), digest_size=8).digest(),
               default=None)


def worker_url(worker: Node, app: str, name: str) -> str:
    host = worker.address.rpartition(":")[0]
    return f"http://{host}:{worker.meta['http']}/{app}/{name}.jpg"


class RemoteThumbnails:
    """A playback node's thumbnails: fetched from the worker that makes them (pick_worker)."""

    def __init__(self, workers: Callable[[], Awaitable[list[Node]]]) -> None:
        self.workers = workers
        self.http: aiohttp.ClientSession | None = None

    async def get(self, app: str, name: str) -> Answer:
        worker = pick_worker(await self.workers(), app, name)
        if worker is None:
            return 503, b"", "no worker makes thumbnails"
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FIRST_WAIT + 2))
        try:
            async with self.http.get(worker_url(worker, app, name)) as response:
                body = await response.read()
                kind = response.headers.get("Content-Type", JPEG)
                return response.status, body if response.status == 200 else b"", kind if response.status == 200 \
                    else body.decode(errors="replace").strip()[:200]
        except (TimeoutError, aiohttp.ClientError) as exc:
            return 502, b"", f"the worker {worker.id} did not answer: {exc}"

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()


def thumbnail_app(thumbnails: Thumbnails | RemoteThumbnails) -> web.Application:
    """A worker's HTTP port: GET /{app}/{stream}.jpg, and /metrics."""

    async def picture(request: web.Request) -> web.Response:
        status, body, detail = await thumbnails.get(request.match_info["app"], request.match_info["stream"])
        if status == 200:
            return web.Response(body=body, content_type=detail, headers={"Cache-Control": "max-age=2"})
        return web.Response(status=status, text=f"{detail}\n", headers={"Cache-Control": "no-cache"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(r"/{app:[A-Za-z0-9_.~-]{1,128}}/{stream:[A-Za-z0-9_.~-]{1,256}}.jpg", picture)
    app.router.add_get("/metrics", metrics)
    return app
