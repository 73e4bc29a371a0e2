"""A pull job: a stream whose source is a URL (an RTSP camera, another RTMP server, an HLS playlist, an SRT
listener), read by an ffmpeg child and published into the cluster through the publish path every publisher
takes (services.ingest.session: lease, origin, failover, hooks), as MediaMTX's `source` and SRS's ingest do.

ffmpeg, not a reader per protocol here: it speaks all four (RTSP as ffmpeg does by default: RTP over UDP,
then interleaved in the TCP connection if no UDP packet comes, so both what cameras behind NAT allow and
what UDP-only servers such as Debian's rtsp-server-perl speak), and a source that sends garbage crashes a
child, not the worker. The
child copies the first video and the first audio stream into FLV on its stdout; this job reads it as any
FLV and publishes its tags. Audio in a codec HLS and WebRTC cannot carry (a camera's G.711, MP3) is made
AAC: at its first audio tag the child is replaced, at once and not counted as a failure, by one that
encodes the audio (the video is always copied).

A source that ends, fails, or says nothing for STALL seconds (a camera that hangs with its socket open, an
RTMP server whose publisher left: nginx-rtmp keeps its players connected; STALL_HLS for a playlist) is
read again after a backoff that doubles from `backoff` to `max_backoff` (reset once a child has read for
STABLE_FOR): the stream's publish ends unclean meanwhile, so its viewers wait in the relay's grace and go on
with the next child's media. Each failure is logged once, with the child's last words, and counted.

On demand (spec.on_demand): dispatch started the job for a viewer; it ends by itself (state DONE) once the
stream has had no viewer for idle_seconds, counted once its source first gave media, or from START_WAIT
after the start if it never did, so a source that never comes up does not keep retrying for nobody. Viewers
are what the stream's origin relay lists as its subscribers, thumbnail takers aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge

from castmesh.media import flv
from castmesh.media.frames import AUDIO, make_frame
from castmesh.mesh.jobs import DEFAULT_IDLE
from castmesh.mesh.logs import event
from castmesh.mesh.sessions import Publish, Publishes, Refused, StreamRequest
from castmesh.mesh.targets import masked
from castmesh.proto.v1.dispatch_pb2 import Job
from castmesh.proto.v1.media_pb2 import StreamKey
from castmesh.proto.v1.relay_pb2 import StreamEnd
from services.worker.forward import Backoff

log = logging.getLogger("castmesh.worker")

READ = 1 << 16
STALL = 5.0  # seconds without a byte from the child (connecting included) before it is killed...
STALL_HLS = 15.0  # ...but an HLS source comes a segment at a time (up to 10 s each, as Apple recommends 6)
PROBE = ["-probesize", "1000000", "-analyzeduration", "2000000"]  # 2 s to find the streams, not ffmpeg's 5
STABLE_FOR = 10.0  # seconds a child must have read for the next failure to wait `backoff` again
IDLE_CHECK = 1.0  # seconds between looks at an on-demand pull's viewers
START_WAIT = 20.0  # seconds an on-demand pull's source may take to give media before nobody waits for it
STDERR_LINES = 8
AAC_BITRATE = "96k"  # a source's audio in a codec HLS and WebRTC do not carry (a camera's G.711) becomes AAC
FLV_AUDIO_NAMES = {0: "PCM", 1: "ADPCM", 2: "MP3", 3: "PCM", 4: "Nellymoser", 5: "Nellymoser", 6: "Nellymoser",
                   7: "G.711 A-law", 8: "G.711 mu-law", 11: "Speex", 14: "MP3"}

Watchers = Callable[[StreamKey], Awaitable[int | None]]

CONNECTS = Counter("castmesh_pull_connects", "Pulled sources that gave media", ["scheme"])
FAILURES = Counter("castmesh_pull_failures", "Pulled sources that could not be read, or stopped", ["scheme"])
BYTES = Counter("castmesh_pull_bytes", "Bytes of FLV read from pulled sources' ffmpeg children", ["scheme"])
PULLING = Gauge("castmesh_pull_children", "ffmpeg children reading pulled sources")


def ffmpeg_args(ffmpeg: str, url: str, aac: bool = False) -> list[str]:
    """The child's command: both tracks copied, or (`aac`) the audio made AAC."""
    args = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", *PROBE]
    codecs = ["-c:v", "copy", "-c:a", "aac", "-b:a", AAC_BITRATE] if aac else ["-c", "copy"]
    return [*args, "-i", url, "-map", "0:v:0?", "-map", "0:a:0?", *codecs, "-f", "flv",
            "-flvflags", "no_duration_filesize", "pipe:1"]


