"""A forward job: the source stream in over gRPC (an UpstreamSubscription, as playback follows a stream),
pushed out unchanged to external servers, each target a publisher of its own: RTMP and RTMPS
(castmesh.mesh.rtmp_client over the sans-IO client, as YouTube, Twitch or another castmesh take a stream)
and SRT as a caller sending MPEG-TS (castmesh.srt.libsrt, castmesh.media.tsmux: what SRT viewers get).

No transcoding and no child process: the frames are the source's, so a job costs one subscription and a
few writes per frame per target. Each target connects by itself and starts at a keyframe with what a new
RTMP publisher sends first (onMetaData, the video and the audio configuration), its timestamps counted from
0 on each connection, as nginx-rtmp's and SRS's relays do (a far end takes a new publisher's first
timestamp as its start). A new publish session upstream (a new timeline) restarts every target at its
next keyframe with the headers again, its timestamps going on from where they were.

Failures are each target's own: any error, or the far end dropping, leaves it RETRYING (the error in its
detail) for a backoff that doubles from `backoff` to `max_backoff`, reset once a connection has forwarded
for STABLE_FOR; then it connects again, from the next keyframe with the headers. A target that cannot keep
up (more than MAX_BEHIND bytes waiting: the RTMP socket's write buffer, the SRT sender's queue) skips to the
next keyframe, counted; one that stays that far behind for STALLED is dropped and retried. Memory is
bounded by that, never by a slow far end, and no target ever waits for another.

URLs are read by castmesh.mesh.targets (parse_target; logs and errors show masked(url), and a far end's
words are scrubbed of the secrets in it).

A clean close (the source was unpublished) unpublishes at each RTMP target as ffmpeg does at its end
(FCUnpublish, deleteStream); any other close (the job moves to another worker) just drops the connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter, Gauge

from castmesh.media import amf0
from castmesh.media.frames import AUDIO, DATA, VIDEO, is_metadata
from castmesh.media.tsmux import TsMuxer
from castmesh.mesh.logs import event
from castmesh.mesh.rtmp_client import RtmpClient, RtmpRefused
from castmesh.mesh.subscription import UpstreamSubscription
from castmesh.mesh.targets import MASK, Destination, masked, parse_target
from castmesh.proto.v1.dispatch_pb2 import ForwardTarget, Job
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader
from castmesh.proto.v1.relay_pb2 import StreamEnd
from castmesh.rtmp.client import ClientState
from castmesh.rtmp.errors import RtmpError
from castmesh.srt import libsrt as s

log = logging.getLogger("castmesh.worker")

CONNECT_TIMEOUT = 10.0  # seconds to reach publishing (RTMP) or to be connected (SRT)
STABLE_FOR = 10.0  # seconds a connection must have forwarded for the next failure to wait `backoff` again
MAX_BEHIND = 4 << 20  # bytes waiting to go out to one target before it skips to the next keyframe
STALLED = 20.0  # seconds a target may stay MAX_BEHIND behind before its connection is dropped and retried
GAP = 40  # ms between the last frame sent and the first of a new timeline, on a connection that goes on
SRT_MESSAGE = 7 * 188  # TS packets per SRT live-mode message: 1316 bytes, what SRT receivers expect
SRT_RETRY = 0.01  # seconds between tries to send what libsrt's send buffer had no room for
SRT_CONNECT_POLL = 0.02  # seconds between looks at an SRT call's state while it is made
SRT_CHECK = 0.5  # seconds between looks at an SRT connection's state (a far end that left, or went silent)
CLOSE_GRACE = 5.0  # seconds a closing RTMP connection may take to flush before it is cut
SET_DATA_FRAME = amf0.encode("@setDataFrame")  # what an RTMP publisher puts before onMetaData
U32 = 0xFFFFFFFF

CONNECTS = Counter("castmesh_forward_connects", "Forward targets' connections that reached publishing", ["scheme"])
FAILURES = Counter("castmesh_forward_failures", "Forward targets' connections that failed to be made or were lost",
                   ["scheme"])
BYTES = Counter("castmesh_forward_bytes", "Media bytes handed to forward targets' connections (FLV bodies for "
                "RTMP, TS for SRT)", ["scheme"])
SKIPS = Counter("castmesh_forward_skips", "Times a forward target fell MAX_BEHIND behind and skipped to the next "
                "keyframe")
TARGETS = Gauge("castmesh_forward_targets", "Forward targets by state", ["state"])
STATE_NAMES: dict[int, str] = {ForwardTarget.STATE_CONNECTING: "connecting",
                               ForwardTarget.STATE_FORWARDING: "forwarding", ForwardTarget.STATE_RETRYING: "retrying"}


class Backoff:
    """Seconds to wait before each attempt after a failure: `first`, then doubling, at most `cap`; from
    `first` again after reset(). Each wait is up to `jitter` of it shorter, at random (to the 10 ms), so the
    streams one worker forwards to a server that restarted, or pulls from one, do not all call it again
    at the same instant."""

    def __init__(self, first: float, cap: float, jitter: float = 0.2,
                 rng: Callable[[], float] = random.random) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"a backoff goes from more than 0 up to at least that: {first:g} .. {cap:g}")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.rng = rng
        self.current = 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2) if self.current else self.first
        return max(0.01, round(self.current * (1 - self.jitter * self.rng()), 2))

    def reset(self) -> None:
        self.current = 0.0


def describe(exc: BaseException, where: str) -> str:
    """An error as a target's detail: what went wrong, with whom."""
    if isinstance(exc, RtmpRefused):
        return f"{where} refused the publish: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS with {where}: certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {where}: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where} refused the connection (nothing listens there)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {where.rpartition(':')[0]}: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return f"{where} did not answer in {CONNECT_TIMEOUT:g}s"
    if isinstance(exc, RtmpError):
        return f"RTMP from {where}: {exc}"
    if isinstance(exc, OSError):
        return f"{where}: {exc.strerror or exc}"
    return f"{where}: {type(exc).__name__}: {exc}"


