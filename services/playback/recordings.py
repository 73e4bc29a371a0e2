"""Recordings played back: what a playback node serves of the files workers recorded (services.worker.record),
read through a RecordingSource (services.worker.recordings: this process's worker in `castmesh up`, every
worker's HTTP port in a cluster).

  /recordings/{app}/{stream}.m3u8?start=&end=   an HLS VOD playlist (EXT-X-PLAYLIST-TYPE:VOD) of that span
  /recordings/{app}/{stream}.mp4?start=&end=    one MP4 of that span, to download
  /recordings/{app}/{stream}/{worker}/{file}    a file's bytes (with Range)
  .../{worker}/{file}/{offset}-{length}.m4s      some of them: the playlist's initialization segments and segments
  /api/recordings                               the player page's list: each stream's recorded spans

start and end are seconds since the epoch or ISO 8601 times (`duration=` in seconds may stand for end); left
out, the span runs from the first recording or to the last. A span begins at the last keyframe at or
before `start` (so that it can be decoded) and ends with the fragment that holds `end`.

The playlist names each file's initialization segment and segments as slices of the file, each its own URL
(not EXT-X-BYTERANGE: ffmpeg asks for a byte range to the file's end and then sends its next request on the
same connection before reading that answer to its end), a segment running from a keyframe to the next
fragment that starts with one past SEGMENT_TARGET seconds. A gap (a worker that died, a publisher that
stopped) is an EXT-X-DISCONTINUITY.

The MP4 is fragmented MP4 (what ffmpeg, browsers and players open as any MP4): the first file's
initialization segment and the span's fragments, each file's times moved so that the whole has one timeline
with no gaps (castmesh.media.fmp4.shift_times). It stops before a file whose codec configuration differs from
the first's. Its size is known before the first byte, so it is sent with a Content-Length, at the pace the
client reads (never more than HIGH_WATER bytes ahead of it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from async_lru import alru_cache

from castmesh.media import fmp4
from castmesh.mesh.logs import event
from services.playback.http import NO_CACHE, Request
from services.worker.recordings import GAP, Piece, RecordingSource, overlapping, spans

log = logging.getLogger("castmesh.playback")

SEGMENT_TARGET = 2.0  # seconds: a VOD segment ends at the first keyframe past this
HIGH_WATER = 1 << 20  # bytes a download may have waiting for its client
MAX_RANGE = 64 << 20  # bytes of a file answered at once (a range asked for, or a whole file)
MAX_LISTED = 100  # streams the player page's listing names (and whose files are kept a moment)
LISTED_FOR = 1.0  # seconds a stream's listing of files is used again


class SpanError(ValueError):
    """start, end or duration that do not say a time."""


def when(text: str) -> float:
    """Seconds since the epoch, from those or from an ISO 8601 time (UTC if it names no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SpanError(f"{text!r} is neither seconds since the epoch nor an ISO 8601 time") from None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def span(query: dict[str, str]) -> tuple[float | None, float | None]:
    start = when(query["start"]) if query.get("start") else None
    end = when(query["end"]) if query.get("end") else None
    if query.get("duration"):
        if start is None:
            raise SpanError("duration needs a start")
        try:
            end = start + float(query["duration"])
        except ValueError:
            raise SpanError(f"duration {query['duration']!r} is not seconds") from None
    if start is not None and end is not None and end <= start:
        raise SpanError("the span ends before it starts")
    return start, end


@dataclass(frozen=True, slots=True)
class Cut:
    """The fragments of one file that a span takes: fragments[first:last]."""

    piece: Piece
    first: int
    last: int

    @property
    def fragments(self) -> tuple[tuple[int, int, float, float, bool], ...]:
        return self.piece.fragments[self.first:self.last]

    @property
    def size(self) -> int:
        return sum(size for _, size, _, _, _ in self.fragments)


def cuts(pieces: list[Piece], start: float | None, end: float | None) -> list[Cut]:
    """What of each file a span takes: from the last keyframe at or before start, to the fragment holding end.
    A file that begins before the one ahead of it ended (a worker that took over a recording began at the
    GOP its relay had cached) is taken from its first keyframe past that end: nothing is played twice."""
    found: list[Cut] = []
    covered = start
    for piece in overlapping(pieces, start, end):
        frags = piece.fragments
        first = 0
        if covered is not None:
            inside = [i for i, f in enumerate(frags) if f[2] + f[3] > covered]
            if not inside:
                continue
            first = inside[0]
            if found:  # the rest of an overlap: forward to a keyframe
                first = next((i for i in inside if frags[i][4]), len(frags))
            else:  # the span's start: back to a keyframe
                while first > 0 and not frags[first][4]:
                    first -= 1
        last = len(frags)
        if end is not None:
            last = next((i for i, f in enumerate(frags) if f[2] >= end), len(frags))
        if last > first:
            found.append(Cut(piece, first, last))
            covered = frags[last - 1][2] + frags[last - 1][3] - GAP / 2
    return found


def playlist(app: str, name: str, chosen: list[Cut]) -> str:
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-PLAYLIST-TYPE:VOD", "#EXT-X-MEDIA-SEQUENCE:0"]
    body: list[str] = []
    longest, previous = 1.0, None
    for cut in chosen:
        uri = f"{name}/{cut.piece.worker}/{cut.piece.file}"
        frags = cut.fragments
        if previous is not None and abs(frags[0][2] - previous) > GAP:
            body.append("#EXT-X-DISCONTINUITY")
        body.append(f'#EXT-X-MAP:URI="{uri}/0-{cut.piece.init_size}.m4s"')
        body.append(f"#EXT-X-PROGRAM-DATE-TIME:{_iso(frags[0][2])}")
        group: list[tuple[int, int, float, float, bool]] = []
        for frag in [*frags, None]:
            if group and (frag is None or (frag[4] and sum(f[3] for f in group) >= SEGMENT_TARGET)):
                duration = sum(f[3] for f in group)
                longest = max(longest, duration)
                body += [f"#EXTINF:{duration:.3f},", f"{uri}/{group[0][0]}-{sum(f[1] for f in group)}.m4s"]
                group = []
            if frag is not None:
                group.append(frag)
        previous = frags[-1][2] + frags[-1][3]
    lines.append(f"#EXT-X-TARGETDURATION:{math.ceil(longest)}")
    return "\n".join([*lines, *body, "#EXT-X-ENDLIST", ""])


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RecordingRoutes:
    """A playback node's /recordings/... paths."""

    def __init__(self, source: RecordingSource) -> None:
        self.source = source
        # A stream's files, asked of the workers at most once a second whoever asks (every playlist and every
        # segment of every viewer needs them; errors are not kept): a listing at most LISTED_FOR old.
        self.files = alru_cache(maxsize=MAX_LISTED, ttl=LISTED_FOR)(source.files)

    async def close(self) -> None:
        await self.files.cache_close()

    async def listing(self, session: Any) -> None:
        """/api/recordings, for the player page: each stream's recorded spans, newest stream first."""
        try:
            streams = (await self.source.streams())[:MAX_LISTED]
            files = await asyncio.gather(*(self.files(s["app"], s["stream"]) for s in streams))
        except OSError as exc:
            session.respond(502, f"recordings could not be listed: {exc}\n".encode(), [NO_CACHE])
            return
        listed = [{"app": s["app"], "stream": s["stream"], "bytes": s["bytes"],
                   "spans": [{"start": round(a, 3), "end": round(b, 3)} for a, b in spans(pieces)]}
                  for s, pieces in zip(streams, files, strict=True) if pieces]
        listed.sort(key=lambda item: -item["spans"][-1]["end"])
        session.respond(200, json.dumps({"recordings": listed}).encode(),
                        [("Content-Type", "application/json"), NO_CACHE])

    async def answer(self, session: Any, request: Request, app: str, name: str, rest: str) -> None:
        try:
            if rest in (".m3u8", ".mp4"):
                start, end = span(request.query)
                chosen = cuts(await self.files(app, name), start, end)
                if not chosen:
                    session.respond(404, f"no recording of {app}/{name} in that span\n".encode(), [NO_CACHE])
                elif rest == ".m3u8":
                    session.respond(200, playlist(app, name, chosen).encode(),
                                    [("Content-Type", "application/vnd.apple.mpegurl"), NO_CACHE])
                else:
                    await self._download(session, app, name, chosen)
                return
            worker, file, *piece = rest.removeprefix("/").split("/")
            await self._file(session, request, app, name, worker, file, piece[0] if piece else "")
        except SpanError as exc:
            session.respond(400, f"{exc}\n".encode(), [NO_CACHE])
        except (OSError, EOFError, fmp4.Mp4Error) as exc:  # (a file removed meanwhile, a worker gone)
            event(log, "recording.unreadable", level=logging.WARNING, stream=f"{app}/{name}", error=str(exc))
            if not session.streaming:
                session.respond(502, f"the recording could not be read: {exc}\n".encode(), [NO_CACHE])
            else:
                session.end()  # cut short: the client sees fewer bytes than the Content-Length said

    async def _file(self, session: Any, request: Request, app: str, name: str, worker: str, file: str,
                    part: str) -> None:
        """A file's bytes: all of them, a Range of them, or the slice `part` names ("OFFSET-LENGTH.m4s")."""
        piece = next((p for p in await self.files(app, name) if p.worker == worker and p.file == file), None)
        if piece is None:
            session.respond(404, b"no such recording\n", [NO_CACHE])
            return
        first, last = 0, piece.size - 1
        ranged = request.headers.get("range", "") if not part else ""
        if part:
            offset, _, count = part.removesuffix(".m4s").partition("-")
            first, last = int(offset), int(offset) + int(count) - 1
            if not 0 <= first <= last < piece.size:
                session.respond(404, b"no such part of the recording\n", [NO_CACHE])
                return
        if ranged:
            unit, _, spec = ranged.partition("=")
            low, _, high = spec.partition("-")
            try:
                if unit.strip() != "bytes" or "," in spec:
                    raise ValueError
                first, last = (int(low), int(high) if high else piece.size - 1) if low else \
                    (piece.size - int(high), piece.size - 1)
            except ValueError:
                session.respond(416, b"one byte range, please\n", [("Content-Range", f"bytes */{piece.size}")])
                return
            last = min(last, piece.size - 1)
            if first < 0 or first > last:
                session.respond(416, b"outside the file\n", [("Content-Range", f"bytes */{piece.size}")])
                return
        length = last - first + 1
        if length > MAX_RANGE:
            session.respond(416, f"at most {MAX_RANGE} bytes at once: ask with Range\n".encode(),
                            [("Content-Range", f"bytes */{piece.size}")])
            return
        body = b"".join([chunk async for chunk in self.source.read(app, name, piece, first, length)])
        headers = [("Content-Type", "video/mp4"), ("Accept-Ranges", "bytes"), CACHE_FOR_WRITTEN
                   if part or not piece.writing else NO_CACHE]
        if ranged:
            headers.append(("Content-Range", f"bytes {first}-{last}/{piece.size}"))
        session.respond(206 if ranged else 200, body, headers)

    async def _download(self, session: Any, app: str, name: str, chosen: list[Cut]) -> None:
        init = b"".join([c async for c in self.source.read(app, name, chosen[0].piece, 0, chosen[0].piece.init_size)])
        scales = fmp4.track_timescales(init)
        taken = [chosen[0]]
        for cut in chosen[1:]:
            other = b"".join([c async for c in self.source.read(app, name, cut.piece, 0, cut.piece.init_size)])
            if other != init:
                event(log, "recording.download_cut", stream=f"{app}/{name}", at=cut.piece.file,
                      reason="its codec configuration differs from the first file's")
                break
            taken.append(cut)
        length = len(init) + sum(cut.size for cut in taken)
        stamp = datetime.fromtimestamp(taken[0].fragments[0][2], UTC).strftime("%Y%m%d-%H%M%S")
        headers = [("Content-Type", "video/mp4"), NO_CACHE,
                   ("Content-Disposition", f'attachment; filename="{app}-{name}-{stamp}.mp4"')]
        if not session.begin(200, headers, length):
            return
        if not await _send(session, init):
            return
        timeline = None  # where the download's pacing track is: seconds, from its first fragment
        for cut in taken:
            shift = 0.0
            pace = cut.fragments[0][2]
            if timeline is not None and abs(pace - timeline) > GAP:
                shift = timeline - pace  # this file does not continue the last: moved to where it ended
            async for fragment in self._fragments(app, name, cut):
                moof_size = int.from_bytes(fragment[:4], "big")
                if shift:
                    moved = fmp4.shift_times(fragment[:moof_size], {t: round(shift * s) for t, s in scales.items()})
                    fragment = moved + fragment[moof_size:]
                if not await _send(session, fragment):
                    return
            last = cut.fragments[-1]
            timeline = last[2] + last[3] + shift
        session.end()

    async def _fragments(self, app: str, name: str, cut: Cut) -> AsyncIterator[bytes]:
        """The cut's fragments, one at a time, read as one range of its file."""
        frags = cut.fragments
        sizes = iter([size for _, size, _, _, _ in frags])
        want = next(sizes)
        buffer = bytearray()
        async for chunk in self.source.read(app, name, cut.piece, frags[0][0], cut.size):
            buffer += chunk
            while want and len(buffer) >= want:
                yield bytes(buffer[:want])
                del buffer[:want]
                want = next(sizes, 0)


CACHE_FOR_WRITTEN = ("Cache-Control", "max-age=3600")  # a finished file's bytes never change


async def _send(session: Any, data: bytes) -> bool:
    """Write, then wait while the client is more than HIGH_WATER behind; False once it is gone."""
    if session.done:
        return False
    session.transport.write(data)
    while session.transport.get_write_buffer_size() > HIGH_WATER:
        if session.done:
            return False
        await asyncio.sleep(0.01)
    return not session.done
