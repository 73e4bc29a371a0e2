"""Recordings as the rest of the cluster sees them: every worker's files of a stream, listed with their
fragments, and their bytes read, whichever worker wrote them.

A worker serves its own on its HTTP port (routes()): GET /recordings (the streams it has files of),
/recordings/{app}/{stream} (its files, with each fragment's place and time; ?start=&end= in seconds since the
epoch narrow it) and /recordings/{app}/{stream}/{file} (the bytes, with Range). Playback nodes and the
gateway read them through a RecordingSource: LocalRecordings in `castmesh up`, where the worker is in the
same process, RemoteRecordings in a cluster, which asks every worker with an HTTP port and merges what they
say (a worker that does not answer within TIMEOUT is left out of that answer, and said to be). Workers may
share one directory (a volume): a file they all list is listed once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from castmesh.mesh.logs import event
from castmesh.proto.v1.dispatch_pb2 import Node
from services.worker.record import RecordedFile, Recordings, file_start, safe_name

log = logging.getLogger("castmesh.recordings")

TIMEOUT = 5.0  # seconds a worker has to list its files
READ_CHUNK = 1 << 20
MAX_LISTING = 64 << 20  # bytes of one worker's listing
FILE_NAME = re.compile(r"^\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}\.mp4$")


@dataclass(frozen=True, slots=True)
class Piece:
    """One recording file, as listed: where it is and what time its whole fragments cover."""

    worker: str
    file: str
    start: float  # seconds since the epoch
    duration: float
    size: int  # bytes up to the end of its last whole fragment
    init_size: int
    writing: bool
    fragments: tuple[tuple[int, int, float, float, bool], ...]  # (offset, size, start, duration, independent)

    @property
    def end(self) -> float:
        return self.start + self.duration

    def json(self, fragments: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker, "file": self.file, "start": round(self.start, 6),
                               "duration": round(self.duration, 6), "bytes": self.size, "init": self.init_size,
                               "writing": self.writing}
        if fragments:
            out["fragments"] = [[o, s, round(t, 6), round(d, 6), i] for o, s, t, d, i in self.fragments]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Piece:
        return cls(str(data["worker"]), str(data["file"]), float(data["start"]), float(data["duration"]),
                   int(data["bytes"]), int(data["init"]), bool(data["writing"]),
                   tuple((int(o), int(s), float(t), float(d), bool(i)) for o, s, t, d, i in data["fragments"]))

    @classmethod
    def of(cls, worker: str, recorded: RecordedFile) -> Piece:
        times = recorded.fragment_times()
        frags = tuple((f.offset, f.size, t, d, f.independent)
                      for f, (t, d) in zip(recorded.index.fragments, times, strict=True))
        return cls(worker, recorded.path.name, recorded.start, recorded.duration, recorded.size,
                   recorded.index.init_size, recorded.writing, frags)


GAP = 0.25  # seconds between two files past which they do not continue each other


def overlapping(pieces: list[Piece], start: float | None, end: float | None) -> list[Piece]:
    return [p for p in pieces if (start is None or p.end > start) and (end is None or p.start < end)]


def spans(pieces: list[Piece]) -> list[tuple[float, float]]:
    """(start, end) of the times recorded: files that follow one another (within GAP) make one span."""
    found: list[tuple[float, float]] = []
    for piece in sorted(pieces, key=lambda p: p.start):
        if found and piece.start - found[-1][1] <= GAP:
            found[-1] = (found[-1][0], max(found[-1][1], piece.end))
        else:
            found.append((piece.start, piece.end))
    return found


class RecordingSource(Protocol):
    async def streams(self) -> list[dict[str, Any]]: ...

    async def files(self, app: str, name: str) -> list[Piece]: ...

    def read(self, app: str, name: str, piece: Piece, offset: int, length: int) -> AsyncIterator[bytes]: ...


class LocalRecordings:
    """A worker's recordings read in its own process (`castmesh up`)."""

    def __init__(self, recordings: Recordings, worker: str) -> None:
        self.recordings = recordings
        self.worker = worker

    async def streams(self) -> list[dict[str, Any]]:
        return await self.recordings.streams()

    async def files(self, app: str, name: str) -> list[Piece]:
        return [Piece.of(self.worker, f) for f in await self.recordings.files(app, name)]

    async def read(self, app: str, name: str, piece: Piece, offset: int, length: int) -> AsyncIterator[bytes]:
        if piece.worker != self.worker or not FILE_NAME.match(piece.file):
            raise FileNotFoundError(piece.file)
        path = self.recordings.settings.root / app / name / piece.file
        with path.open("rb") as f:
            f.seek(offset)
            while length > 0:
                chunk = await asyncio.to_thread(f.read, min(READ_CHUNK, length))
                if not chunk:
                    raise EOFError(f"{piece.file} ended {length} bytes early")
                length -= len(chunk)
                yield chunk