def foreign_audio(payload: bytes) -> str:
    """The name of an FLV audio tag's codec if castmesh's outputs cannot carry it (HLS, WebRTC and fMP4 take
    AAC and Opus); "" if they can. Enhanced RTMP's audio (sound format 9) names its codec by FourCC."""
    sound_format = payload[0] >> 4 if payload else 10
    if sound_format == 9:
        fourcc = bytes(payload[1:5])
        return "" if fourcc in (b"Opus", b"mp4a") else fourcc.decode("ascii", "replace").strip(". ") or "?"
    return "" if sound_format == 10 else FLV_AUDIO_NAMES.get(sound_format, f"FLV sound format {sound_format}")


class PullJob:
    """One pulled stream: its ffmpeg child, again and again, and the stream's publish."""

    def __init__(self, job: Job, publishes: Publishes, ffmpeg: str, report: Callable[[Job], None],
                 watchers: Watchers, backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self.job = job
        self.spec = job.spec
        self.publishes = publishes
        self.ffmpeg = ffmpeg
        self.report = report
        self.watchers = watchers
        self.backoff = Backoff(backoff, max_backoff)
        self.scheme = urlsplit(job.spec.url).scheme.lower()
        self.stall = STALL_HLS if self.scheme in ("http", "https") else STALL
        self.source = masked(job.spec.url)
        self.outputs: dict[str, Publish] = {}  # the stream, while published
        self.process: asyncio.subprocess.Process | None = None
        self.closed = False
        self.resume = asyncio.Event()  # cleared while the origin asks the source to pause
        self.resume.set()
        self.stopped = ""  # why the publish was stopped from the cluster (a kick, the stream lost)
        self.starting: asyncio.Task[None] | None = None
        self.connected = False  # its source has given media (once, at least)
        self.aac = False  # the source's audio is in a codec castmesh's outputs cannot carry: made AAC
        self.switching = False  # the child was stopped to start one that makes the audio AAC

    def pids(self) -> list[int]:
        process = self.process
        return [process.pid] if process is not None and process.returncode is None else []

    async def run(self) -> StreamEnd:
        idle = asyncio.get_running_loop().create_task(self._idle()) if self.spec.on_demand else None
        try:
            while not self.closed and not (idle is not None and idle.done()):
                started = time.monotonic()
                why = await self._read_once(idle)
                if self.closed or (idle is not None and idle.done()):
                    break
                if self.switching:  # not a failure: the next child at once
                    self.switching = False
                    continue
                if time.monotonic() - started >= STABLE_FOR:
                    self.backoff.reset()
                delay = self.backoff.next()
                FAILURES.labels(self.scheme).inc()
                event(log, "pull.retry", level=logging.WARNING, job=self.job.id, source=self.source,
                      delay=delay, error=why)
                self._state(Job.STATE_RUNNING, f"retrying in {delay:g} s: {why}")
                waits = [asyncio.ensure_future(asyncio.sleep(delay))] + ([idle] if idle is not None else [])
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                waits[0].cancel()
        finally:
            if idle is not None:
                idle.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await idle
        if idle is not None and idle.done() and not self.closed:
            self.job.state = Job.STATE_DONE
            self.job.detail = f"nobody watched for {self._idle_seconds()} s"
            return StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED, detail=self.job.detail)
        return StreamEnd(reason=StreamEnd.REASON_SHUTDOWN, detail="stopped")

    def close(self, clean: bool, reason: str) -> None:
        self.closed = True
        self._kill()
        for publish in self.outputs.values():
            publish.end(reason, clean)
        self.outputs.clear()

    # One child --------------------------------------------------------------------------------------------

    async def _read_once(self, idle: asyncio.Task[None] | None) -> str:
        """Run a child until it ends, stalls, or the job stops; why it ended."""
        args = ffmpeg_args(self.ffmpeg, self.spec.url, self.aac)
        try:
            process = self.process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            return f"ffmpeg could not start: {exc}"
        PULLING.inc()
        assert process.stdout is not None and process.stderr is not None
        stderr: deque[str] = deque(maxlen=STDERR_LINES)
        errors = asyncio.get_running_loop().create_task(self._errors(process.stderr, stderr))
        reader = flv.FlvReader()
        publish: Publish | None = None
        why = ""
        try:
            while not self.closed and not (idle is not None and idle.done()):
                await self.resume.wait()
                try:
                    chunk = await asyncio.wait_for(process.stdout.read(READ), self.stall)
                except TimeoutError:
                    why = f"nothing from the source for {self.stall:g} s"
                    break
                if not chunk:
                    break
                BYTES.labels(self.scheme).inc(len(chunk))
                try:
                    tags = reader.feed(chunk)
                except flv.FlvError as exc:  # (ffmpeg writes FLV: only a bug would bring this)
                    why = f"unreadable FLV from ffmpeg: {exc}"
                    break
                for tag in tags:
                    if tag.kind == AUDIO and not self.aac and (codec := foreign_audio(tag.payload)):
                        self.aac = self.switching = True
                        why = f"audio in {codec}: made AAC from now on"
                        event(log, "pull.audio_to_aac", job=self.job.id, source=self.source, codec=codec)
                        break
                    frame = make_frame(tag.kind, tag.timestamp, tag.payload)
                    if publish is None:
                        publish = self._publish()
                        self.connected = True
                        CONNECTS.labels(self.scheme).inc()
                        event(log, "pull.connected", job=self.job.id, source=self.source)
                        self._state(Job.STATE_RUNNING, "")
                    publish.push(frame)
                if self.switching:
                    break
                if self.stopped:
                    why = self.stopped
                    break
        finally:
            self._kill()
            code = await process.wait()
            PULLING.dec()
            await errors
            self.process = None
            if publish is not None:
                self.outputs.pop("stream", None)
                publish.end(why or "the source ended", clean=False)  # viewers wait in grace for the next child
        if why:
            return why
        said = "; ".join(stderr)
        return said or f"the source ended (ffmpeg exited with {code})"

    def _publish(self) -> Publish:
        self.stopped = ""
        request = StreamRequest(self.spec.stream.app, self.spec.stream.name, {}, f"job:{self.job.id}",
                                f"pull-{self.scheme}")
        publish = self.outputs["stream"] = self.publishes.publish(request, pause=self._pause, stop=self._stop)

        async def start() -> None:
            try:
                await publish.start()
            except Refused as exc:
                self._stop(f"not published: {exc.reason}")

        self.starting = asyncio.get_running_loop().create_task(start())  # (kept: else it may be collected)
        return publish

    def _pause(self, paused: bool) -> None:
        if paused:
            self.resume.clear()
        else:
            self.resume.set()

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        self.resume.set()
        self._kill()

    def _kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def _errors(self, stream: asyncio.StreamReader, lines: deque[str]) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").strip()
            if text:
                lines.append(text.replace(self.spec.url, self.source)[:300])

    # On demand --------------------------------------------------------------------------------------------

    def _idle_seconds(self) -> int:
        return self.spec.idle_seconds or DEFAULT_IDLE

    async def _idle(self) -> None:
        """Returns once the stream has had no viewer for its idle time. Until its source first gives media,
        the viewer that asked for it waits: it is given START_WAIT (or the idle time, if longer)."""
        started = since = time.monotonic()
        while True:
            await asyncio.sleep(IDLE_CHECK)
            now = time.monotonic()
            if not self.connected and now - started < max(START_WAIT, self._idle_seconds()):
                since = now  # (idle counts from the first media: the viewer that waits subscribes then)
                continue
            watching = await self.watchers(self.spec.stream)
            if watching is None or watching:  # (an origin that does not answer: not known to be idle)
                since = now
            elif now - since >= self._idle_seconds():
                event(log, "pull.idle", job=self.job.id, idle=self._idle_seconds())
                return

    def _state(self, state: int, detail: str) -> None:
        if (self.job.state, self.job.detail) == (state, detail):
            return
        self.job.state, self.job.detail = state, detail  # type: ignore[assignment]
        self.report(self.job)
