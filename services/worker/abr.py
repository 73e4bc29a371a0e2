"""An ABR ladder job: the source stream in over gRPC (an UpstreamSubscription, as playback follows a stream),
its renditions out through the publish path every publisher takes (a PublishSession per rendition: lease,
origin, failover), made by one ffmpeg child process per job.

ffmpeg, not PyAV in this process: measured (docs/ARCHITECTURE.md, "Media workers"), a 720p30 source into a
480p + 360p ladder cost the child 1-2% more CPU than the same ladder by one plain ffmpeg command, and PyAV
9-16% more (its per-frame Python holds the GIL between codec calls, which also stalls this event loop);
and a crash in a codec kills the child, not the worker and its other jobs.

The child reads FLV on its stdin (the source's tags as they come) and writes one FLV per rendition on its
own pipe (read every READ_EVERY): decoded once, scaled per rendition (split), each encoded with libx264.
Keyframes are aligned across renditions and with the source: each rendition takes a keyframe exactly
where the source has one (-force_key_frames source) and nowhere else (no scene-cut or interval keyframes),
with the source's timestamps (-copyts, a millisecond encoder time base: 1/fps would round them to its
grid), and no B-frames (-tune zerolatency), so a keyframe's DTS is its PTS in every rendition. A lower
frame rate drops pictures (select) but never a keyframe, and moves none (the fps filter would put them on
its own grid). Audio is copied, not encoded: the ladder's audio is the source's, once.

The job restarts its child when the source's codec configuration changes (a new size) or a new publish
session starts a new timeline; renditions whose height is above the source's are skipped (never upscaled)
and the job says so. A source without video leaves the job waiting. The child may fall behind the source by
MAX_BEHIND bytes of FLV; past that its input skips to the next keyframe (counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from castmesh.media import flv
from castmesh.media.codecs import CodecError, VideoConfig, avc_dimensions, read_video
from castmesh.media.frames import AUDIO, DATA, VIDEO, make_frame
from castmesh.mesh.jobs import rendition_name
from castmesh.mesh.logs import event
from castmesh.mesh.sessions import Publish, Publishes, Refused, StreamRequest
from castmesh.mesh.subscription import UpstreamSubscription
from castmesh.proto.v1.dispatch_pb2 import Job, Rendition
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader
from castmesh.proto.v1.relay_pb2 import StreamEnd

log = logging.getLogger("castmesh.worker")

AUDIO_WAIT = 200  # frames (a few seconds) a transcoder waits for the audio configuration a header promised
PUBLISH_TRIES = 10  # a rendition's publish asked for again while its stream is held (PUBLISH_RETRY apart)
PUBLISH_RETRY = 0.5
PUBLISH_BACKOFF = 10.0  # seconds before a rendition refused for good is asked for again (at a keyframe)
MAX_BEHIND = 8 << 20  # bytes of FLV the child may have unread before its input skips to a keyframe
STDERR_LINES = 20  # the child's last lines kept for the job's error
READ = 1 << 20
READ_EVERY = 0.04  # seconds between reads of the child's outputs: at most this much latency added
PIPE_SIZE = 1 << 20  # bytes an output pipe holds (Linux's default is 64 KiB)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

SKIPS = Counter("castmesh_worker_input_skips", "Times a transcoder fell MAX_BEHIND behind its source and skipped "
                "to the next keyframe")
TRANSCODERS = Gauge("castmesh_worker_transcoders", "ffmpeg children running")
RESTARTS = Counter("castmesh_worker_transcoder_restarts", "Transcoders started again: a new source configuration "
                   "or timeline, or a child that exited", ["why"])


@dataclass(frozen=True, slots=True)
class Planned:
    rendition: Rendition
    width: int
    height: int


def source_size(video_config: Frame | None, metadata: Frame | None) -> tuple[int, int] | None:
    """The source's picture size: from an H.264 SPS, else from onMetaData; None if neither says."""
    if video_config is not None:
        try:
            config = read_video(video_config.payload)
            if isinstance(config, VideoConfig) and config.codec == "avc1" and config.parameter_sets:
                return avc_dimensions(config.parameter_sets[0])
        except CodecError:
            pass
    if metadata is not None:
        from castmesh.media.amf0 import AmfError, decode

        try:
            values = decode(metadata.payload)
        except AmfError:
            return None
        meta = next((v for v in values if isinstance(v, dict)), {})
        width, height = meta.get("width"), meta.get("height")
        if isinstance(width, int | float) and isinstance(height, int | float) and width > 0 and height > 0:
            return int(width), int(height)
    return None


