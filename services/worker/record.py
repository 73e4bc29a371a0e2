"""Recording: a "record" job writes its source stream to fragmented MP4 files on the worker's disk, and the
worker's Recordings keeps them (retention), lists them, tells a hook and an uploader of each finished file.

A job follows its source like any subscriber (castmesh.mesh.subscription) and cuts it with the HLS
segmenter's fMP4 code (castmesh.media.hls.Segmenter, in low-latency mode): a file per segment of
`segment_seconds` (cut at the first keyframe after that; a new publish session or a codec change also
starts a new file), each one an initialization segment followed by fragments of PART_MS written as each is
made. So a file being written is always a readable MP4 up to its last whole fragment: a worker killed with
-9 loses at most the fragment it was gathering, and read_index leaves out one cut short.

Files: ROOT/APP/STREAM/YYYY-MM-DD_HH-MM-SS-ffffff.mp4, named by when ingest received the file's first frame
(UTC), as MediaMTX names its own. Another worker that takes the job over after a crash starts a new file.

Disk IO happens on one thread (DiskWriter), in order, never on the event loop: a slow or full disk never
stalls a stream. A failed write (ENOSPC, EIO) ends that file where it is, is logged once and counted, and the
next file is tried at the next segment; the stream and every other recording go on. The thread holds at most
MAX_PENDING bytes not yet written; past that, fragments are dropped (counted) rather than held.

Retention runs every RETENTION_EVERY: files older than max_age go, then the oldest files until the total is
under max_bytes. Files still being written are never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from castmesh.media.fmp4 import Index, Mp4Error, read_index
from castmesh.media.frames import AUDIO, VIDEO
from castmesh.media.gop import header_frames
from castmesh.media.hls import HlsError, Segment, Segmenter
from castmesh.mesh.hooks import Hooks
from castmesh.mesh.logs import event
from castmesh.mesh.subscription import UpstreamSubscription
from castmesh.proto.v1.dispatch_pb2 import Job
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader
from castmesh.proto.v1.relay_pb2 import StreamEnd

log = logging.getLogger("castmesh.worker")

PART_MS = 1000  # fragments: what a crash may lose at most, and the grain of VOD playlists and downloads
MAX_PENDING = 64 << 20  # bytes handed to the disk thread and not yet written, over every recording
RETENTION_EVERY = 10.0  # seconds between retention sweeps
NAME_FORMAT = "%Y-%m-%d_%H-%M-%S-%f"
SUFFIX = ".mp4"
SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.~-")
MAX_INDEXED = 20_000  # files whose fragment index is kept in memory

FILES = Counter("castmesh_record_files", "Recording files finished")
BYTES = Counter("castmesh_record_bytes", "Bytes written to recording files")
WRITE_ERRORS = Counter("castmesh_record_write_errors", "Recording files ended by a failed write", ["error"])
DROPPED = Counter("castmesh_record_dropped_bytes", "Bytes of recordings dropped because the disk fell behind")
REMOVED = Counter("castmesh_record_removed", "Recording files removed by retention", ["why"])
PENDING = Gauge("castmesh_record_pending_bytes", "Bytes of recordings waiting for the disk")


def safe_name(part: str) -> bool:
    """An app or stream name usable as one directory name as it is."""
    return bool(part) and part[0] != "." and all(c in SAFE for c in part)


def file_start(path: Path) -> float | None:
    """When a recording file starts (seconds since the epoch), from its name; None if it is not one."""
    if path.suffix != SUFFIX:
        return None
    try:
        return datetime.strptime(path.stem, NAME_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RecordSettings:
    root: Path
    segment_seconds: int = 60
    max_age: float = 0.0  # seconds; 0: kept whatever their age
    max_bytes: int = 0  # over every file under root; 0: no limit


@dataclass(frozen=True, slots=True)
class RecordedFile:
    path: Path
    start: float  # seconds since the epoch, of its first fragment
    duration: float  # seconds, of its whole fragments
    size: int
    index: Index
    writing: bool

    def fragment_times(self) -> list[tuple[float, float]]:
        """(start, duration) of each fragment, in seconds since the epoch."""
        frags = self.index.fragments
        if not frags:
            return []
        first, scale = frags[0].start, self.index.timescale
        return [(self.start + (f.start - first) / scale, f.duration / scale) for f in frags]


class DiskWriter:
    """One thread doing a worker's recording IO in the order it was asked for."""

    def __init__(self, on_error: Callable[[Path, OSError], None], max_pending: int = MAX_PENDING) -> None:
        self.on_error = on_error
        self.max_pending = max_pending
        self.pending = 0
        self.lock = threading.Lock()
        self.ops: queue.SimpleQueue[tuple[str, Path, bytes, Callable[[Path, str], None] | None] | None] = \
            queue.SimpleQueue()
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="castmesh-recorder", daemon=True)
        self.thread.start()
        PENDING.set_function(lambda: self.pending)

    def write(self, path: Path, data: bytes) -> bool:
        """Append to a file (made, with its directory, by the first write); False if too much waits already."""
        with self.lock:
            if self.pending + len(data) > self.max_pending:
                return False
            self.pending += len(data)
        self.ops.put(("write", path, data, None))
        return True

    def finish(self, path: Path, then: Callable[[Path, str], None]) -> None:
        """Close a file once what was asked before is written; then(path, why a write failed or "") on the loop."""
        self.ops.put(("finish", path, b"", then))

    async def close(self) -> None:
        self.ops.put(None)
        await asyncio.to_thread(self.thread.join, 10.0)

    def _run(self) -> None:
        files: dict[Path, int] = {}
        failed: dict[Path, str] = {}
        while (op := self.ops.get()) is not None:
            kind, path, data, then = op
            if kind == "write":
                with self.lock:
                    self.pending -= len(data)
                if path in failed:
                    continue
                try:
                    fd = files.get(path)
                    if fd is None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        fd = files[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as exc:
                    failed[path] = f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror}"
                    fd = files.pop(path, None)
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    self._call(self.on_error, path, exc)
            else:
                fd = files.pop(path, None)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if then is not None:
                    self._call(then, path, failed.pop(path, ""))
        for fd in files.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self.loop.call_soon_threadsafe(callback, *args)


