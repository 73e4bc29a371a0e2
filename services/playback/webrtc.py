"""WebRTC viewers (WHEP) on a playback node.

A stream's WebRTC side is one `WebRtcStream`: a viewer of the stream's feed (like an HLS muxer) that takes
its frames and makes them RTP packets once for all its viewers: H.264, HEVC, VP9 or AV1 as the publisher
sent it (H.264's and HEVC's parameter sets before every keyframe), AAC transcoded to Opus once (castmesh.media.audio),
Opus (enhanced RTMP's) as it came. It keeps the packets
since the last keyframe, so a viewer that joins, or whose browser lost the picture (a PLI or FIR), is
sent them at once (restamped to be decoded at once, castmesh.webrtc.rtp.burst) and has a picture without
asking the publisher for anything. It is to WHEP viewers what the
feed is to FLV viewers: each WHEP viewer is a `Viewer` whose sink is a `WhepSession`, and the stream writes
the same packets to every one of them; per viewer only SRTP is done (castmesh.webrtc.peer).

A stream WebRTC cannot carry says so once, by name: B-frames (pictures presented out of their order,
which WebRTC receivers do not reorder; seen as a composition offset, a picture presented later than it is
decoded, which encoders write only when they reorder), or a video codec other than H.264, HEVC, VP9 and
AV1. Viewers that are watching are ended with the reason; new ones are refused with it (422). HEVC, VP9
and AV1 go to a viewer whose offer has them (406 naming the codec otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter

from castmesh.media.codecs import (
    OPUS_HEAD,
    AudioConfig,
    CodecError,
    VideoConfig,
    VideoSample,
    read_audio,
    read_opus,
    read_video,
)
from castmesh.media.describe import VIDEO_NAMES
from castmesh.media.frames import AUDIO, VIDEO
from castmesh.media.gop import GopCache
from castmesh.mesh.logs import event
from castmesh.proto.v1.media_pb2 import Frame
from castmesh.webrtc.rtp import (
    OPUS_CLOCK,
    VIDEO_CLOCK,
    Packetizer,
    Reordered,
    av1_payloads,
    burst,
    h264_payloads,
    h265_payloads,
    renumber,
    vp9_payloads,
    with_payload_type,
)
from castmesh.webrtc.settings import MIME, VIDEO_MIMES
from services.playback.formats import WEBRTC_FRAMES, start_frames

if TYPE_CHECKING:
    from castmesh.media.audio import Transcoder
    from castmesh.webrtc.peer import Peer
    from services.playback.viewer import Viewer

log = logging.getLogger("castmesh.playback")

VIDEO_PT, AUDIO_PT = 102, 111  # the stream's own numbers; a viewer that negotiated others gets copies
MAX_GOP_BYTES = 16 * 1024 * 1024  # packets kept for joining viewers; past it, they wait for the next keyframe
KEYFRAME_EVERY = 1.0  # a viewer's repeated PLIs are answered at most this often
DROP_LOG_EVERY = 10.0  # seconds between log lines about dropped frames of one stream
RESEND_PER_SECOND = 400  # packets a viewer's NACKs may have sent again a second (about 4 Mbps)

KEYFRAME_REQUESTS = Counter("castmesh_playback_webrtc_keyframe_requests", "PLIs and FIRs from WebRTC viewers")
DROPPED = Counter("castmesh_playback_webrtc_dropped_frames", "Frames WebRTC viewers were not sent: unreadable, "
                  "or pictures waiting for a keyframe after one")
RESENT = Counter("castmesh_playback_webrtc_resent_packets", "Video packets sent again for WebRTC viewers' NACKs")
TRANSCODED = Counter("castmesh_playback_webrtc_opus_frames", "Opus frames made from AAC for WebRTC viewers")
PASSED = Counter("castmesh_playback_webrtc_opus_passed_frames", "Opus frames of Opus streams sent to WebRTC "
                 "viewers as published")
TRANSCODE_CPU = Counter("castmesh_playback_webrtc_transcode_cpu_seconds",
                        "CPU time spent transcoding AAC to Opus for WebRTC viewers (once per stream)")

Batch = list[tuple[str, list[bytes]]]  # (kind, packets) in the order the frames came


class Unplayable(CodecError):
    """A stream WebRTC cannot carry at all (its video codec), unlike one bad frame, which is dropped."""


class WebRtcStream:
    """One stream's packets for its WHEP viewers."""

    def __init__(self, path: str, on_stop: Callable[[WebRtcStream], None]) -> None:
        self.path = path
        self.on_stop = on_stop
        self.transport = self  # a viewer of the feed whose output is its own viewers
        self.format = WEBRTC_FRAMES
        self.viewer: Viewer | None = None
        self.ssrcs = {"video": secrets.randbits(32), "audio": secrets.randbits(32)}
        self.video = Packetizer(VIDEO_PT, VIDEO_CLOCK, self.ssrcs["video"])
        self.audio = Packetizer(AUDIO_PT, OPUS_CLOCK, self.ssrcs["audio"])
        self.video_config: VideoConfig | None = None
        self.audio_config: AudioConfig | None = None
        self.transcoder: Transcoder | None = None
        self.gop: list[bytes] = []
        self.gop_bytes = 0
        self.gop_open = False  # the packets since the last keyframe are all in `gop`
        self.kinds: tuple[str, ...] = ()
        self.viewers: dict[Viewer, None] = {}
        self.live = False
        self.problem = ""  # why WebRTC cannot carry this stream, once known
        self.stopped = False
        self.pending = 0  # offers for it being answered: it outlives its last viewer while there are some
        self.broken = False  # a video frame was dropped: later pictures wait for a keyframe
        self.last_drop_log = -DROP_LOG_EVERY
        self.waiters: list[asyncio.Future[None]] = []

    # The feed's viewer ---------------------------------------------------------------------------------

    def start(self, cache: GopCache) -> bool:
        self.kinds = tuple(k for k, has in (("video", cache.has_video), ("audio", cache.has_audio)) if has)
        self.write(start_frames(cache))
        self.live = True
        self._wake()
        return not self.stopped

    def write(self, frames: list[Frame]) -> None:
        if self.problem:
            return
        try:
            batch = self._packetize(frames)
        except (Reordered, Unplayable) as exc:
            self._cannot(str(exc))
            return
        if not batch:
            return
        variants: dict[tuple[str, int], list[bytes]] = {}
        now = time.monotonic()
        for viewer in self.viewers:
            session = viewer.sink
            if isinstance(session, WhepSession) and session.flowing:
                viewer.write(session.variant(batch, variants), 0, now)

    def discontinuity(self) -> None:
        """A new upstream or publish session: timestamps stay monotonic (the feed's jitter corrector) and the
        audio transcoder re-anchors by itself, so the packets carry on."""

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.stop("dropped by its feed")

    def refuse(self, status: int, reason: str) -> None:
        self.stop(reason)

    def finish(self, reason: str) -> None:
        self.stop(reason)

    def watching(self) -> int:
        return len(self.viewers)

    # Packets -------------------------------------------------------------------------------------------

    def _packetize(self, frames: list[Frame]) -> Batch:
        batch: Batch = []
        for frame in frames:
            try:
                if frame.kind == VIDEO:
                    self._video(frame, batch)
                elif frame.kind == AUDIO:
                    self._audio(frame, batch)
            except (Reordered, Unplayable):
                raise
            except CodecError as exc:  # one bad frame: dropped, and video waits for the next keyframe
                self._drop(frame, str(exc))
        return batch

    def _video(self, frame: Frame, batch: Batch) -> None:
        video = read_video(frame.payload)
        if isinstance(video, VideoConfig):
            if video.codec not in VIDEO_MIMES:
                raise Unplayable(f"the stream's video is {VIDEO_NAMES.get(video.codec, video.codec)}; "
                                 "castmesh's WebRTC carries H.264, HEVC, VP9 and AV1")
            if self.video_config is not None and self.video_config.codec != video.codec:
                raise Unplayable(f"the stream's video changed from {VIDEO_NAMES[self.video_config.codec]} "
                                 f"to {VIDEO_NAMES[video.codec]}: WebRTC viewers must connect again")
            self.video_config = video
        elif isinstance(video, VideoSample) and self.video_config is not None:
            if video.composition_ms:  # presented later than decoded: the encoder reorders pictures
                raise Reordered(f"the stream has B-frames (a picture presented {video.composition_ms} ms "
                                "after it is decoded); WebRTC cannot carry them: publish without "
                                "(x264's bframes=0, ffmpeg's -bf 0, OBS's x264 options bframes=0)")
            if self.broken and not video.keyframe:
                DROPPED.inc()
                return
            payloads = self._payloads(video, self.video_config)
            self.broken = False
            packets = self.video.packets(payloads, frame.timestamp)
            self._keep(packets, video.keyframe)
            batch.append(("video", packets))

    def _audio(self, frame: Frame, batch: Batch) -> None:
        published = read_opus(frame.payload)
        if published is OPUS_HEAD:  # the stream's audio is Opus already: it passes through
            self.audio_config = self.transcoder = None
            return
        if isinstance(published, bytes):
            PASSED.inc()
            batch.append(("audio", self.audio.packets([published], frame.timestamp, marker=False)))
            return
        audio = read_audio(frame.payload)
        if isinstance(audio, AudioConfig):
            if audio != self.audio_config:
                from castmesh.media.audio import aac_to_opus  # PyAV: loaded once there is audio to make

                self.audio_config, self.transcoder = audio, aac_to_opus(audio)
        elif isinstance(audio, bytes) and self.transcoder is not None:
            began = time.thread_time()
            coded = self.transcoder.push(audio, frame.timestamp)
            TRANSCODE_CPU.inc(time.thread_time() - began)
            TRANSCODED.inc(len(coded))
            for opus in coded:
                batch.append(("audio", self.audio.packets([opus.data], opus.presented_ms, marker=False)))

    def _drop(self, frame: Frame, reason: str) -> None:
        """A frame that cannot be read or packetized (the publisher's fault, or a corrupt relay hop): left
        out; for video, the pictures after it wait for a keyframe, and joiners for the next GOP. Logged at
        most once per DROP_LOG_EVERY seconds."""
        DROPPED.inc()
        if frame.kind == VIDEO:
            self.broken, self.gop, self.gop_bytes, self.gop_open = True, [], 0, False
        now = time.monotonic()
        if now - self.last_drop_log >= DROP_LOG_EVERY:
            self.last_drop_log = now
            event(log, "webrtc.frame_dropped", level=logging.WARNING, stream=self.path,
                  kind="video" if frame.kind == VIDEO else "audio", reason=reason)

    @staticmethod
    def _payloads(video: VideoSample, config: VideoConfig) -> list[bytes]:
        if config.codec == "vp09":
            return vp9_payloads(video)
        if config.codec == "av01":
            return av1_payloads(video, config)
        if config.codec == "hvc1":
            return h265_payloads(video, config)
        return h264_payloads(video, config)

    @property
    def mimes(self) -> dict[str, str]:
        """The stream's codecs as WebRTC names them (once it is live)."""
        video = self.video_config.codec if self.video_config is not None else "avc1"
        return {"video": VIDEO_MIMES[video], "audio": MIME["audio"]}

    def _keep(self, packets: list[bytes], keyframe: bool) -> None:
        if keyframe:
            self.gop, self.gop_bytes, self.gop_open = [], 0, True
        if not self.gop_open:
            return
        self.gop_bytes += sum(len(p) for p in packets)
        if self.gop_bytes > MAX_GOP_BYTES:  # a GOP too long to keep: joiners wait for the next keyframe
            self.gop, self.gop_bytes, self.gop_open = [], 0, False
            return
        self.gop += packets

    def _cannot(self, problem: str) -> None:
        self.problem = problem
        event(log, "webrtc.refused", level=logging.WARNING, stream=self.path, reason=problem)
        for viewer in list(self.viewers):
            viewer.sink.refuse(422, problem)
        self._wake()

    # Viewers -------------------------------------------------------------------------------------------

    def add(self, viewer: Viewer) -> None:
        self.viewers[viewer] = None

    def remove(self, viewer: Viewer) -> None:
        self.viewers.pop(viewer, None)
        if not self.viewers and not self.pending:
            self.stop("no WebRTC viewers left")

    async def ready(self, timeout: float) -> None:
        """Until the stream is live (or known not to be playable, or gone)."""
        if self.live or self.problem or self.stopped:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def stop(self, reason: str) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.problem = self.problem or reason
        for viewer in list(self.viewers):
            viewer.sink.finish(reason)
        self.viewers.clear()
        self._wake()
        self.on_stop(self)