class RemoteRecordings:
    """Every worker's recordings, over their HTTP ports."""

    def __init__(self, workers: Callable[[], Awaitable[list[Node]]]) -> None:
        self.workers = workers
        self.http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT,
                                                                            sock_read=TIMEOUT))
        return self.http

    async def _ask(self, path: str) -> list[tuple[Node, Any]]:
        nodes = [w for w in await self.workers() if w.meta.get("http")]

        async def one(node: Node) -> tuple[Node, Any]:
            try:
                async with asyncio.timeout(TIMEOUT), self._session().get(base_url(node) + path) as answer:
                    if answer.status == 404:
                        return node, None
                    answer.raise_for_status()
                    return node, await answer.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                event(log, "recordings.unlisted", level=logging.WARNING, worker=node.id,
                      error=str(exc) or type(exc).__name__)
                return node, None

        return [(node, data) for node, data in await asyncio.gather(*(one(n) for n in nodes)) if data is not None]

    async def streams(self) -> list[dict[str, Any]]:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for _, data in await self._ask("/recordings"):
            for item in data.get("streams", []):
                entry = merged.setdefault((item["app"], item["stream"]),
                                          {"app": item["app"], "stream": item["stream"], "files": 0, "bytes": 0})
                entry["files"] += int(item["files"])
                entry["bytes"] += int(item["bytes"])
        return [merged[k] for k in sorted(merged)]

    async def files(self, app: str, name: str) -> list[Piece]:
        if not (safe_name(app) and safe_name(name)):
            return []
        pieces: dict[str, Piece] = {}
        for _, data in await self._ask(f"/recordings/{app}/{name}"):
            for item in data.get("files", []):
                piece = Piece.from_json(item)
                seen = pieces.get(piece.file)
                if seen is None or (piece.writing and not seen.writing):  # workers sharing one directory all
                    pieces[piece.file] = piece  # list its files: once, as the one writing it says
        return sorted(pieces.values(), key=lambda p: p.start)

    async def read(self, app: str, name: str, piece: Piece, offset: int, length: int) -> AsyncIterator[bytes]:
        node = next((w for w in await self.workers() if w.id == piece.worker and w.meta.get("http")), None)
        if node is None or not FILE_NAME.match(piece.file):
            raise FileNotFoundError(f"{piece.worker}/{piece.file}")
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        async with self._session().get(f"{base_url(node)}/recordings/{app}/{name}/{piece.file}",
                                       headers=headers) as answer:
            if answer.status not in (200, 206):
                raise FileNotFoundError(f"{piece.worker}/{piece.file}: {answer.status}")
            async for chunk in answer.content.iter_chunked(READ_CHUNK):
                yield chunk

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()


def base_url(node: Node) -> str:
    return f"http://{node.address.rpartition(':')[0]}:{node.meta['http']}"


def routes(app: web.Application, recordings: Recordings, worker: str) -> None:
    """A worker's recordings on its HTTP port."""

    async def streams(request: web.Request) -> web.Response:
        return web.json_response({"worker": worker, "streams": await recordings.streams()})

    async def files(request: web.Request) -> web.Response:
        app_name, name = request.match_info["app"], request.match_info["stream"]
        try:
            start = float(request.query["start"]) if "start" in request.query else None
            end = float(request.query["end"]) if "end" in request.query else None
        except ValueError:
            return web.json_response({"error": "start and end are seconds since the epoch"}, status=400)
        pieces = overlapping([Piece.of(worker, f) for f in await recordings.files(app_name, name)], start, end)
        return web.json_response({"worker": worker, "files": [p.json() for p in pieces]})

    async def file(request: web.Request) -> web.StreamResponse:
        app_name, name, file_name = (request.match_info[k] for k in ("app", "stream", "file"))
        path = recordings.settings.root / app_name / name / file_name
        if not (safe_name(app_name) and safe_name(name) and FILE_NAME.match(file_name)) or file_start(path) is None \
                or not path.is_file():
            raise web.HTTPNotFound(text="no such recording\n")
        return web.FileResponse(path, headers={"Content-Type": "video/mp4", "Cache-Control": "no-cache"})

    app.router.add_get("/recordings", streams)
    app.router.add_get(r"/recordings/{app:[A-Za-z0-9_.~-]{1,128}}/{stream:[A-Za-z0-9_.~-]{1,256}}", files)
    app.router.add_get(r"/recordings/{app:[A-Za-z0-9_.~-]{1,128}}/{stream:[A-Za-z0-9_.~-]{1,256}}/{file}", file)