class Recordings:
    """A worker's recordings: where files go, what is written now, retention, listing, and who is told."""

    def __init__(self, settings: RecordSettings, node_id: str, hooks: Hooks | None = None,
                 uploader: Any = None) -> None:
        self.settings = settings
        self.node_id = node_id
        self.hooks = hooks
        self.uploader = uploader  # services.worker.upload.Uploader, or None
        self.writing: set[Path] = set()
        self.indexes: dict[Path, tuple[int, float, Index]] = {}  # path -> (size, mtime, index)
        self.writer: DiskWriter | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.writer = DiskWriter(self._write_failed)
        self.task = asyncio.get_running_loop().create_task(self._retain())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.writer is not None:
            await self.writer.close()

    def path_for(self, app: str, name: str, start: float) -> Path:
        stamp = datetime.fromtimestamp(start, UTC).strftime(NAME_FORMAT)
        return self.settings.root / app / name / f"{stamp}{SUFFIX}"

    def _write_failed(self, path: Path, exc: OSError) -> None:
        code = errno.errorcode.get(exc.errno or 0, "error")
        WRITE_ERRORS.labels(code).inc()
        event(log, "record.write_failed", level=logging.ERROR, path=str(path), error=f"{code}: {exc.strerror}")

    def finished(self, path: Path, app: str, name: str, start: float, duration: float, size: int, error: str) -> None:
        """A file is closed: counted, and told to the hook and the uploader."""
        self.writing.discard(path)
        FILES.inc()
        event(log, "record.file", path=str(path), duration=round(duration, 3), bytes=size, error=error or None)
        if self.hooks is not None:
            self.hooks.tell("on_record_segment", {
                "app": app, "stream": name, "node": self.node_id, "path": str(path),
                "start": datetime.fromtimestamp(start, UTC).isoformat(), "duration": round(duration, 3),
                "bytes": size, "error": error})
        if self.uploader is not None and size:
            self.uploader.submit(path)

    # Listing ----------------------------------------------------------------------------------------------

    async def streams(self) -> list[dict[str, Any]]:
        """Every stream with files here: app, stream, files, bytes."""
        return await asyncio.to_thread(self._streams)

    def _streams(self) -> list[dict[str, Any]]:
        found = []
        root = self.settings.root
        for stream_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
            files = [p for p in stream_dir.iterdir() if file_start(p) is not None]
            if files:
                found.append({"app": stream_dir.parent.name, "stream": stream_dir.name, "files": len(files),
                              "bytes": sum(_size(p) for p in files)})
        return found

    async def files(self, app: str, name: str) -> list[RecordedFile]:
        """A stream's files here, oldest first, each with its fragments (a file being written: those whole)."""
        if not (safe_name(app) and safe_name(name)):
            return []
        return await asyncio.to_thread(self._files, self.settings.root / app / name)

    def _files(self, directory: Path) -> list[RecordedFile]:
        found = []
        paths = sorted(p for p in directory.glob(f"*{SUFFIX}") if file_start(p) is not None) \
            if directory.is_dir() else []
        for path in paths:
            try:
                stat = path.stat()
                cached = self.indexes.get(path)
                if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime):
                    index = cached[2]
                else:
                    with path.open("rb") as f:
                        index = read_index(lambda at, n, f=f: _read_at(f, at, n), stat.st_size)  # type: ignore[misc]
                    if len(self.indexes) >= MAX_INDEXED:
                        self.indexes.clear()
                    self.indexes[path] = (stat.st_size, stat.st_mtime, index)
            except (OSError, Mp4Error):
                continue  # removed meanwhile, or not (yet) an MP4 castmesh can read: not listed
            if not index.fragments:
                continue
            duration = sum(f.duration for f in index.fragments) / index.timescale
            found.append(RecordedFile(path, file_start(path) or 0.0, duration, index.complete, index,
                                      path in self.writing))
        return found

    # Retention --------------------------------------------------------------------------------------------

    async def _retain(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_EVERY)
            if self.settings.max_age or self.settings.max_bytes:
                try:
                    await asyncio.to_thread(self.sweep)
                except OSError as exc:
                    event(log, "record.retention_failed", level=logging.WARNING, error=str(exc))

    def sweep(self, now: float | None = None) -> list[Path]:
        """Remove what is past its age, then the oldest until the total is under max_bytes; what was removed."""
        now = time.time() if now is None else now
        files = []
        for path in self.settings.root.glob(f"*/*/*{SUFFIX}"):
            start = file_start(path)
            if start is not None and path not in self.writing:
                files.append((start, path, _size(path)))
        files.sort()
        removed = []
        total = sum(size for _, _, size in files) + sum(_size(p) for p in self.writing)
        for start, path, size in files:
            why = ""
            if self.settings.max_age and start < now - self.settings.max_age:
                why = "age"
            elif self.settings.max_bytes and total > self.settings.max_bytes:
                why = "size"
            if not why:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                REMOVED.labels(why).inc()
                event(log, "record.removed", path=str(path), why=why)
            total -= size
            self.indexes.pop(path, None)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # (only if that was its last file)
        return removed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_at(f: Any, at: int, length: int) -> bytes:
    f.seek(at)
    return bytes(f.read(length))


