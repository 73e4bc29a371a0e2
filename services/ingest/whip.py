"""WHIP publishers (RFC 9725) on ingest: an adapter on the same publish session as RTMP (lease, one publisher
per stream, signed URLs, hooks, failover; services.ingest.session), like the RTMP adapter and nothing more.

`POST /{app}/{stream}/whip` with an SDP offer (H.264 and Opus, from OBS, ffmpeg's `whip` muxer or a
browser) starts the publish session, and once the stream is granted, answers 201 with the SDP answer and
the session's `Location`; `DELETE` on it ends the publish (a clean unpublish). The publisher's RTP becomes
frames as an RTMP publisher would send them: H.264 access units (castmesh.webrtc.rtp.H264Depacketizer) as
AVC video tags, with a sequence header made of the SPS and PPS whenever they change; Opus transcoded to
AAC once (castmesh.media.audio). So the stream plays over HTTP-FLV, HLS, RTMP and WebRTC alike.

Timestamps: each track's RTP clock, from the arrival of its first packet on one wall clock for both
tracks. A peer that does not finish ICE and DTLS within the handshake timeout, stops sending for the idle
timeout, or whose connection fails, ends its publish (not cleanly: the stream waits its grace for it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter

from castmesh.media.codecs import CodecError
from castmesh.media.elementary import VideoPacker
from castmesh.media.frames import AUDIO, make_frame
from castmesh.mesh.access import AccessLists, ip_of
from castmesh.mesh.auth import bearer_query
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.logs import event
from castmesh.mesh.sessions import Publish, Publishes, Refused, Reply, StreamRequest, problem
from castmesh.webrtc.rtp import H264Depacketizer
from castmesh.webrtc.settings import MAX_OFFER, IceSettings, OfferError

if TYPE_CHECKING:  # aiortc and PyAV load with the first WHIP request
    from castmesh.media.audio import Transcoder
    from castmesh.webrtc.peer import Publisher

log = logging.getLogger("castmesh.ingest")

WHIP_PACKETS = Counter("castmesh_ingest_whip_packets", "RTP packets from WHIP publishers", ["kind"])
REFUSED_KINDS = {"unauthorized": 403, "unavailable": 503, "rejected": 409}
KEYFRAME_ASK_EVERY = 1.0  # while a picture is missing, the publisher is sent a PLI at most this often
_ids = itertools.count(1)


class WhipSession:
    """One WHIP publisher: its peer connection's packets turned into its publish session's frames."""

    def __init__(self, publish: Publish, session_id: str, path: str, idle_timeout: float,
                 on_end: Callable[[WhipSession], None]) -> None:
        self.publish = publish
        self.id = session_id
        self.path = path
        self.idle_timeout = idle_timeout
        self.on_end = on_end
        self.publisher: Publisher | None = None
        self.video = H264Depacketizer()
        self.packer = VideoPacker("h264", "castmesh WHIP")  # onMetaData, sequence headers, pictures
        self.transcoder: Transcoder | None = None
        self.audio_config_sent = False
        self.started = time.monotonic()
        self.first: dict[str, tuple[int, int]] = {}  # kind -> (first RTP timestamp, its arrival in ms)
        self.last_packet = time.monotonic()
        self.last_keyframe_ask = 0.0
        self.ended = False
        self.ip = ""  # the publisher's address, as counted against ingest's connection caps
        self.timer: asyncio.TimerHandle | None = None

    def attach(self, publisher: Publisher, handshake_timeout: float) -> None:
        self.publisher = publisher
        publisher.pc.on("connectionstatechange", self._state)
        self.timer = asyncio.get_running_loop().call_later(handshake_timeout, self._check, handshake_timeout)

    def _state(self) -> None:
        if self.publisher is not None and self.publisher.pc.connectionState in ("failed", "closed"):
            self.end(f"peer connection {self.publisher.pc.connectionState}", clean=False)

    def _check(self, waited: float) -> None:
        """Nothing for a while: ICE and DTLS never completed, or the publisher went quiet."""
        quiet = time.monotonic() - self.last_packet
        if not self.first:
            self.end(f"no media within {waited:g}s (ICE or DTLS did not complete)", clean=False)
        elif quiet >= self.idle_timeout:
            self.end(f"no media for {self.idle_timeout:g}s", clean=False)
        else:
            self.timer = asyncio.get_running_loop().call_later(self.idle_timeout - quiet, self._check, waited)

    # Packets -------------------------------------------------------------------------------------------

    def packet(self, kind: str, packet: Any) -> None:
        if self.ended:
            return
        WHIP_PACKETS.labels(kind).inc()
        now = time.monotonic()
        self.last_packet = now
        if kind not in self.first:
            self.first[kind] = (packet.timestamp, int((now - self.started) * 1000))
        try:
            if kind == "video":
                self._video(packet, now)
            else:
                self._audio(packet)
        except CodecError as exc:
            event(log, "whip.bad_media", level=logging.WARNING, session=self.id, kind=kind, error=str(exc))

    def _ms(self, kind: str, timestamp: int, clock_ms: int) -> int:
        first, at = self.first[kind]
        delta = (timestamp - first) & 0xFFFFFFFF
        if delta >= 1 << 31:
            delta -= 1 << 32  # before the first packet (reordered)
        return max(0, at + delta // clock_ms)

    def _video(self, packet: Any, now: float) -> None:
        picture = self.video.push(packet.payload, packet.sequence_number, packet.timestamp, bool(packet.marker))
        if self.video.waiting_keyframe and now - self.last_keyframe_ask >= KEYFRAME_ASK_EVERY:
            self.last_keyframe_ask = now
            if self.publisher is not None:
                self.publisher.ask_keyframe()
        if picture is None:
            return
        timestamp, units = picture
        if self.packer.audio is None and self.publisher is not None and "audio" in self.publisher.payload_types:
            self.packer.audio = {"audiocodecid": 10.0, "audiosamplerate": 48000.0, "stereo": True}
        for kind, ms, payload in self.packer.push(self._ms("video", timestamp, 90), 0, units):
            self.publish.push(make_frame(kind, ms, payload))

    def _audio(self, packet: Any) -> None:
        if self.transcoder is None:
            from castmesh.media.audio import opus_to_aac

            self.transcoder = opus_to_aac()
        for coded in self.transcoder.push(packet.payload, self._ms("audio", packet.timestamp, 48)):
            if not self.audio_config_sent:
                self.audio_config_sent = True
                self.publish.push(make_frame(AUDIO, coded.presented_ms, b"\xaf\x00" + self.transcoder.extradata))
            self.publish.push(make_frame(AUDIO, coded.presented_ms, b"\xaf\x01" + coded.data))

    # Ending --------------------------------------------------------------------------------------------

    def end(self, reason: str, clean: bool) -> None:
        if self.ended:
            return
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
        self.publish.end(reason, clean)
        event(log, "whip.end", session=self.id, stream=self.path, reason=reason, clean=clean,
              dropped_pictures=self.video.dropped)
        if self.publisher is not None:
            task = asyncio.get_running_loop().create_task(self.publisher.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.on_end(self)


class WhipIngest:
    """WHIP requests, whatever HTTP server brings them (ingest's own port, or `castmesh up`'s one)."""

    def __init__(self, publishes: Publishes, ice: IceSettings, handshake_timeout: float,
                 idle_timeout: float, caps: ConnectionCaps | None = None, access: AccessLists | None = None) -> None:
        self.publishes = publishes
        self.access = access or AccessLists()  # checked before the offer is read (and again by the session)
        self.caps = caps or ConnectionCaps("ingest")  # a WHIP publisher counts as a connection, as RTMP's do
        self.ice = ice
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, WhipSession] = {}

    async def handle(self, method: str, app: str, name: str, session_id: str | None, query: dict[str, str],
                     headers: dict[str, str], body: bytes, peer: str) -> Reply:
        """One request on /{app}/{name}/whip[/{session_id}]; headers' names in lower case."""
        allow = ("Allow", "POST, DELETE, OPTIONS")
        if method == "OPTIONS":
            return Reply(204, b"", [("Accept-Post", "application/sdp"), allow])
        if session_id is None and method == "POST":
            return await self._offer(app, name, query, headers, body, peer)
        if session_id is not None and method == "DELETE":
            whip = self.sessions.get(session_id)
            if whip is None or whip.path != f"{app}/{name}":
                return problem(404, "no such WHIP session (it may have ended)")
            whip.end("deleted by the publisher", clean=True)
            return Reply(200)
        if session_id is not None and method == "PATCH":
            return problem(405, "trickle ICE and ICE restarts are not supported: put every candidate in the "
                           "offer (castmesh answers with all of its own)", allow)
        return problem(405, f"{method} is not a WHIP request here", allow)

    async def _offer(self, app: str, name: str, query: dict[str, str], headers: dict[str, str], body: bytes,
                     peer: str) -> Reply:
        refused = self.access.refuse("publish", app, ip_of(peer), headers)
        if refused:
            return problem(403, refused)
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/sdp":
            return problem(415, "a WHIP offer is an SDP body with Content-Type: application/sdp")
        from castmesh.webrtc.peer import check_offer

        offer = body.decode("utf-8", "replace")
        try:
            check_offer(offer, ("video", "audio"), sends=True)  # before the stream is asked for
        except OfferError as exc:
            return problem(exc.status, exc.detail)
        ip = ip_of(peer)
        refused = self.caps.admit(ip, "whip")
        if refused:
            return problem(503, refused, ("Retry-After", "5"))
        reply = await self._publish(app, name, query, headers, offer, peer)
        if reply.status != 201:  # no session came of it; a session gives its place back when it ends
            self.caps.release(ip, "whip")
        return reply

    async def _publish(self, app: str, name: str, query: dict[str, str], headers: dict[str, str], offer: str,
                       peer: str) -> Reply:
        from castmesh.webrtc.peer import accept

        session_id = f"whip-{next(_ids)}"
        whip: WhipSession | None = None

        def stop(reason: str) -> None:
            if whip is not None:
                whip.end(reason, clean=False)

        request = StreamRequest(app, name, bearer_query(query, headers), peer, "whip", headers)
        publish = self.publishes.publish(request, pause=lambda paused: None, stop=stop)  # UDP cannot pause
        whip = WhipSession(publish, session_id, f"{app}/{name}", self.idle_timeout, self._ended)
        whip.ip = request.ip
        try:
            await publish.start()
        except Refused as exc:
            whip.ended = True
            return problem(REFUSED_KINDS.get(exc.kind, 403), exc.reason)
        try:
            publisher, text = await accept(offer, self.ice, whip.packet)
        except OfferError as exc:
            whip.end(f"offer refused: {exc.detail}", clean=True)
            return problem(exc.status, exc.detail)
        except Exception as exc:  # aiortc refusing what castmesh's checks let through: the stream goes back
            whip.end(f"offer not answered: {exc!r}", clean=True)
            return problem(500, f"the offer could not be answered: {exc}")
        if whip.ended:  # kicked, or the stream lost, while ICE gathered
            await publisher.close()
            return problem(409, "the publish ended before it was answered")
        whip.attach(publisher, self.handshake_timeout)
        self.sessions[session_id] = whip
        event(log, "whip.start", session=session_id, stream=f"{app}/{name}", peer=peer,
              video="video" in publisher.payload_types, audio="audio" in publisher.payload_types)
        return Reply(201, text.encode(), [("Content-Type", "application/sdp"),
                                          ("Location", f"/{app}/{name}/whip/{session_id}"),
                                          ("ETag", f'"{session_id}"')])

    def _ended(self, whip: WhipSession) -> None:
        if self.sessions.get(whip.id) is whip:
            del self.sessions[whip.id]
            self.caps.release(whip.ip, "whip")