# Connections ----------------------------------------------------------------------------------------------

Media = tuple[int, int, bytes]  # kind, timestamp (ms, this connection's), FLV tag body


class Link(Protocol):
    """One connection to a target, publishing."""

    lost: asyncio.Future[str]  # done, with why, when the connection is over

    def fail(self, why: str) -> None:
        """The connection is over (an error noticed by its user)."""

    def send(self, media: list[Media]) -> int:
        """Hand the media over; the bytes it made. Raises on an error (the caller fails the link)."""

    def backlog(self) -> int:
        """Bytes handed over and not yet taken by the far end's connection."""

    def close(self, clean: bool) -> None:
        """End the connection (clean: the stream is over, say so)."""


class RtmpLink:
    """An RTMP or RTMPS publish: the session's bytes go out through the client's asyncio stream writer."""

    def __init__(self, client: RtmpClient) -> None:
        self.client = client
        self.closed = False
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if client.listener is not None:  # it ends when the server closes the connection or breaks the protocol
            client.listener.add_done_callback(self._listener_done)

    @classmethod
    async def open(cls, to: Destination) -> RtmpLink:
        tls = None
        if to.scheme == "rtmps":
            tls = ssl.create_default_context()
            if not to.verify:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        client = await RtmpClient.open(to.host, to.port, to.app, to.key, tls=tls, timeout=CONNECT_TIMEOUT)
        return cls(client)

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self.fail(self._why(self.client.error))

    def _why(self, error: BaseException | None) -> str:
        if self.client.conn.state is ClientState.ENDED:  # an error status while publishing
            return "the server ended the publish"
        return str(error) if error is not None else "the server closed the connection"

    def fail(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)

    def send(self, media: list[Media]) -> int:
        size = 0
        send = self.client.send_media
        for kind, timestamp, payload in media:
            if kind == DATA and is_metadata(payload):
                payload = SET_DATA_FRAME + payload
            try:
                send(kind, timestamp, payload)
            except RtmpError as exc:
                raise ConnectionError(self._why(exc)) from exc
            size += len(payload)
        return size

    def backlog(self) -> int:
        return self.client.writer.transport.get_write_buffer_size()

    def close(self, clean: bool) -> None:
        if self.closed:
            return
        self.closed = True
        client = self.client
        if client.listener is not None:
            client.listener.cancel()
        transport = client.writer.transport
        if clean and not self.lost.done() and not transport.is_closing():
            client.conn.stop()  # FCUnpublish, deleteStream
            client.writer.write(client.conn.data_to_send())
        if self.lost.done():
            transport.abort()  # a broken connection: nothing more to flush
        else:
            transport.close()  # what is buffered goes out first, within CLOSE_GRACE
            asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)
        self.fail("closed")