@dataclass(slots=True)
class _OpenFile:
    path: Path
    sequence: int
    start: float
    size: int = 0
    duration: float = 0.0
    dropped: bool = False


@dataclass(eq=False)
class RecordJob:
    """One stream recorded: follows its source, cuts it into files, hands their bytes to the disk thread."""

    job: Job
    subscribe: Callable[..., UpstreamSubscription]
    recordings: Recordings
    report: Callable[[Job], None]
    file: _OpenFile | None = None
    outputs: dict[str, Any] = field(default_factory=dict)  # (a recording publishes nothing)

    def __post_init__(self) -> None:
        spec = self.job.spec
        self.app, self.name = spec.stream.app, spec.stream.name
        seconds = spec.segment_seconds or self.recordings.settings.segment_seconds
        self.segmenter = Segmenter("fmp4", seconds * 1000, window=1, keep=0, part_ms=PART_MS,
                                   max_segment_bytes=1 << 40)
        self.closed = False

    def pids(self) -> list[int]:
        return []

    async def run(self) -> StreamEnd:
        if not (safe_name(self.app) and safe_name(self.name)):
            return StreamEnd(reason=StreamEnd.REASON_UNSPECIFIED,
                             detail=f"{self.app}/{self.name} cannot be a directory name")
        self.job.state, self.job.detail = Job.STATE_RUNNING, ""
        self.report(self.job)
        subscription = self.subscribe(self.job.spec.stream, self._on_header, self._on_frames)
        try:
            return await subscription.run()
        finally:
            self._end()

    def close(self, clean: bool, reason: str) -> None:
        self._end()

    def _on_header(self, header: StreamHeader, new_timeline: bool) -> None:
        if new_timeline:
            self.segmenter.mark_discontinuity()
        self.segmenter.has_video = header.has_video or header.HasField("video_config")
        self.segmenter.has_audio = header.has_audio or header.HasField("audio_config")
        self._on_frames(header_frames(header))

    def _on_frames(self, frames: list[Frame]) -> None:
        if self.closed:
            return
        for frame in frames:  # a track the header did not know of yet (its configuration came later)
            if frame.sequence_header:
                if frame.kind == VIDEO:
                    self.segmenter.has_video = True
                elif frame.kind == AUDIO:
                    self.segmenter.has_audio = True
        try:
            done = self.segmenter.push(frames)
        except HlsError as exc:  # (fMP4 takes every codec the cluster carries: a bug if it ever comes here)
            event(log, "record.error", level=logging.ERROR, job=self.job.id, error=str(exc))
            return
        self._write(done)

    def _write(self, done: list[Segment]) -> None:
        writer = self.recordings.writer
        assert writer is not None
        for segment in done:
            if self.file is None or self.file.sequence != segment.sequence:
                self._open(segment.sequence, segment.init, segment.started_at)
            self._append(segment.data)
            assert self.file is not None
            self.file.duration = segment.duration
            self._finish()
        self.segmenter.segments.clear()  # written: nothing of them is kept here
        current = self.segmenter.open
        if current is None:
            return
        if self.file is None or self.file.sequence != current.sequence:
            self._open(current.sequence, current.init, current.started_at)
        for part in self.segmenter.take_parts():
            self._append(part)

    def _open(self, sequence: int, init_version: int, started_at: float) -> None:
        if self.file is not None:
            self._finish()
        path = self.recordings.path_for(self.app, self.name, started_at)
        self.file = _OpenFile(path, sequence, started_at)
        self.recordings.writing.add(path)
        event(log, "record.open", job=self.job.id, path=str(path))
        self._append(self.segmenter.inits[init_version])

    def _append(self, data: bytes) -> None:
        file, writer = self.file, self.recordings.writer
        if file is None or writer is None or not data:
            return
        if writer.write(file.path, data):
            file.size += len(data)
            BYTES.inc(len(data))
            return
        DROPPED.inc(len(data))
        if not file.dropped:
            file.dropped = True
            event(log, "record.behind", level=logging.WARNING, path=str(file.path),
                  detail=f"the disk is {MAX_PENDING >> 20} MiB behind: fragments dropped")

    def _finish(self) -> None:
        file, writer = self.file, self.recordings.writer
        self.file = None
        if file is None or writer is None:
            return

        def then(path: Path, error: str) -> None:
            self.recordings.finished(path, self.app, self.name, file.start, file.duration, file.size, error)

        writer.finish(file.path, then)

    def _end(self) -> None:
        """The source ended or the job stops: the open file gets what was gathered, and is closed."""
        if self.closed:
            return
        self.closed = True
        last = self.segmenter.finish()
        if last is not None:
            self._write([last])
        self._finish()