class WhepSession:
    """One WHEP viewer: its peer connection, as the sink of a `Viewer` of a `WebRtcStream`."""

    def __init__(self, stream: WebRtcStream, peer: Peer, client_id: str, on_gone: Callable[[WhepSession], None],
                 connect_timeout: float) -> None:
        self.stream = stream
        self.peer = peer
        self.client_id = client_id
        self.on_gone = on_gone
        self.transport = self
        self.format = WEBRTC_FRAMES
        self.viewer: Viewer | None = None
        self.flowing = False  # connected, and sent the GOP: live packets go out from here on
        self.done = False
        self.last_keyframe = 0.0
        self.video_offset = 0  # this viewer's video sequence numbers run this far ahead of the stream's
        self.live_from = 0  # the stream's first video sequence number this viewer got live (not in a burst)
        self.resent_window, self.resent = 0.0, 0
        peer.on_keyframe = self.keyframe
        peer.on_lost = self.lost
        peer.pc.on("connectionstatechange", self._state)
        self.connect_timeout = connect_timeout  # ICE and DTLS must complete within this of the answer
        self.timer = asyncio.get_running_loop().call_later(connect_timeout, self._connect_timeout)

    def variant(self, batch: Batch, variants: dict[tuple[str, int], list[bytes]]) -> Batch:
        """The batch with this peer's payload type numbers (made once per number, not per viewer)."""
        types = self.peer.payload_types
        if types.get("video", VIDEO_PT) == VIDEO_PT and types.get("audio", AUDIO_PT) == AUDIO_PT:
            return batch
        out: Batch = []
        for i, (kind, packets) in enumerate(batch):
            pt = types.get(kind)
            if pt is None:
                continue
            key = (f"{kind}{i}", pt)
            made = variants.get(key)
            if made is None:
                made = variants[key] = [with_payload_type(p, pt) for p in packets]
            out.append((kind, made))
        return out

    def _state(self) -> None:
        state = self.peer.pc.connectionState
        if state == "connected" and not self.flowing and not self.done:
            self.timer.cancel()
            self.flowing = True
            self._send_gop("start")
        elif state in ("failed", "closed"):
            self.finish(f"peer connection {state}")

    def _connect_timeout(self) -> None:
        if not self.flowing:
            self.finish(f"ICE and DTLS did not complete within {self.connect_timeout:g}s")

    def keyframe(self) -> None:
        """The viewer's browser lost the picture (PLI or FIR): it is sent the cached GOP again, never asks
        the publisher. The GOP's packets were sent to it already, so they go again numbered after the last
        one it got and stamped just after it (decoded at once); from then on this viewer's video numbers
        run that many ahead of the stream's. At most once a KEYFRAME_EVERY."""
        now = time.monotonic()
        if not self.flowing or now - self.last_keyframe < KEYFRAME_EVERY:
            return
        self.last_keyframe = now
        KEYFRAME_REQUESTS.inc()
        gop = self.stream.gop
        if not gop:  # a GOP too long to keep: the picture comes back at the next keyframe
            return
        last_sent = (self.stream.video.sequence - 1 + self.video_offset) & 0xFFFF
        first = int.from_bytes(gop[0][2:4], "big")
        again = renumber(burst(gop, end=int.from_bytes(gop[-1][4:8], "big") + 1), last_sent + 1 - first)
        self.video_offset = (self.video_offset + len(gop)) & 0xFFFF
        self.live_from = self.stream.video.sequence
        self._send(self.variant([("video", again)], {}))
        if self.viewer is not None:
            self.viewer.moment("keyframe request", packets=len(gop))

    def lost(self, kind: str, sequence: int) -> None:
        """A packet the viewer's NACK says it lost, sent again as it was if the stream still has it: video
        since the last keyframe, sent live (a packet of a burst was restamped, and its picture is better
        answered by the PLI the viewer sends if it stays broken). At most RESEND_PER_SECOND a second."""
        if kind != "video" or not self.flowing:
            return
        gop = self.stream.gop
        if not gop:
            return
        own = (sequence - self.video_offset) & 0xFFFF  # the stream's number for it
        index = (own - int.from_bytes(gop[0][2:4], "big")) & 0xFFFF
        if index >= len(gop) or (own - self.live_from) & 0xFFFF >= 0x8000:
            return
        now = time.monotonic()
        if now - self.resent_window >= 1.0:
            self.resent_window, self.resent = now, 0
        if self.resent >= RESEND_PER_SECOND:
            return
        self.resent += 1
        RESENT.inc()
        self.write(self.variant([("video", [gop[index]])], {}))

    def _send_gop(self, why: str) -> None:
        gop = burst(self.stream.gop)
        self.live_from = self.stream.video.sequence
        if gop:
            self.write(self.variant([("video", gop)], {}))
        if self.viewer is not None:
            self.viewer.moment(why, packets=len(gop))

    # Output ---------------------------------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        if self.video_offset:
            batch = [(kind, renumber(packets, self.video_offset) if kind == "video" else packets)
                     for kind, packets in batch]
        self._send(batch)

    def _send(self, batch: Batch) -> None:
        sent = self.peer.send(batch)
        if self.viewer is not None:
            self.viewer.written += sent

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.finish("dropped")

    # ViewerSink -----------------------------------------------------------------------------------------

    def start(self, head: object) -> bool:
        return not self.done

    def refuse(self, status: int, reason: str) -> None:
        self.finish(reason)

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.flowing = False
        self.timer.cancel()
        event(log, "viewer.stop", client=self.client_id, path=self.stream.path, protocol="webrtc", reason=reason)
        task = asyncio.get_running_loop().create_task(self.peer.close())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.on_gone(self)

    def discontinuity(self) -> None:
        """WebRTC carries on across a new upstream or publish session: the stream's packets do."""

    def watching(self) -> int:
        return 1