def plan(renditions: list[Rendition], size: tuple[int, int] | None) -> tuple[list[Planned], list[str]]:
    """Each rendition's picture size for a source of `size`, and why the others are skipped (a size above
    the source's: a ladder never upscales)."""
    planned, skipped = [], []
    for r in renditions:
        width, height = r.width, r.height
        if size is not None:
            if height > size[1]:
                skipped.append(f"{r.name}: {height} lines is above the source's {size[0]}x{size[1]}")
                continue
            if not width:
                width = max(2, round(size[0] * height / size[1] / 2) * 2)
        planned.append(Planned(r, width, height))
    return planned, skipped


def ffmpeg_args(ffmpeg: str, planned: list[Planned], has_audio: bool, fds: list[int]) -> list[str]:
    """The child's command line: FLV in on stdin, rendition i as FLV on pipe fds[i]."""
    args = [ffmpeg, "-hide_banner", "-loglevel", "error", "-probesize", "500000", "-analyzeduration", "1000000",
            "-f", "flv", "-i", "pipe:0", "-copyts"]
    chains = []
    split = len(planned) > 1
    if split:
        chains.append(f"[0:v]split={len(planned)}" + "".join(f"[s{i}]" for i in range(len(planned))))
    for i, p in enumerate(planned):
        steps = []
        if p.rendition.frame_rate:  # fewer pictures, but every keyframe kept, each at the source's time
            steps.append(f"select='eq(key\\,1)+gte(t-prev_selected_t\\,{0.9 / p.rendition.frame_rate:.4f})'")
        width = p.width or -2
        steps += [f"scale={width}:{p.height}", "format=yuv420p"]
        chains.append(f"[{f's{i}' if split else '0:v'}]" + ",".join(steps) + f"[v{i}]")
    args += ["-filter_complex", ";".join(chains)]
    for i, p in enumerate(planned):
        kbps = p.rendition.bitrate_kbps
        args += ["-map", f"[v{i}]"]
        if has_audio:
            args += ["-map", "0:a?", "-c:a", "copy"]
        args += ["-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency",
                 "-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{2 * kbps}k",
                 "-force_key_frames", "source", "-x264-params", "keyint=infinite:scenecut=0",
                 "-fps_mode", "passthrough", "-enc_time_base:v", "1:1000",
                 "-f", "flv", "-flvflags", "no_duration_filesize", f"pipe:{fds[i]}"]
    return args


