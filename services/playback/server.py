"""The playback service: HTTP-FLV, WebSocket-FLV, HLS and RTMP viewers, served from one shared StreamFeed
(one upstream subscription) per stream.

HTTP paths:
  /{app}/{stream}.flv                      HTTP-FLV, or WebSocket-FLV with an Upgrade
  /{app}/{stream}.m3u8[?format=ts|fmp4]    HLS (default: TS for H.264, fMP4 for HEVC/AV1/VP9)
  /{app}/{stream}/hls/{muxer}/{segment}    its segments and initialization segments
  /{app}/{stream}.jpg                      its latest keyframe as a JPEG (made by a worker)
  /recordings/{app}/{stream}.m3u8|.mp4     its recordings, as HLS VOD or one MP4 (services.playback.recordings)
  /{app}/{stream}/whep                     WebRTC (WHEP): POST an SDP offer, 201 with the answer
  /{app}/{stream}/whep/{session}           DELETE ends the session (services.playback.webrtc)
  /{app}/{stream}/whip[/{session}]         in `castmesh up` only: WHIP publishers, handed to its ingest
  /metrics                                 Prometheus
  /, /api/streams, /api/recordings         the player page, its stream list and its recordings
  /api/viewers                             this node's viewers per stream (for the gateway)
  /api/v1/..., /healthz, /openapi.json, /docs   in `castmesh up` only: handed to the in-process gateway
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlencode

import grpc
from opentelemetry.trace import Span
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from castmesh.media.frames import path_of, stream_key, stream_path
from castmesh.media.hls import CONTAINERS, multivariant, rendition_report
from castmesh.mesh import tracing
from castmesh.mesh.access import AccessLists, ip_of
from castmesh.mesh.auth import Signer, bearer_query
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.hooks import Hooks
from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.rtmp_server import RtmpPlay, RtmpServer
from castmesh.mesh.sessions import HttpPublishes, StreamRequest
from castmesh.mesh.sessions import problem as sessions_problem
from castmesh.mesh.subscription import Locate
from castmesh.mesh.tls import serve_tls
from castmesh.mesh.tracing import SessionSpan
from castmesh.webrtc.settings import IceSettings, OfferError
from services.playback.feed import BUFFERED, StreamFeed
from services.playback.formats import HLS_FRAMES, HTTP_FLV, WEBRTC_FRAMES, WEBSOCKET_FLV
from services.playback.forward import Forwarder
from services.playback.h2 import H2Session, by_alpn
from services.playback.hls import HlsMuxer
from services.playback.http import NO_CACHE, HttpSession, Request
from services.playback.ladder import Ladder, ListJobs, ladder_of, variants
from services.playback.recordings import RecordingRoutes
from services.playback.rtmp import RtmpPlayer
from services.playback.srt import SrtViewers
from services.playback.viewer import Viewer, ViewerSink
from services.playback.web import ListStreams, WebPage, streams_json


class Thumbnails(Protocol):
    async def get(self, app: str, name: str) -> tuple[int, bytes, str]: ...


if TYPE_CHECKING:  # aiortc and PyAV load with the first WebRTC request
    from castmesh.webrtc.peer import Peer
    from services.playback.webrtc import WebRtcStream

WEBRTC_PATH = re.compile(r"^/(?P<app>[A-Za-z0-9_.~-]{1,128})/(?P<stream>[A-Za-z0-9_.~-]{1,256})/(?P<kind>whep|whip)"
                         r"(?:/(?P<session>[A-Za-z0-9_.~-]{1,128}))?$")
STREAM_PATH = re.compile(r"^/(?P<app>[A-Za-z0-9_.~-]{1,128})/(?P<stream>[A-Za-z0-9_.~-]{1,256})"
                         r"(?:\.(?P<ext>flv|m3u8|jpg)|/hls/(?P<muxer>[0-9a-f]{8}|ll)/(?P<file>[A-Za-z0-9_.-]{1,40}))$")
RECORDING_PATH = re.compile(r"^/recordings/(?P<app>[A-Za-z0-9_.~-]{1,128})/(?P<stream>[A-Za-z0-9_.~-]{1,256}?)"
                            r"(?P<rest>\.m3u8|\.mp4|/[A-Za-z0-9_.~-]{1,128}/[A-Za-z0-9_.-]{1,64}(?:/\d{1,12}-\d{1,9}\.m4s)?)$")
FORMATS = (*CONTAINERS, "llhls")  # llhls: low-latency HLS, fMP4 with partial segments
FORWARDED = ("/api/v1/", "/healthz", "/openapi.json", "/docs")
CACHEABLE = ("Cache-Control", "max-age=600")  # a segment's name always means the same bytes
log = logging.getLogger("castmesh.playback")
PROTOCOLS = (HTTP_FLV.protocol, WEBSOCKET_FLV.protocol, "rtmp", HLS_FRAMES.protocol, WEBRTC_FRAMES.protocol, "srt")
WHEP_METHODS = ("Allow", "POST, DELETE, OPTIONS")
READS = frozenset(("GET", "HEAD"))
LADDER_FRESH = 5.0  # seconds a ladder's membership is used before the job listing is asked again
PLAYLIST_HEADERS = (("Content-Type", "application/vnd.apple.mpegurl"), NO_CACHE)

VIEWERS = Gauge("castmesh_playback_viewers", "Viewers by protocol (HLS: clients that fetched lately)", ["protocol"])
TRANSCODERS = Gauge("castmesh_playback_webrtc_transcoders", "Streams whose AAC is transcoded to Opus for WebRTC")


@dataclass(slots=True, frozen=True)
class PlaybackSettings:
    merge_ms: float = 50.0
    max_lag: float = 3.0
    hls_segment_ms: int = 2000
    hls_window: int = 6
    hls_part_ms: int = 200
    hls_idle: float = 30.0
    handshake_timeout: float = 10.0  # an HTTP request head or an RTMP play must arrive within this
    idle_timeout: float = 60.0  # a kept-alive HTTP connection with no request is closed after this
    ice: IceSettings = field(default_factory=IceSettings)  # where WebRTC media is reachable
    max_webrtc: int = 200  # WebRTC viewers on this node (each costs far more than an FLV viewer)


class Playback:
    def __init__(self, locate: Locate, settings: PlaybackSettings | None = None, node_id: str = "playback",
                 list_streams: ListStreams | None = None, list_jobs: ListJobs | None = None,
                 signer: Signer | None = None,
                 caps: ConnectionCaps | None = None, hooks: Hooks | None = None,
                 access: AccessLists | None = None) -> None:
        self.locate = locate
        self.hooks = hooks or Hooks()
        self.caps = caps or ConnectionCaps("playback")
        self.signer = signer or Signer()
        self.access = access or AccessLists()
        self.list_streams = list_streams
        self.list_jobs = list_jobs  # the cluster's jobs: which streams have ABR ladders
        self.ladders: dict[str, tuple[Ladder, float]] = {}  # stream path -> its ladder, and when last known
        self.thumbnails: Thumbnails | None = None  # where /{app}/{stream}.jpg comes from (workers)
        self.recordings: RecordingRoutes | None = None  # /recordings/...: what workers recorded
        self.page = WebPage()
        self.tasks: set[asyncio.Task[None]] = set()
        self.rtmp_server: RtmpServer | None = None  # this node's own RTMP (and RTMPS) play port
        self.forwarder: Forwarder | None = None  # in `castmesh up`: the in-process gateway gets the API paths
        self.whip: HttpPublishes | None = None  # in `castmesh up`: the in-process ingest's WHIP
        self.settings = settings or PlaybackSettings()
        self.links = RelayLinks()
        self.node_id = node_id
        self.feeds: dict[str, StreamFeed] = {}
        self.clients: dict[str, Viewer] = {}  # by client id: connected viewers, admitted or waiting for on_play
        self.next_client = 0
        self.muxers: dict[tuple[str, str], HlsMuxer] = {}  # (stream path, container) -> its HLS viewer
        self.muxer_ids: dict[tuple[str, str], HlsMuxer] = {}  # the same by (stream path, muxer id), for files
        self.webrtc: dict[str, WebRtcStream] = {}  # stream path -> its packets for WHEP viewers
        self.whep_pending = 0  # offers being answered
        for protocol in PROTOCOLS:
            VIEWERS.labels(protocol).set_function(partial(self.watching, protocol))
        TRANSCODERS.set_function(lambda: sum(1 for stream in self.webrtc.values() if stream.transcoder is not None))
        BUFFERED.set_function(lambda: sum(viewer.sink.transport.get_write_buffer_size()
                                          for feed in self.feeds.values() for viewer in feed.viewers))

    async def listen(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(self._session, host, port, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from exc

    async def listen_tls(self, host: str, port: int, context: ssl.SSLContext) -> asyncio.Server:
        """HTTPS: HTTP/2 or HTTP/1.1 by ALPN, the same paths as the plain port."""
        return await serve_tls(host, port, context, by_alpn(
            self._session, lambda: H2Session(self.route, self._gone, self.caps, self.settings.idle_timeout)),
            self.settings.handshake_timeout, "playback")

    async def listen_rtmp(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> asyncio.Server:
        """This node's own RTMP port, or RTMPS port with `tls`: plays only (publishes are refused: they go to
        ingest)."""
        if self.rtmp_server is None:
            self.rtmp_server = RtmpServer(None, self, caps=self.caps, handshake_timeout=self.settings.handshake_timeout,
                                          setup_timeout=self.settings.handshake_timeout, node_id=self.node_id)
        if tls is not None:
            return await self.rtmp_server.listen_tls(host, port, tls, "playback")
        return await self.rtmp_server.listen(host, port)

    def play_rtmp(self, request: StreamRequest, play: RtmpPlay) -> Callable[[], None]:
        """Start an RTMP play (from this node's RTMP port, or from the one port of `castmesh up`); the
        function to call once the connection is gone."""
        player = RtmpPlayer(play, request.peer, f"/{request.app}/{request.name}")
        if not request.app:
            player.refuse(404, "connect named no application (rtmp://host/APP/stream)")
            return lambda: None
        refused = self.access.refuse("play", request.app, request.ip) or self.signer.refuse(
            request.app, request.name, request.query)
        if refused:
            player.refuse(403, refused)
            return lambda: None
        self._watch(request.app, request.name, player, "rtmp", request.query, request.peer)
        return lambda: self._gone(player)

    def srt_viewers(self) -> SrtViewers:
        """This node's side of an SRT port (m=request callers: services.playback.srt)."""
        return SrtViewers(self._watch, self._gone, self.access, self.signer)

    # HTTP -----------------------------------------------------------------------------------------------

    def _session(self) -> HttpSession:
        return HttpSession(self.route, self._gone, self.caps, self.settings.handshake_timeout,
                           self.settings.idle_timeout)

    def forward_to(self, base: str) -> None:
        """Hand the gateway's paths (FORWARDED) to the gateway at `base`: one public port for everything."""
        self.forwarder = Forwarder(base)

    def route(self, session: HttpSession, request: Request) -> None:
        match = STREAM_PATH.match(request.path) if request.method in READS else None
        recorded = RECORDING_PATH.match(request.path) if match is None and request.method in READS else None
        if recorded is not None:
            if self.recordings is None:
                session.respond(404, b"no recordings here: they come from workers\n", [NO_CACHE])
            elif not self._refused(session, request, recorded["app"], recorded["stream"]):
                self._spawn(self.recordings.answer(session, request, recorded["app"], recorded["stream"],
                                                   recorded["rest"]))
        elif match is None:
            self._route_other(session, request)
        elif match["ext"] == "flv":
            self._flv(session, request, match["app"], match["stream"])
        elif match["ext"] == "jpg":
            if not self._refused(session, request, match["app"], match["stream"]):
                self._spawn(self._thumbnail(session, match["app"], match["stream"]))
        elif match["ext"] == "m3u8":
            session.span = http_span(request, "/{app}/{stream}.m3u8")
            with tracing.current(session.span):  # the first playlist request starts the stream's feed
                self._playlist(session, request, match["app"], match["stream"])
        else:
            session.span = http_span(request, "/{app}/{stream}/hls/{muxer}/{segment}")
            self._hls_file(session, request, match["app"], match["stream"], match["muxer"], match["file"])

    async def _refresh_ladder(self, app: str, name: str) -> None:
        """The ladders this node knows, as the job listing says now: gone (its job ended), or renewed."""
        assert self.list_jobs is not None
        try:
            ladder = ladder_of(await self.list_jobs(), app, name)
        except grpc.RpcError:
            return
        now = time.monotonic()
        old = self.ladders.get(path_of(app, name))
        for _, member in old[0].members if old is not None else ():
            self.ladders.pop(path_of(app, member), None)
        if ladder is not None:
            for _, member in ladder.members:
                self.ladders[path_of(app, member)] = (ladder, now)

    async def _thumbnail(self, session: HttpSession, app: str, name: str) -> None:
        """The stream's latest keyframe as a JPEG, from the worker that makes it (in `up`, this process's)."""
        if self.thumbnails is None:
            session.respond(404, b"no thumbnails here: they come from workers\n", [NO_CACHE])
            return
        status, body, detail = await self.thumbnails.get(app, name)
        if status == 200:
            session.respond(200, body, [("Content-Type", detail), ("Cache-Control", "max-age=2")])
        else:
            session.respond(status, f"{detail}\n".encode(), [NO_CACHE])

    def _route_other(self, session: HttpSession, request: Request) -> None:
        """Anything but a GET of a stream: the gateway's API (in `castmesh up`), WHEP and WHIP, the page,
        /metrics."""
        if self.forwarder is not None and request.path.startswith(FORWARDED):
            self.forwarder.route(session, request)
            return
        webrtc = WEBRTC_PATH.match(request.path)
        if webrtc is not None and webrtc["kind"] == "whep":
            self._whep(session, request, webrtc["app"], webrtc["stream"], webrtc["session"])
            return
        if webrtc is not None:
            self._spawn(self._whip(session, request, webrtc["app"], webrtc["stream"], webrtc["session"]))
            return
        if request.method == "OPTIONS":
            session.respond(204, b"")
            return
        if request.method not in ("GET", "HEAD"):
            session.respond(405, f"{request.method} is for the gateway's API\n".encode(),
                            [("Allow", "GET, HEAD, OPTIONS")])
            return
        if request.path == "/metrics":
            session.respond(200, generate_latest(), [("Content-Type", CONTENT_TYPE_LATEST), NO_CACHE])
            return
        if request.path == "/api/viewers":  # this node's viewers per stream, for the gateway's listing
            session.respond(200, json.dumps(self.viewer_list()).encode(),
                            [("Content-Type", "application/json"), NO_CACHE])
            return
        if request.path == "/api/streams":
            self._spawn(self._stream_list(session))
            return
        if request.path == "/api/recordings" and self.recordings is not None:
            self._spawn(self.recordings.listing(session))
            return
        page = self.page.file(request.path)
        if page is not None:
            status, body, content_type = page
            session.respond(status, body, [("Content-Type", content_type), NO_CACHE])
            return
        session.respond(404, b"no such path; streams are at /{app}/{stream}.flv or .m3u8\n")

    def _refused(self, session: HttpSession, request: Request, app: str, name: str) -> bool:
        refused = ((self.access.enabled and self.access.refuse("play", app, ip_of(session.peer), request.headers))
                   or self.signer.refuse(app, name, request.query))
        if refused:
            session.respond(403, f"{refused}\n".encode(), [NO_CACHE], close=True)
        return bool(refused)

    def _flv(self, session: HttpSession, request: Request, app: str, name: str) -> None:
        if self._refused(session, request, app, name):
            return
        if request.websocket:
            if request.headers.get("sec-websocket-version") != "13" or not request.headers.get("sec-websocket-key"):
                session.respond(426, b"WebSocket version 13 with a Sec-WebSocket-Key, please\n",
                                [("Sec-WebSocket-Version", "13")], close=True)
                return
            session.format = WEBSOCKET_FLV
        self._watch(app, name, session, session.format.protocol, request.query, session.peer, request.headers)

    def _playlist(self, session: HttpSession, request: Request, app: str, name: str) -> None:
        if self._refused(session, request, app, name):
            return
        container = request.query.get("format", "auto")
        if container not in FORMATS:
            session.respond(400, f"format is one of {', '.join(FORMATS)}\n".encode())
            return
        try:
            want = _blocking_reload(request.query)
        except ValueError as exc:
            session.respond(400, f"{exc}\n".encode(), [NO_CACHE])
            return
        if self.list_jobs is not None and "rendition" not in request.query and want is None:
            self._spawn(self._multivariant(session, request, app, name, container))
            return
        self._media_playlist(session, request, app, name, container, want)

    async def _multivariant(self, session: HttpSession, request: Request, app: str, name: str,
                            container: str) -> None:
        """A stream with an ABR ladder: the multivariant playlist; any other: its media playlist."""
        assert self.list_jobs is not None
        try:
            ladder = ladder_of(await self.list_jobs(), app, name)
            streams = await self.list_streams() if ladder is not None and self.list_streams is not None else []
        except grpc.RpcError:
            ladder = None  # no listing: the stream's own playlist, as if it had no ladder
        if ladder is None or ladder.source != name or not streams:
            self._media_playlist(session, request, app, name, container, None)
            return
        now = time.monotonic()
        for _, member in ladder.members:
            self.ladders[path_of(app, member)] = (ladder, now)
        fmt = {"format": container} if container != "auto" else {}

        def query(stream: str) -> str:
            signed = self.signer.query(app, stream) if "sign" in request.query else ""
            return "&".join(part for part in (urlencode(fmt), signed) if part)

        found = variants(ladder, streams, query)
        session.respond(200, multivariant(found).encode(), PLAYLIST_HEADERS)

    def _media_playlist(self, session: HttpSession, request: Request, app: str, name: str, container: str,
                        want: tuple[int, int] | None) -> None:
        muxer = self.muxers.get((path_of(app, name), container))
        if muxer is None:
            muxer = self._hls_viewer(app, name, container)
        reports = self._reports(app, name, container, request.query) if muxer.segmenter.part_ms else None

        def answer(status: int, body: bytes, reason: str) -> None:
            if status == 200:
                session.respond(200, body + reports() if reports is not None else body, PLAYLIST_HEADERS)
            else:
                session.respond(status, f"{reason}\n".encode(), [NO_CACHE])

        signed: dict[str, str] = {k: request.query[k] for k in ("expires", "sign") if k in request.query}
        suffix = f"?{urlencode(signed)}" if signed else ""  # segments carry the playlist's signature
        muxer.playlist(f"{name}/hls/{muxer.id}/", session.peer, answer, suffix=suffix, want=want,
                       skip=request.query.get("_HLS_skip") in ("YES", "v2"))

    def _reports(self, app: str, name: str, container: str, query: dict[str, str]) -> Callable[[], bytes] | None:
        """For an LL-HLS media playlist of a ladder's stream: its rendition reports, one per other stream of
        the ladder, whose muxers it starts (a report needs the other rendition's newest segment and part)."""
        known = self.ladders.get(path_of(app, name))
        if known is None:
            return None
        ladder, seen = known
        if time.monotonic() - seen > LADDER_FRESH:  # ask again (the job may have ended or changed)
            self.ladders[path_of(app, name)] = (ladder, time.monotonic())
            self._spawn(self._refresh_ladder(app, name))
        others = [member for _, member in ladder.members if member != name]
        for member in others:
            if (path_of(app, member), container) not in self.muxers:
                self._hls_viewer(app, member, container)
        fmt = urlencode({"format": container})

        def reports() -> bytes:
            lines = []
            for member in others:
                muxer = self.muxers.get((path_of(app, member), container))
                if muxer is not None:
                    muxer.last_request = time.monotonic()  # reported on: kept going like one asked for
                if muxer is not None and muxer.segmenter.latest()[0] >= 0:
                    signed = self.signer.query(app, member) if "sign" in query else ""
                    uri = ladder.uri(member, "&".join(p for p in (fmt, signed) if p))
                    lines.append(rendition_report(uri, muxer.segmenter.latest()) + "\n")
            return "".join(lines).encode()

        return reports

    def _hls_file(self, session: HttpSession, request: Request, app: str, name: str, muxer_id: str,
                  file: str) -> None:
        if self._refused(session, request, app, name):
            return
        muxer = self.muxer_ids.get((path_of(app, name), muxer_id))
        if muxer is None:
            session.respond(404, b"no such segment (it may have left the window)\n")
            return

        def answer(status: int, data: bytes, detail: str) -> None:
            if status == 200:
                session.respond(200, data, (("Content-Type", detail), CACHEABLE))
            else:
                session.respond(status, f"{detail}\n".encode(), [NO_CACHE])

        muxer.fetch(file, answer)

    def _hls_viewer(self, app: str, name: str, container: str) -> HlsMuxer:
        """A stream's HLS muxer for one container: a viewer of its feed that stands for every HLS client."""
        feed = self._feed(app, name)
        settings = self.settings
        muxer = HlsMuxer(feed.path, container, settings.hls_segment_ms, settings.hls_window, settings.hls_idle,
                         self._muxer_stopped, part_ms=settings.hls_part_ms)
        self.muxers[(feed.path, container)] = self.muxer_ids[(feed.path, muxer.id)] = muxer
        viewer = Viewer(f"{self.node_id}.hls-{muxer.id}", HLS_FRAMES.protocol, "", muxer, {
            "app": app, "stream": name, "node": self.node_id, "protocol": HLS_FRAMES.protocol}, settings.max_lag)
        viewer.feed = feed
        feed.add(viewer)
        return muxer

    # WHEP -----------------------------------------------------------------------------------------------

    def _whep(self, session: HttpSession, request: Request, app: str, name: str, client_id: str | None) -> None:
        if request.method == "OPTIONS":
            session.respond(204, b"", [("Accept-Post", "application/sdp"), WHEP_METHODS])
        elif client_id is None and request.method == "POST":
            session.span = http_span(request, "/{app}/{stream}/whep")
            self._spawn(self._whep_offer(session, request, app, name))
        elif client_id is not None and request.method == "DELETE":
            viewer = self.clients.get(client_id)
            if viewer is None or viewer.protocol != WEBRTC_FRAMES.protocol or viewer.path != f"{app}/{name}":
                problem(session, 404, "no such WHEP session (it may have ended)")
                return
            viewer.sink.finish("deleted by the viewer")
            session.respond(200, b"")
        elif client_id is not None and request.method == "PATCH":
            problem(session, 405, "trickle ICE and ICE restarts are not supported: put every candidate in the "
                    "offer (castmesh answers with all of its own)", [WHEP_METHODS])
        else:
            problem(session, 405, f"{request.method} is not a WHEP request here", [WHEP_METHODS])

    async def _whip(self, session: HttpSession, request: Request, app: str, name: str, whip_id: str | None) -> None:
        """In `castmesh up`: WHIP publishers on the one HTTP port, handed to the in-process ingest."""
        if self.whip is None:
            problem(session, 404, "WHIP publishes go to an ingest node (its --http-port), not to playback")
            return
        try:
            reply = await self.whip.handle(request.method, app, name, whip_id, request.query, request.headers,
                                           request.body, session.peer)
        except Exception as exc:  # the request is answered whatever happens, and the node goes on
            event(log, "whip.error", level=logging.ERROR, path=request.path, error=repr(exc))
            problem(session, 500, f"the request could not be handled: {exc}")
            return
        session.respond(reply.status, reply.body, reply.headers)

    async def _whep_offer(self, session: HttpSession, request: Request, app: str, name: str) -> None:
        """A WHEP offer: checked, answered once the stream is live, and the viewer started."""
        self.whep_pending += 1  # counted against the cap while it is being answered
        try:
            await self._answer_whep(session, request, app, name)
        finally:
            self.whep_pending -= 1

    async def _answer_whep(self, session: HttpSession, request: Request, app: str, name: str) -> None:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/sdp":
            problem(session, 415, "a WHEP offer is an SDP body with Content-Type: application/sdp")
            return
        refused = self.access.refuse("play", app, ip_of(session.peer), request.headers) or self.signer.refuse(
            app, name, bearer_query(request.query, request.headers))
        if refused:
            problem(session, 403, refused)
            return
        if self.watching(WEBRTC_FRAMES.protocol) + self.whep_pending > self.settings.max_webrtc:
            problem(session, 503, f"this node has its {self.settings.max_webrtc} WebRTC viewers",
                    [("Retry-After", "5")])
            return
        self.next_client += 1
        client_id = f"{self.node_id}.{self.next_client}"
        hook_body: dict[str, Any] = {
            "app": app, "stream": name, "client_ip": session.peer.rpartition(":")[0], "client_id": client_id,
            "node": self.node_id, "protocol": WEBRTC_FRAMES.protocol, "query": request.query}
        if self.hooks.has("on_play"):
            refused = await self.hooks.ask("on_play", hook_body)
            if refused:
                problem(session, 403, refused)
                return
        stream = self._webrtc_stream(app, name)
        stream.pending += 1
        try:
            peer, text = await self._whep_answer(session, request, stream)
            if peer is not None:
                self._whep_start(session, request, stream, peer, text, hook_body)
        finally:
            stream.pending -= 1
            if not stream.viewers and not stream.pending:
                stream.stop("no WebRTC viewers left")

    def _whep_start(self, session: HttpSession, request: Request, stream: WebRtcStream, peer: Peer, text: str,
                    hook_body: dict[str, Any]) -> None:
        """The viewer of an answered offer, and the 201 that tells it where its session is."""
        from services.playback.webrtc import WhepSession

        client_id, app, name = hook_body["client_id"], hook_body["app"], hook_body["stream"]
        sink = WhepSession(stream, peer, client_id, self._gone, self.settings.handshake_timeout)
        viewer = self.clients[client_id] = Viewer(client_id, WEBRTC_FRAMES.protocol, session.peer, sink, hook_body,
                                                  self.settings.max_lag, caller=request.headers)
        viewer.span = SessionSpan(f"{viewer.protocol}.play", {
            "castmesh.stream": f"{app}/{name}", "castmesh.client": client_id, "castmesh.node": self.node_id,
            "net.peer": str(hook_body["client_ip"])}, counters=viewer.counters, context=viewer.caller)
        if stream.viewer is not None and stream.viewer.feed is not None:
            viewer.span.link(cast(StreamFeed, stream.viewer.feed).subscription.trace.carrier(), "feed")
        viewer.feed = stream
        stream.add(viewer)
        event(log, "viewer.start", peer=session.peer, path=f"/{app}/{name}", protocol="webrtc", client=client_id)
        session.respond(201, text.encode(), [("Content-Type", "application/sdp"), NO_CACHE,
                                             ("Location", f"/{app}/{name}/whep/{client_id}"),
                                             ("ETag", f'"{client_id}"')])

    def _webrtc_stream(self, app: str, name: str) -> WebRtcStream:
        """The stream's WebRTC packets: a viewer of its feed, started by its first WHEP viewer."""
        from services.playback.webrtc import WebRtcStream

        feed = self._feed(app, name)
        stream = self.webrtc.get(feed.path)
        if stream is None or stream.stopped:
            stream = self.webrtc[feed.path] = WebRtcStream(feed.path, self._webrtc_stopped)
            viewer = Viewer(f"{self.node_id}.webrtc-{feed.path}", WEBRTC_FRAMES.protocol, "", stream, {
                "app": app, "stream": name, "node": self.node_id, "protocol": WEBRTC_FRAMES.protocol},
                self.settings.max_lag)
            viewer.feed = feed
            feed.add(viewer)
        return stream

    async def _whep_answer(self, session: HttpSession, request: Request,
                           stream: WebRtcStream) -> tuple[Peer | None, str]:
        """The peer and the answer, once the stream is live; or a problem answered, and None."""
        try:
            await stream.ready(self.settings.handshake_timeout)
        except TimeoutError:
            problem(session, 504, f"the stream did not start within {self.settings.handshake_timeout:g}s")
            return None, ""
        if not stream.live or stream.problem:
            problem(session, 422 if stream.live else 404, stream.problem or "no such stream")
            return None, ""
        from castmesh.webrtc.peer import answer

        try:
            peer, text = await answer(request.body.decode("utf-8", "replace"), self.settings.ice, stream.kinds,
                                      stream.ssrcs, lambda: None, stream.mimes)
        except OfferError as exc:
            problem(session, exc.status, exc.detail)
            return None, ""
        except Exception as exc:  # aiortc refusing what castmesh's checks let through
            event(log, "whep.error", level=logging.ERROR, stream=stream.path, error=repr(exc))
            problem(session, 500, f"the offer could not be answered: {exc}")
            return None, ""
        if session.done or stream.stopped:  # the viewer hung up, or the stream ended, while ICE gathered
            await peer.close()
            problem(session, 404, stream.problem or "the stream ended")
            return None, ""
        return peer, text

    def _webrtc_stopped(self, stream: WebRtcStream) -> None:
        if self.webrtc.get(stream.path) is stream:
            del self.webrtc[stream.path]
        viewer = stream.viewer
        if viewer is not None and viewer.feed is not None:
            viewer.feed.remove(viewer)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.recordings is not None:
            await self.recordings.close()
        await self.hooks.close()

    async def _stream_list(self, session: HttpSession) -> None:
        if self.list_streams is None:
            session.respond(404, b"this playback node has no stream directory\n")
            return
        try:
            body = await streams_json(self.list_streams, self.viewers)
        except grpc.RpcError as exc:  # the directory is away: say so, keep serving
            session.respond(502, f"cannot list streams: {exc}\n".encode(), [NO_CACHE])
            return
        session.respond(200, body, [("Content-Type", "application/json"), NO_CACHE])

    def viewers(self, path: str) -> int:
        """Viewers of a stream on this node: FLV and RTMP connections, and HLS clients seen lately."""
        feed = self.feeds.get(path)
        return sum(viewer.sink.watching() for viewer in feed.viewers) if feed is not None else 0

    def watching(self, protocol: str) -> int:
        """Viewers by protocol on this node (read when /metrics is scraped, and for the WebRTC cap)."""
        return sum(viewer.sink.watching() for feed in self.feeds.values() for viewer in feed.viewers
                   if viewer.protocol == protocol)

    def _muxer_stopped(self, muxer: HlsMuxer) -> None:
        if self.muxers.get((muxer.path, muxer.container)) is muxer:
            del self.muxers[(muxer.path, muxer.container)]
        if self.muxer_ids.get((muxer.path, muxer.id)) is muxer:
            del self.muxer_ids[(muxer.path, muxer.id)]
        if not any(path == muxer.path for path, _ in self.muxers):
            self.ladders.pop(muxer.path, None)
        viewer = muxer.viewer
        if viewer is not None and viewer.feed is not None:
            viewer.feed.remove(viewer)

    # Feeds ----------------------------------------------------------------------------------------------

    def _feed(self, app: str, name: str) -> StreamFeed:
        key = stream_key(app, name)
        path = stream_path(key)
        feed = self.feeds.get(path)
        if feed is None or feed.closed:
            settings = self.settings
            feed = self.feeds[path] = StreamFeed(self.locate, self.links, key, settings.merge_ms, settings.max_lag,
                                                 self._feed_closed, self.node_id)
        return feed

    def _watch(self, app: str, name: str, sink: ViewerSink, protocol: str, query: dict[str, str],
               peer: str, headers: dict[str, str] | None = None) -> None:
        """Start a viewer, once the on_play hook (if one is set) allows it."""
        self.next_client += 1
        client_id = f"{self.node_id}.{self.next_client}"
        viewer = self.clients[client_id] = Viewer(client_id, protocol, peer, sink, {
            "app": app, "stream": name, "client_ip": peer.rpartition(":")[0], "client_id": client_id,
            "node": self.node_id, "protocol": protocol, "query": query}, self.settings.max_lag, caller=headers)
        if self.hooks.has("on_play"):
            self._spawn(self._ask_then_watch(app, name, viewer))
        else:
            self._admit(app, name, viewer)

    async def _ask_then_watch(self, app: str, name: str, viewer: Viewer) -> None:
        refused = await self.hooks.ask("on_play", viewer.hook_body)
        if viewer.client_id not in self.clients:
            return  # it left while the hook thought
        if refused:
            viewer.sink.refuse(403, refused)
            return
        self._admit(app, name, viewer)

    def _admit(self, app: str, name: str, viewer: Viewer) -> None:
        """Start the viewer's session span, then the viewer: the span is the parent of the stream's feed
        if this viewer is the one that starts it, and linked to it otherwise."""
        viewer.span = SessionSpan(f"{viewer.protocol}.play", {
            "castmesh.stream": f"{app}/{name}", "castmesh.client": viewer.client_id, "castmesh.node": self.node_id,
            "net.peer": str(viewer.hook_body["client_ip"])}, counters=viewer.counters, context=viewer.caller)
        with tracing.current(viewer.span.span):
            feed = viewer.feed = self._feed(app, name)
        feed.add(viewer)

    def _gone(self, sink: ViewerSink) -> None:
        viewer = sink.viewer
        if viewer is None or self.clients.pop(viewer.client_id, None) is None:
            return
        if viewer.feed is None:
            return  # never admitted: refused, or it left while the on_play hook thought
        if viewer.span is not None:
            viewer.span.end("left")
        viewer.feed.remove(viewer)
        self.hooks.tell("on_stop", viewer.hook_body)

    def kick(self, client_id: str, reason: str = "") -> int:
        """Disconnect one viewer (an operator's kick through the gateway)."""
        viewer = self.clients.get(client_id)
        if viewer is None or viewer.feed is None:
            return 0
        why = f"kicked: {reason or 'by an administrator'}"
        viewer.moment("disconnect", reason=why)
        viewer.sink.finish(why)
        return 1

    def viewer_list(self) -> dict[str, object]:
        """This node's viewers per stream (HLS clients included), and its connected viewers by id."""
        counts = {f"{f.key.app}/{f.key.name}": self.viewers(path) for path, f in self.feeds.items()}
        clients: dict[str, list[dict[str, str]]] = {}
        for viewer in self.clients.values():
            if viewer.feed is not None:
                clients.setdefault(viewer.path, []).append(
                    {"id": viewer.client_id, "protocol": viewer.protocol, "peer": viewer.peer})
        return {"streams": counts, "clients": clients}

    def _feed_closed(self, feed: StreamFeed) -> None:
        if self.feeds.get(feed.path) is feed:
            del self.feeds[feed.path]



def problem(session: HttpSession, status: int, detail: str, headers: list[tuple[str, str]] | None = None) -> None:
    """An RFC 9457 problem for WHEP's and WHIP's clients (and people reading them)."""
    reply = sessions_problem(status, detail, *(headers or []))
    session.respond(reply.status, reply.body, reply.headers)


def http_span(request: Request, route: str) -> Span | None:
    """A request's server span; None with tracing off (then an HLS request decodes none of its headers)."""
    return tracing.http_span(request.method, route, request.path, request.headers) if tracing.enabled() else None


def _blocking_reload(query: dict[str, str]) -> tuple[int, int] | None:
    """_HLS_msn (and _HLS_part) of a blocking playlist reload, as (msn, part; -1 for none); ValueError if
    they are malformed (RFC 8216bis 6.2.5.2: _HLS_part without _HLS_msn is a 400)."""
    msn, part = query.get("_HLS_msn"), query.get("_HLS_part")
    if msn is None:
        if part is not None:
            raise ValueError("_HLS_part needs _HLS_msn")
        return None
    if not msn.isdigit() or len(msn) > 19 or (part is not None and (not part.isdigit() or len(part) > 9)):
        raise ValueError("_HLS_msn and _HLS_part are decimal integers")
    return int(msn), int(part) if part is not None else -1
