"""HLS on a playback node: one muxer per stream and container, a viewer of the stream's StreamFeed like
any other (its sink, taking frames where a socket takes bytes), answering playlist and segment requests
from memory.

A muxer exists only while someone asks for it: the first playlist request starts it (from the feed's GOP
cache, so the first segment begins at once), and it stops after `idle` seconds without a request, which
lets the feed drop its upstream subscription when nobody else watches. A playlist request that arrives
before the first segment is complete waits for it, as long as about three target durations.

Segment names carry the muxer's id, so a name always means the same bytes and segments can be cached.

Low-latency HLS (container "llhls": fMP4 with parts, castmesh.media.hls) names segments and parts by
their media sequence number alone, numbered from ingest's clock (no muxer or session id: any node
serving the stream answers the same URLs), and holds blocking requests: a playlist request with
_HLS_msn/_HLS_part, or a part named by a preload hint, waits until that part exists. Waiting requests are
kept by what they wait for and woken together when a part completes; one timer ends those that waited
three target durations (503), and one asking too far ahead is refused at once (400), per RFC 8216bis.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from castmesh.media.gop import GopCache
from castmesh.media.hls import HlsError, Segmenter
from castmesh.mesh.logs import event
from castmesh.proto.v1.media_pb2 import Frame
from services.playback.feed import BYTES_OUT
from services.playback.formats import HLS_FRAMES, start_frames

if TYPE_CHECKING:
    from services.playback.viewer import Viewer

log = logging.getLogger("castmesh.playback")

MUXERS = Gauge("castmesh_playback_hls_muxers", "HLS muxers running")
SEGMENTS = Counter("castmesh_playback_hls_segments", "HLS segments made")
HLS_REQUESTS = Counter("castmesh_playback_hls_requests", "HLS playlist and segment requests", ["kind"])
PLAYLIST_REQUESTS, SEGMENT_REQUESTS = HLS_REQUESTS.labels("playlist"), HLS_REQUESTS.labels("segment")
CLIENT_WINDOW = 3  # target durations: a client that fetched a playlist within this is counted as watching
LL_WINDOW = 10  # segments a low-latency playlist lists, so that delta updates (six target durations) skip some
MAX_BLOCKED = 100_000  # per muxer: requests held for a part (past this, 503 at once)
HOLD_FOR = 3.0  # target durations a blocking request is held before a 503 (RFC 8216bis 6.2.5.2)
MAX_CLIENTS = 100_000  # per muxer: clients remembered for the viewer count (the oldest go first)

Answer = Callable[[int, bytes, str], None]  # status, body, reason (or Content-Type, for a file)
Want = tuple[int, int]  # (media sequence number, part index; -1: the whole segment), or (-1, part number)


class HlsMuxer:
    def __init__(self, path: str, container: str, target_ms: int, window: int, idle: float,
                 on_stop: Callable[[HlsMuxer], None], part_ms: int = 200) -> None:
        low_latency = container == "llhls"
        self.id = "ll" if low_latency else secrets.token_hex(4)
        self.transport = self  # its output is its own memory, which never falls behind
        self.format = HLS_FRAMES
        self.viewer: Viewer | None = None
        self.path = path
        self.container = container
        self.segmenter = (Segmenter("fmp4", target_ms, max(window, LL_WINDOW), part_ms=part_ms) if low_latency
                          else Segmenter(container, target_ms, window))
        self.blocked: dict[Want, list[Callable[[], None]]] = {}  # by what they wait for
        self.deadlines: deque[tuple[float, Want, Callable[[], None]]] = deque()  # the same, oldest first
        self.deadline_handle: asyncio.TimerHandle | None = None
        self.refusals: dict[Callable[[], None], Callable[[int, str], None]] = {}  # held request -> its refusal
        self.idle = idle
        self.on_stop = on_stop
        self.waiters: list[Answer] = []
        self.rendered: dict[tuple[str, str, bool], bytes] = {}  # (prefix, suffix, skip): until it changes
        self.clients: OrderedDict[str, float] = OrderedDict()  # client -> last playlist request, oldest first
        self.last_request = time.monotonic()
        # requests and bytes served since the metrics were last told (once per part or segment, and at the
        # end: an LL-HLS client makes two requests per part, so the metrics are not touched per request)
        self.playlists_asked = self.files_asked = self.bytes_sent = 0
        self.stopped = False
        self.ended = ""
        self.end_status = 404
        self.idle_handle = asyncio.get_running_loop().call_later(idle, self._check_idle)
        MUXERS.inc()
        event(log, "hls.start", stream=path, muxer=self.id, container=container)

    # The feed's viewer --------------------------------------------------------------------------------

    def start(self, cache: GopCache) -> bool:
        """The stream is live: what it carries is in `cache`, with the current GOP."""
        self.segmenter.has_video, self.segmenter.has_audio = cache.has_video, cache.has_audio
        self.write(start_frames(cache))
        return not self.stopped

    def write(self, frames: list[Frame]) -> None:
        changes = self.segmenter.changes
        try:
            done = self.segmenter.push(frames)
        except HlsError as exc:
            self.end(str(exc), 415)
            return
        if self.segmenter.changes == changes:
            return
        self._count()
        self.rendered.clear()  # the playlist only changes when a part or a segment completes
        if done:
            SEGMENTS.inc(len(done))
            waiters, self.waiters = self.waiters, []
            for answer in waiters:
                answer(200, b"", "")
        if self.blocked:
            self._wake()

    def discontinuity(self) -> None:
        self.segmenter.mark_discontinuity()

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.stop("dropped by its feed")

    def refuse(self, status: int, reason: str) -> None:
        self.end(reason, status)

    def finish(self, reason: str) -> None:
        self.end(reason, 0)

    def end(self, reason: str, status: int) -> None:
        """The stream ended: waiting requests get `status` (404 when it never started); the muxer goes."""
        self.ended, self.end_status = reason, status or 404
        waiters, self.waiters = self.waiters, []
        for answer in waiters:
            answer(self.end_status, b"", reason)
        self.stop(reason)
        self._release_blocked()

    # Blocking requests (low-latency HLS) ----------------------------------------------------------------

    @property
    def blocked_count(self) -> int:
        """Requests held now (each has its refusal waiting)."""
        return len(self.refusals)

    def _has(self, want: Want) -> bool:
        msn, part = want
        if msn < 0:  # a part by its number
            return part < self.segmenter.next_part
        latest_msn, latest_part = self.segmenter.latest()
        return msn < latest_msn or (part >= 0 and msn == latest_msn and part <= latest_part)

    def _too_far(self, want: Want) -> str:
        """Why a request for `want` is refused at once (RFC 8216bis 6.2.5.2), or ""."""
        msn, part = want
        limit = round(3 / self.segmenter.part_target) if self.segmenter.part_target < 1 else 3  # Advance Part Limit
        if msn < 0:
            ahead = part - self.segmenter.next_part + 1
            return f"part {part} is more than {limit} parts ahead" if ahead > limit else ""
        latest_msn, latest_part = self.segmenter.latest()
        if msn > latest_msn + 1:  # the last complete segment is latest_msn - 1: more than two past it
            return f"_HLS_msn={msn} is more than two segments past the last one ({latest_msn - 1})"
        ahead = part - latest_part if msn == latest_msn else part + 1  # the next segment: at least part + 1
        if part >= 0 and msn >= latest_msn and ahead > limit:
            return f"part {msn}.{part} is more than {limit} parts past the last one ({latest_msn}.{latest_part})"
        return ""

    def _hold(self, want: Want, then: Callable[[], None], refuse: Callable[[int, str], None]) -> None:
        """Call `then` once `want` exists; refuse(503) if it does not within three target durations."""
        if self.blocked_count >= MAX_BLOCKED:
            refuse(503, "too many requests waiting for this stream")
            return
        self.blocked.setdefault(want, []).append(then)
        self.refusals[then] = refuse
        patience = HOLD_FOR * self.segmenter.target_duration
        self.deadlines.append((time.monotonic() + patience, want, then))
        if self.deadline_handle is None:
            self.deadline_handle = asyncio.get_running_loop().call_later(patience, self._expire)

    def _wake(self) -> None:
        """A part or segment completed: answer everyone waiting for what exists now."""
        for want in [w for w in self.blocked if self._has(w)]:
            for then in self.blocked.pop(want):
                self.refusals.pop(then, None)
                then()
        deadlines = self.deadlines  # those answered leave the front now, not when its deadline comes
        while deadlines and deadlines[0][2] not in self.refusals:
            deadlines.popleft()

    def _expire(self) -> None:
        """The one timer for all held requests: end those past their deadline, then sleep until the next."""
        now = time.monotonic()
        deadlines = self.deadlines
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2] not in self.refusals):
            _, want, then = deadlines.popleft()
            refuse = self.refusals.pop(then, None)
            if refuse is not None:
                waiting = self.blocked.get(want, [])
                if then in waiting:
                    waiting.remove(then)
                    if not waiting:
                        del self.blocked[want]
                refuse(503, f"not there within {HOLD_FOR * self.segmenter.target_duration:g}s")
        self.deadline_handle = (asyncio.get_running_loop().call_later(deadlines[0][0] - now, self._expire)
                                if deadlines else None)

    def _release_blocked(self) -> None:
        refusals, self.refusals = self.refusals, {}
        for refuse in refusals.values():
            refuse(self.end_status, self.ended or "stream ended")
        self.blocked.clear()
        self.deadlines.clear()
        if self.deadline_handle is not None:
            self.deadline_handle.cancel()
            self.deadline_handle = None

    # Requests -------------------------------------------------------------------------------------------

    def playlist(self, prefix: str, client: str, answer: Answer, wait: bool = True, suffix: str = "",
                 want: Want | None = None, skip: bool = False) -> None:
        """Answer with the playlist now, or once the first segment is done; with `want` (a blocking reload:
        _HLS_msn and _HLS_part), once that segment or part exists; `skip`: a delta update."""
        now = self.last_request = time.monotonic()
        self.clients[client] = now
        self.clients.move_to_end(client)
        self._forget_clients(now)
        self.playlists_asked += 1
        if want is not None and self.segmenter.part_ms and self.segmenter.segments and not self._has(want):
            refused = self._too_far(want)
            if refused:
                answer(400, b"", refused)
            else:

                def then() -> None:
                    self._render(prefix, suffix, skip, answer)

                self._hold(want, then, lambda status, reason: answer(status, b"", reason))
            return
        body = self._render(prefix, suffix, skip)
        if body:
            answer(200, body, "")
        elif self.ended or self.stopped:
            answer(self.end_status, b"", self.ended or "stream ended")
        elif wait:
            patience = max(10.0, 3 * self.segmenter.target_ms / 1000)

            def ready(status: int, body: bytes, reason: str) -> None:
                timer.cancel()
                if status == 200:
                    self.playlist(prefix, client, answer, wait=False, suffix=suffix)
                else:
                    answer(status, b"", reason)

            def expire() -> None:
                if ready in self.waiters:
                    self.waiters.remove(ready)
                answer(504, b"", f"no complete segment within {patience:g}s")

            timer = asyncio.get_running_loop().call_later(patience, expire)
            self.waiters.append(ready)
        else:
            answer(503, b"", "no segment yet")

    def _render(self, prefix: str, suffix: str, skip: bool, answer: Answer | None = None) -> bytes:
        """The playlist as it is now (made once per change and URL form, whoever asks); given `answer`,
        answered with it."""
        key = (prefix, suffix, skip)
        body = self.rendered.get(key)
        if body is None:
            body = self.rendered[key] = self.segmenter.playlist(prefix, suffix, skip).encode()
        if answer is not None:
            answer(200, body, "")
        return body

    def fetch(self, name: str, answer: Answer) -> None:
        """A segment, part or initialization segment by name: answer(200, bytes, Content-Type), or 404. A part
        that is not there yet but soon will be (a preload hint names it) is answered once it is."""
        found = self.file(name)
        if found is not None:
            self.bytes_sent += len(found[0])
            answer(200, *found)
            return
        number = name[5:-4]
        if self.segmenter.part_ms and name.startswith("part-") and name.endswith(".m4s") and number.isdigit():
            want = (-1, int(number))
            if not self._has(want) and not self._too_far(want) and not self.stopped:

                def then() -> None:
                    found = self.file(name)
                    if found is None:
                        answer(404, b"", "that part was never made")
                        return
                    self.bytes_sent += len(found[0])
                    answer(200, *found)

                self._hold(want, then, lambda status, reason: answer(status, b"", reason))
                return
        answer(404, b"", "no such segment (it may have left the window)")

    def file(self, name: str) -> tuple[bytes, str] | None:
        """A segment or initialization segment by name, with its Content-Type."""
        self.last_request = time.monotonic()
        self.files_asked += 1
        stem, _, extension = name.partition(".")
        if extension == "mp4" and stem.startswith("init-") and stem[5:].isdigit():
            init = self.segmenter.inits.get(int(stem[5:]))
            return (init, "video/mp4") if init is not None else None
        if stem.startswith("part-") and stem[5:].isdigit() and extension == "m4s":
            part = self.segmenter.part(int(stem[5:]))
            return (part, "video/mp4") if part is not None else None
        if not stem.isdigit():
            return None
        segment = self.segmenter.segment(int(stem))
        if segment is None or segment.extension != extension:
            return None
        return segment.data, "video/mp2t" if extension == "ts" else "video/mp4"

    def _count(self) -> None:
        PLAYLIST_REQUESTS.inc(self.playlists_asked)
        SEGMENT_REQUESTS.inc(self.files_asked)
        BYTES_OUT.inc(self.bytes_sent)
        self.playlists_asked = self.files_asked = self.bytes_sent = 0

    def watching(self) -> int:
        self._forget_clients(time.monotonic())
        return len(self.clients)

    def _forget_clients(self, now: float) -> None:
        """Drop clients that stopped asking (every request prunes, so the map holds one window of them)."""
        horizon = now - CLIENT_WINDOW * self.segmenter.target_duration
        clients = self.clients
        while clients:
            oldest = next(iter(clients))
            if clients[oldest] >= horizon and len(clients) <= MAX_CLIENTS:
                break
            del clients[oldest]

    # Stopping -------------------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        quiet = time.monotonic() - self.last_request
        if quiet >= self.idle:
            self.stop(f"no request for {self.idle:g}s")
        else:
            self.idle_handle = asyncio.get_running_loop().call_later(self.idle - quiet, self._check_idle)

    def stop(self, reason: str) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.idle_handle.cancel()
        self._count()
        MUXERS.dec()
        event(log, "hls.stop", stream=self.path, muxer=self.id, reason=reason,
              segments=self.segmenter.next_sequence, dropped_frames=self.segmenter.dropped_frames)
        self.on_stop(self)