CORS = [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "POST, DELETE, PATCH, OPTIONS"),
        ("Access-Control-Allow-Headers", "*, Authorization"),
        ("Access-Control-Expose-Headers", "Location, ETag, Link")]


def whip_app(whip: WhipIngest) -> web.Application:
    """Ingest's own HTTP port (aiohttp, the project's framework for HTTP APIs): WHIP, with CORS so that a
    page on another origin can publish."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read() if request.method in ("POST", "PATCH") else b""
        peer = f"{request.remote or '?'}:{(request.transport.get_extra_info('peername') or ('', 0))[1]}" \
            if request.transport is not None else "?"
        reply = await whip.handle(request.method, request.match_info["app"], request.match_info["stream"],
                                  request.match_info.get("session"), dict(request.query),
                                  {k.lower(): v for k, v in request.headers.items()}, body, peer)
        return web.Response(status=reply.status, body=reply.body, headers=[*CORS, *reply.headers])

    app = web.Application(client_max_size=MAX_OFFER)
    app.router.add_route("*", r"/{app:[A-Za-z0-9_.~-]{1,128}}/{stream:[A-Za-z0-9_.~-]{1,256}}/whip", handle)
    app.router.add_route("*", r"/{app:[A-Za-z0-9_.~-]{1,128}}/{stream:[A-Za-z0-9_.~-]{1,256}}/whip/{session}", handle)
    return app