class SrtLink:
    """An SRT caller sending MPEG-TS in live-mode messages, without blocking: what libsrt's send buffer has no
    room for waits in a queue (retried every SRT_RETRY), which is the link's backlog."""

    def __init__(self, sock: int) -> None:
        loop = asyncio.get_running_loop()
        self.sock = sock
        self.muxer = TsMuxer()  # one per connection: its tables and continuity counters start with it
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.retry: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[str] = loop.create_future()
        self.checker = loop.create_task(self._check())
        self.closed = False

    @classmethod
    async def open(cls, to: Destination) -> SrtLink:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(to.host, to.port, type=socket.SOCK_DGRAM)
        ip = str(infos[0][4][0])
        srt = s.lib()
        sock = s.check("srt_create_socket", srt.srt_create_socket())
        try:
            s.set_int(sock, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
            s.set_int(sock, s.SRTO_SNDSYN, 0)
            s.set_int(sock, s.SRTO_RCVSYN, 0)  # srt_connect returns at once too
            s.set_int(sock, s.SRTO_CONNTIMEO, int(CONNECT_TIMEOUT * 1000))
            if to.stream_id:
                s.set_bytes(sock, s.SRTO_STREAMID, to.stream_id.encode())
            if to.passphrase:
                s.set_bytes(sock, s.SRTO_PASSPHRASE, to.passphrase.encode())
            if to.latency_ms is not None:
                s.set_int(sock, s.SRTO_LATENCY, to.latency_ms)
            s.connect(sock, ip, to.port)
            # libsrt's threads make the handshake; its socket is no file descriptor the loop could wait on, and
            # for a once-per-connection wait of a few milliseconds a look every SRT_CONNECT_POLL is enough
            while True:
                state = s.state(sock)
                if state >= s.SRTS_CONNECTED:
                    break
                await asyncio.sleep(SRT_CONNECT_POLL)
            if state != s.SRTS_CONNECTED:
                raise ConnectionError(f"the SRT call failed: {s.reject_reason(sock)}")
        except BaseException:
            srt.srt_close(sock)
            raise
        return cls(sock)

    async def _check(self) -> None:
        """A far end that leaves says so (or goes silent, and libsrt gives up on it): this notices it even
        while the source sends nothing."""
        while not self.lost.done():
            await asyncio.sleep(SRT_CHECK)
            if s.state(self.sock) != s.SRTS_CONNECTED:
                self.fail("the far end closed the connection or stopped answering")

    def fail(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)

    def send(self, media: list[Media]) -> int:
        data, _ = self.muxer.push([Frame(kind=kind, timestamp=ts, payload=payload)  # type: ignore[arg-type]
                                   for kind, ts, payload in media if kind != DATA])
        view = memoryview(data)
        for at in range(0, len(data), SRT_MESSAGE):
            self.queue.append(bytes(view[at:at + SRT_MESSAGE]))
        self.queued += len(data)
        if self.retry is None:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        self.retry = None
        srt = s.lib()
        queue = self.queue
        while queue and not self.closed:
            chunk = queue[0]
            if srt.srt_sendmsg(self.sock, chunk, len(chunk), -1, 0) < 0:
                error = s.last_error("srt_sendmsg")
                if error.code != s.EASYNCSND:
                    self.fail(f"the connection broke: {error.strerror}")
                    return
                self.retry = asyncio.get_running_loop().call_later(SRT_RETRY, self._flush)
                return
            queue.popleft()
            self.queued -= len(chunk)

    def backlog(self) -> int:
        return self.queued

    def close(self, clean: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.fail("closed")
        self.checker.cancel()
        if self.retry is not None:
            self.retry.cancel()
        self.queue.clear()
        self.queued = 0
        s.lib().srt_close(self.sock)


async def open_link(to: Destination) -> Link:
    if to.scheme == "srt":
        return await SrtLink.open(to)
    return await RtmpLink.open(to)


# Targets --------------------------------------------------------------------------------------------------


def shifted(timestamp: int, base: int) -> int:
    """A source timestamp on a connection's clock (0 at `base`); a frame a moment older than the base (audio
    just before the first keyframe) is put at 0."""
    out = (timestamp - base) & U32
    return 0 if out > U32 >> 1 else out


def headers_at(configs: dict[int, Frame], frames: list[Frame], at: int) -> list[Frame]:
    """The metadata and configurations in force at frames[at]: `configs` (as the batch began) updated by
    any that came in the batch before it; in the order a publisher sends them."""
    current = dict(configs)
    for frame in frames[:at]:
        key = config_key(frame)
        if key is not None:
            current[key] = frame
    return [current[k] for k in (DATA, VIDEO, AUDIO) if k in current]


def config_key(frame: Frame) -> int | None:
    if frame.kind == DATA:
        return DATA if is_metadata(frame.payload) else None
    return frame.kind if frame.sequence_header else None


class Target:
    """One destination of a job: its connection, kept up by its own task, and what it has been sent."""

    def __init__(self, job: ForwardJob, status: ForwardTarget, backoff: Backoff) -> None:
        self.job = job
        self.status = status
        self.backoff = backoff
        self.error = ""
        try:
            self.to: Destination | None = parse_target(status.url)
        except ValueError as exc:
            self.to, self.error = None, str(exc)
            status.detail = self.error  # it stays STATE_UNSPECIFIED: it is never tried
        self.scheme = self.to.scheme if self.to is not None else "?"
        self.name = masked(status.url)
        self.task: asyncio.Task[None] | None = None
        self.link: Link | None = None
        self.started = False  # this connection has been sent the headers and a keyframe
        self.base = 0  # the source timestamp that is this connection's `resume_at`
        self.resume_at = 0  # where the next start's timestamps go on from (0 on a new connection)
        self.last_out = 0  # the latest timestamp sent on this connection
        self.forwarding_since = 0.0
        self.skipping = False
        self.skip_since = 0.0
        self.skips = 0
        self.sent = 0  # bytes, over every connection

    def start(self) -> None:
        if self.to is not None and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._keep(self.to))

    async def _keep(self, to: Destination) -> None:
        """Connect, forward until the connection is lost, wait out the backoff; again."""
        while True:
            self._state(ForwardTarget.STATE_CONNECTING)
            try:
                link = await asyncio.wait_for(open_link(to), CONNECT_TIMEOUT + 1)
            except Exception as exc:  # whatever it is, it is this target's alone: said, and tried again
                delay = self.backoff.next()
                why = self._failed(describe(exc, to.address))
                event(log, "forward.retry", level=logging.WARNING, job=self.job.job.id, target=self.name,
                      error=why, retry_in=delay)
                await asyncio.sleep(delay)
                continue
            self.link, self.started, self.skipping = link, False, False
            self.resume_at = self.last_out = 0
            self.status.connects += 1
            CONNECTS.labels(self.scheme).inc()
            event(log, "forward.connected", job=self.job.job.id, target=self.name, connects=self.status.connects)
            try:
                why = await asyncio.shield(link.lost)  # cancelled here, it must still be the link's to end
            finally:
                link.close(False)
                self.link = None
            forwarding = self.status.state == ForwardTarget.STATE_FORWARDING
            forwarded = time.monotonic() - self.forwarding_since if forwarding else 0.0
            if forwarded >= STABLE_FOR:
                self.backoff.reset()
            delay = self.backoff.next()
            why = self._failed(f"{to.address}: {why}")
            event(log, "forward.lost", level=logging.WARNING, job=self.job.job.id, target=self.name, error=why,
                  forwarded_s=round(forwarded, 1), skips=self.skips, retry_in=delay)
            await asyncio.sleep(delay)

    def _failed(self, why: str) -> str:
        for secret in self.to.secrets() if self.to is not None else []:
            why = why.replace(secret, MASK)  # a far end may quote the key back
        FAILURES.labels(self.scheme).inc()
        self.error = why
        self._state(ForwardTarget.STATE_RETRYING)
        return why

    def _state(self, state: int) -> None:
        if state == self.status.state:
            return
        if self.status.state in STATE_NAMES:
            TARGETS.labels(STATE_NAMES[self.status.state]).dec()
        TARGETS.labels(STATE_NAMES[state]).inc()
        self.status.state = state  # type: ignore[assignment]
        self.status.detail = self.error
        self.status.since_us = time.time_ns() // 1000
        self.status.bytes = self.sent
        self.job.changed()

    # The media ----------------------------------------------------------------------------------------------

    def new_timeline(self) -> None:
        """A new publish session upstream: its timestamps start anywhere, so this connection starts again at
        its next keyframe, with the headers, going on from where it was."""
        if self.started:
            self.started = False
            self.resume_at = (self.last_out + GAP) & U32

    def feed(self, frames: list[Frame], configs: dict[int, Frame]) -> None:
        link = self.link
        if link is None or link.lost.done():
            return
        media: list[Media] = []
        if not self.started:
            at = next((i for i, f in enumerate(frames) if self._entry(f)), None)
            if at is None:
                return
            self.base = (frames[at].timestamp - self.resume_at) & U32
            media = [(f.kind, self.resume_at, f.payload) for f in headers_at(configs, frames, at)]
            frames = frames[at:]
            self.started, self.skipping = True, False
            if self.status.state != ForwardTarget.STATE_FORWARDING:
                self.forwarding_since = time.monotonic()
                self._state(ForwardTarget.STATE_FORWARDING)
        elif not (frames := self._keeping_up(link, frames)):
            return
        base = self.base
        media += [(f.kind, shifted(f.timestamp, base), f.payload) for f in frames]
        try:
            size = link.send(media)
        except Exception as exc:  # this target's connection is over; the others and the source go on
            link.fail(str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}")
            return
        self.last_out = max(self.last_out, max(m[1] for m in media))
        self.sent += size
        self.status.bytes = self.sent
        BYTES.labels(self.scheme).inc(size)

    def _entry(self, frame: Frame) -> bool:
        """Whether a connection may start (or resume after a skip) at this frame: a keyframe, or any audio
        frame of a stream without video."""
        if self.job.has_video:
            return frame.kind == VIDEO and frame.keyframe and not frame.sequence_header
        return frame.kind == AUDIO and not frame.sequence_header

    def _keeping_up(self, link: Link, frames: list[Frame]) -> list[Frame]:
        """The frames to send: all of them, unless the far end is MAX_BEHIND behind; then none but the
        configurations and metadata up to a keyframe met with less than that waiting."""
        now = time.monotonic()
        if not self.skipping and link.backlog() > MAX_BEHIND:
            self.skipping, self.skip_since = True, now
            self.skips += 1
            SKIPS.inc()
        if not self.skipping:
            return frames
        out = []
        for frame in frames:
            if self.skipping and self._entry(frame):
                self.skipping = link.backlog() > MAX_BEHIND
            if not self.skipping or frame.sequence_header or frame.kind == DATA:
                out.append(frame)
        if self.skipping and now - self.skip_since > STALLED:
            link.fail(f"more than {MAX_BEHIND >> 20} MiB behind for {STALLED:g}s: the far end does not keep up")
        return out

    def close(self, clean: bool) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.link is not None:
            self.link.close(clean)
            self.link = None
        if self.status.state in STATE_NAMES:
            TARGETS.labels(STATE_NAMES[self.status.state]).dec()
            self.status.state = ForwardTarget.STATE_UNSPECIFIED
        self.status.bytes = self.sent
        if self.to is not None:
            event(log, "forward.stop", job=self.job.job.id, target=self.name, connects=self.status.connects,
                  bytes=self.sent, skips=self.skips)


class ForwardJob:
    """One source pushed to every target of the job; each target's state is reported in job.targets."""

    def __init__(self, job: Job, subscribe: Callable[..., UpstreamSubscription], report: Callable[[Job], None],
                 backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self.job = job
        self.spec = job.spec
        self.subscribe = subscribe
        self.report = report
        self.configs: dict[int, Frame] = {}  # the latest metadata and configurations (replaced, never changed)
        self.has_video = False
        self.closed = False
        self.outputs: dict[str, object] = {}  # (it publishes nothing in the cluster)
        del job.targets[:]
        self.targets = [Target(self, job.targets.add(url=url), Backoff(backoff, max_backoff))
                        for url in job.spec.targets]

    async def run(self) -> StreamEnd:
        """Follow the source until it ends; the targets connect meanwhile (close() ends them)."""
        for target in self.targets:
            target.start()
        self.changed()
        subscription = self.subscribe(self.spec.stream, self._on_header, self._on_frames)
        return await subscription.run()

    def close(self, clean: bool, reason: str) -> None:
        """End every target's connection (clean: the source was unpublished; the far ends are told so)."""
        self.closed = True
        for target in self.targets:
            target.close(clean)

    def pids(self) -> list[int]:
        return []  # no child process: the frames go out from this one

    def changed(self) -> None:
        """A target's state changed (never per frame): the job says so."""
        if self.closed:
            return
        forwarding = sum(1 for t in self.targets if t.status.state == ForwardTarget.STATE_FORWARDING)
        self.job.state = Job.STATE_RUNNING
        self.job.detail = f"forwarding to {forwarding} of {len(self.targets)} targets"
        self.report(self.job)

    # The source ---------------------------------------------------------------------------------------------

    def _on_header(self, header: StreamHeader, new_timeline: bool) -> None:
        self.has_video = header.has_video
        configs = {} if new_timeline else dict(self.configs)  # a new session: none of the old one's
        for key, field in ((DATA, "metadata"), (VIDEO, "video_config"), (AUDIO, "audio_config")):
            if header.HasField(field):
                configs[key] = getattr(header, field)
        self.configs = configs
        if new_timeline:
            for target in self.targets:
                target.new_timeline()

    def _on_frames(self, frames: list[Frame]) -> None:
        if self.closed:
            return
        configs = self.configs
        for target in self.targets:
            target.feed(frames, configs)
        if any(config_key(f) is not None for f in frames):
            self.configs = {**configs, **{k: f for f in frames if (k := config_key(f)) is not None}}


__all__ = ["Backoff", "Destination", "ForwardJob", "masked", "parse_target"]