class Transcoder:
    """One ffmpeg child: FLV in, one FLV per rendition out, each tag handed to `on_tag(index, tag)`.

    What is fed before the child has started waits for it (within MAX_BEHIND). Given `after` (the child it
    replaces, closing), it hands over no tag before that one has handed over its last: a restart at a
    keyframe leaves neither a gap nor an overlap in the renditions."""

    def __init__(self, ffmpeg: str, planned: list[Planned], has_audio: bool, has_video: bool, configs: list[Frame],
                 on_tag: Callable[[int, flv.Tag], None], on_exit: Callable[[Transcoder, str], None],
                 after: Transcoder | None = None) -> None:
        self.ffmpeg = ffmpeg
        self.planned = planned
        self.has_audio = has_audio
        self.on_tag = on_tag
        self.on_exit = on_exit
        self.after = after
        self.process: asyncio.subprocess.Process | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.queued = [flv.file_header(has_audio, has_video)]  # until the child runs
        self.queued_size = 0
        self.skipping = False
        self.closed = False
        self.drained = asyncio.Event()  # every output read to its end
        self.feed(configs)

    async def start(self) -> None:
        pipes = [os.pipe() for _ in self.planned]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *ffmpeg_args(self.ffmpeg, self.planned, self.has_audio, [w for _, w in pipes]),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                pass_fds=[w for _, w in pipes])
        except BaseException:
            for r, _ in pipes:
                os.close(r)
            self.drained.set()
            raise
        finally:
            for _, w in pipes:
                os.close(w)
        TRANSCODERS.inc()
        if self.closed and self.process.stdin is not None:  # closed while it was being started: it ends now
            self.process.kill()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._read([r for r, _ in pipes])), loop.create_task(self._errors())]
        self.tasks.append(loop.create_task(self._wait()))
        queued, self.queued = self.queued, []
        self._write(b"".join(queued))
        if self.closed:
            self._end_input()

    def feed(self, frames: list[Frame]) -> None:
        """Write frames to the child; skip to the next keyframe while it is MAX_BEHIND behind."""
        behind = self._behind()
        if not self.skipping and behind > MAX_BEHIND:
            self.skipping = True
            SKIPS.inc()
        out = []
        for frame in frames:
            if self.skipping and frame.kind == VIDEO and frame.keyframe:
                self.skipping = self._behind() > MAX_BEHIND
            if not self.skipping or frame.sequence_header or frame.kind == DATA:
                out.append(flv.tag(frame.kind, frame.timestamp, frame.payload))
        if out:
            self._write(b"".join(out))

    def _behind(self) -> int:
        stdin = self.process.stdin if self.process is not None else None
        return stdin.transport.get_write_buffer_size() if stdin is not None else self.queued_size

    def _write(self, data: bytes) -> None:
        if self.process is None:
            self.queued.append(data)
            self.queued_size += len(data)
        elif self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.write(data)

    async def _read(self, fds: list[int]) -> None:
        """Every READ_EVERY, what each output pipe holds. ffmpeg writes each packet as it is muxed (a few
        hundred writes a second for a ladder); reading them as they come woke the loop for each, which cost
        the worker more than the rest of the job's Python together (docs/BENCHMARKS.md, bench worker)."""
        for fd in fds:
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)  # room for READ_EVERY of a high bitrate
        parsers = {i: flv.FlvReader() for i in range(len(fds))}
        try:
            if self.after is not None:
                await self.after.drained.wait()
            while parsers:
                for index, parser in list(parsers.items()):
                    if not self._drain(fds[index], index, parser):
                        del parsers[index]
                if parsers:
                    await asyncio.sleep(READ_EVERY)
        finally:
            for fd in fds:
                os.close(fd)
            self.drained.set()

    def _drain(self, fd: int, index: int, parser: flv.FlvReader) -> bool:
        """Hand over the tags of what `fd` holds; False at its end (or if what it holds is not FLV)."""
        while True:
            try:
                chunk = os.read(fd, READ)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            try:
                for tag in parser.feed(chunk):
                    self.on_tag(index, tag)
            except flv.FlvError as exc:
                self.stderr.append(f"rendition {index}: {exc}")
                return False

    async def _errors(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr.append(line.decode("utf-8", "replace").rstrip()[:300])

    async def _wait(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        TRANSCODERS.dec()
        if not self.closed:
            self.on_exit(self, f"ffmpeg exited with {code}: {' | '.join(list(self.stderr)[-3:]) or 'no message'}")

    def _end_input(self) -> None:
        if self.process is not None and self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()  # end of input: it finishes what it has, then exits

    async def close(self) -> None:
        """End its input and let it finish (its last pictures still go out); killed if it takes too long."""
        self.closed = True
        self._end_input()
        process = self.process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except TimeoutError:
                process.kill()
                await process.wait()
        try:
            await asyncio.wait_for(self.drained.wait(), 1.0)
        except TimeoutError:
            pass
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.drained.set()


class AbrJob:
    """One ladder: follows its source, keeps a transcoder for it, and publishes each rendition."""

    def __init__(self, job: Job, subscribe: Callable[..., UpstreamSubscription], publishes: Publishes,
                 ffmpeg: str, report: Callable[[Job], None]) -> None:
        self.job = job
        self.spec = job.spec
        self.subscribe = subscribe
        self.publishes = publishes
        self.ffmpeg = ffmpeg
        self.report = report
        self.path = f"{job.spec.stream.app}/{job.spec.stream.name}"
        self.configs: dict[int, Frame] = {}  # the source's latest video and audio configurations, and metadata
        self.has_video = self.has_audio = False
        self.transcoder: Transcoder | None = None
        self.planned: list[Planned] = []
        self.started_with: tuple[bytes, ...] = ()  # the configurations the child was started with
        self.switch = ""  # why the next keyframe goes to a new child ("": it does not)
        self.outputs: dict[str, Publish] = {}  # rendition name -> its publish
        self.headers: dict[str, dict[int, Frame]] = {}  # rendition name -> its metadata and codec configurations
        self.retry_at: dict[str, float] = {}  # rendition name -> when it may be published again after a loss
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.audio_wait = 0  # frames let by before starting, waiting for the audio configuration

    async def run(self) -> StreamEnd:
        subscription = self.subscribe(self.spec.stream, self._on_header, self._on_frames)
        try:
            return await subscription.run()
        finally:
            await self._stop_transcoder()

    def pids(self) -> list[int]:
        """The child whose CPU the worker counts as its own."""
        process = self.transcoder.process if self.transcoder is not None else None
        return [process.pid] if process is not None and process.returncode is None else []

    def close(self, clean: bool, reason: str) -> None:
        """End every rendition's publish (clean: its viewers' responses end at once; else they wait in grace)."""
        self.closed = True
        for publish in self.outputs.values():
            publish.end(reason, clean)
        self.outputs.clear()

    # The source -------------------------------------------------------------------------------------------

    def _on_header(self, header: StreamHeader, new_timeline: bool) -> None:
        self.has_video, self.has_audio = header.has_video, header.has_audio
        for frame in (header.metadata, header.video_config, header.audio_config):
            if frame.payload:
                self._config(frame)
        if new_timeline:
            self.switch = "new timeline"  # its first keyframe goes to a new child
        if not header.has_video:
            self._state(Job.STATE_WAITING, "the source has no video: nothing to scale")

    def _config(self, frame: Frame) -> None:
        self.configs[DATA if frame.kind == DATA else frame.kind] = frame

    def _on_frames(self, frames: list[Frame]) -> None:
        for frame in frames:
            if frame.sequence_header or frame.kind == DATA:
                self._config(frame)
        media = [f for f in frames if not f.sequence_header and f.kind != DATA]
        old = self.transcoder
        if old is None:
            if VIDEO not in self.configs:
                return
            if self.has_audio and AUDIO not in self.configs and self.audio_wait < AUDIO_WAIT:
                self.audio_wait += len(frames)  # the audio's configuration comes a moment after the video's
                return
            self.switch = self.switch or "start"
        elif self._configs_key() != self.started_with:
            self.switch = self.switch or "new codec configuration"
        if not self.switch:
            if old is not None:
                old.feed(media)
            return
        at = next((i for i, f in enumerate(media) if f.kind == VIDEO and f.keyframe), None)
        if at is None:  # the old child (if any) takes all until the keyframe the new one starts with
            if old is not None:
                old.feed(media)
            return
        if old is not None:
            old.feed(media[:at])
        self._switch(old)
        if self.transcoder is not None:
            self.transcoder.feed(media[at:])

    def _configs_key(self) -> tuple[bytes, ...]:
        return tuple(self.configs[k].payload for k in (VIDEO, AUDIO) if k in self.configs)

    def _switch(self, old: Transcoder | None) -> None:
        """A new child from this keyframe on (the first, or one for a new configuration or timeline); the
        old one finishes what it has, and its last pictures go out before the new one's first."""
        why, self.switch = self.switch, ""
        if self.closed:
            return
        if old is not None:
            RESTARTS.labels(why).inc()
            self._spawn(old.close())
        size = source_size(self.configs.get(VIDEO), self.configs.get(DATA))
        self.planned, skipped = plan(list(self.spec.renditions), size)
        self.started_with = self._configs_key()
        self.transcoder = None
        wanted = {p.rendition.name for p in self.planned}
        for name in [n for n in self.outputs if n not in wanted]:
            self.outputs.pop(name).end("the rendition is no longer made from this source", True)
        if not self.planned:
            self._state(Job.STATE_WAITING, "; ".join(skipped))
            return
        configs = [self.configs[k] for k in (DATA, VIDEO, AUDIO) if k in self.configs]
        plan_now = self.planned  # the old child's tags still go by its own plan while it finishes
        transcoder = self.transcoder = Transcoder(self.ffmpeg, plan_now, AUDIO in self.configs, True, configs,
                                                  lambda index, tag: self._on_tag(plan_now, index, tag),
                                                  self._on_exit, after=old)
        for p in self.planned:
            if p.rendition.name not in self.outputs:
                self._publish(p.rendition.name)

        async def start() -> None:
            try:
                await transcoder.start()
            except OSError as exc:
                if self.transcoder is transcoder:
                    self.transcoder = None
                self._state(Job.STATE_FAILED, f"cannot start ffmpeg: {exc}")
                return
            if self.closed or self.transcoder is not transcoder:
                return  # the job ended, or the source changed again, while the child was being started
            detail = "; ".join(f"skipped {s}" for s in skipped)
            self._state(Job.STATE_RUNNING, detail, [rendition_name(self.spec.stream.name, p.rendition.name)
                                                    for p in self.planned])
            event(log, "abr.transcoder", job=self.job.id, why=why, renditions=",".join(
                f"{p.rendition.name}={p.width}x{p.height}" for p in self.planned), skipped=len(skipped))

        self._spawn(start())

    def _on_exit(self, transcoder: Transcoder, why: str) -> None:
        """A child exited by itself (a broken input, a failing encoder): another starts at the next keyframe;
        the job says why meanwhile."""
        event(log, "abr.transcoder_exited", level=logging.WARNING, job=self.job.id, why=why)
        self._state(Job.STATE_RUNNING, why)
        if self.transcoder is transcoder:
            self.transcoder = None
            self.switch = "exited"

    async def _stop_transcoder(self) -> None:
        if self.transcoder is not None:
            await self.transcoder.close()
            self.transcoder = None

    # The renditions ---------------------------------------------------------------------------------------

    def _publish(self, name: str, tries: int = PUBLISH_TRIES) -> None:
        """Publish a rendition, as any publisher would. A stream still held by the publish of a worker that
        just died (its lease not yet seen to end: in Consul, its session destroyed) is asked for again, a
        few times; each new publish starts with the rendition's headers."""
        if self.closed:
            return
        stream = rendition_name(self.spec.stream.name, name)
        request = StreamRequest(self.spec.stream.app, stream, {}, f"job:{self.job.id}", "abr")
        publish = self.publishes.publish(request, pause=lambda paused: None,
                                         stop=lambda reason: self._lost(name, reason))
        self.outputs[name] = publish
        for frame in self.headers.get(name, {}).values():
            publish.push(frame)

        async def start() -> None:
            try:
                await publish.start()
            except Refused as exc:
                if self.outputs.get(name) is not publish:
                    return
                del self.outputs[name]
                if exc.kind == "rejected" and tries > 1 and not self.closed:
                    await asyncio.sleep(PUBLISH_RETRY)
                    if not self.closed and name not in self.outputs and name in self._planned_names():
                        self._publish(name, tries - 1)
                    return
                self.retry_at[name] = time.monotonic() + PUBLISH_BACKOFF  # then at a keyframe (_on_tag)
                self._state(Job.STATE_RUNNING, f"{stream} not published: {exc.reason}")

        self._spawn(start())

    def _planned_names(self) -> set[str]:
        return {p.rendition.name for p in self.planned}

    def _lost(self, name: str, reason: str) -> None:
        publish = self.outputs.pop(name, None)
        self.retry_at[name] = time.monotonic() + PUBLISH_RETRY
        if publish is not None:
            event(log, "abr.rendition_lost", job=self.job.id, rendition=name, reason=reason)

    def _on_tag(self, planned: list[Planned], index: int, tag: flv.Tag) -> None:
        if index >= len(planned) or tag.kind not in (AUDIO, VIDEO, DATA):
            return
        name = planned[index].rendition.name
        frame = make_frame(tag.kind, tag.timestamp, tag.payload)
        if frame.sequence_header or frame.kind == DATA:
            self.headers.setdefault(name, {})[frame.kind] = frame
        publish = self.outputs.get(name)
        if publish is None and frame.keyframe and not frame.sequence_header and not self.closed \
                and time.monotonic() >= self.retry_at.get(name, 0.0):
            self._publish(name)  # lost or refused before: published again from this keyframe
            publish = self.outputs.get(name)
        if publish is not None:
            publish.push(frame)

    # ------------------------------------------------------------------------------------------------------

    def _state(self, state: int, detail: str, outputs: list[str] | None = None) -> None:
        self.job.state, self.job.detail = state, detail  # type: ignore[assignment]
        if outputs is not None:
            del self.job.outputs[:]
            self.job.outputs.extend(outputs)
        self.report(self.job)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
