"""The playback node's HTTP/1.1 connections: short responses (playlists, segments, pages, /metrics) with
keep-alive, long ones (an HTTP-FLV body, a WebSocket-FLV upgrade) that last as long as the stream.

h11 parses requests, bounded: a request head over 16 KiB, a body over 64 KiB (only POST and PATCH have
one: a WHEP offer, a trickle-ICE fragment), or a request that takes longer than REQUEST_TIMEOUT to
arrive, is refused, and bytes a client sends while its answer is pending are capped too. The session
only speaks HTTP; what a path means is the router's business (services.playback.server).

For a stream, h11 (or the WebSocket handshake) writes the response head and the feed then writes
pre-framed bytes straight to the transport: that is the serialize-once path, so nothing is framed per
viewer. What a WebSocket-FLV viewer sends is read by wsproto, which answers pings and closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qsl, urlsplit

import h11
from opentelemetry.trace import Span
from wsproto import ConnectionType
from wsproto.connection import Connection as WebSocket
from wsproto.events import CloseConnection, Ping
from wsproto.utilities import RemoteProtocolError as WebSocketError
from wsproto.utilities import generate_accept_token

from castmesh.mesh import tracing
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.logs import event
from services.playback.formats import HTTP_FLV, WEBSOCKET_FLV, OutputFormat

if TYPE_CHECKING:
    from services.playback.viewer import Viewer

log = logging.getLogger("castmesh.playback")

REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0  # a kept-alive connection with no request for this long is closed
MAX_REQUEST_HEAD = 16 * 1024
MAX_REQUEST_BODY = 64 * 1024  # an SDP offer is a few KiB
BODY_METHODS = ("POST", "PATCH")
MAX_WEBSOCKET_INPUT = 64 * 1024  # what a viewer may send between two reads of it
CORS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, POST, PATCH, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "*, Authorization"),  # the wildcard never covers Authorization
    ("Access-Control-Expose-Headers", "*, Location, ETag, Link"),
]
SERVER = ("Server", "castmesh")
REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
           403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 406: b"Not Acceptable",
           408: b"Request Timeout", 409: b"Conflict", 411: b"Length Required", 412: b"Precondition Failed",
           413: b"Content Too Large", 415: b"Unsupported Media Type", 422: b"Unprocessable Content",
           428: b"Precondition Required",
           426: b"Upgrade Required", 431: b"Request Header Fields Too Large", 502: b"Bad Gateway",
           503: b"Service Unavailable", 504: b"Gateway Timeout"}

Headers = list[tuple[str, str]]


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes = b""  # POST and PATCH only, whole

    @property
    def websocket(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket"


Router = Callable[["HttpSession", Request], None]


class HttpSession(asyncio.Protocol):
    def __init__(self, route: Router, on_gone: Callable[[HttpSession], None],
                 caps: ConnectionCaps | None = None, request_timeout: float = REQUEST_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.route = route
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.caps = caps
        self.ip = ""  # set once counted against the caps
        self.on_gone = on_gone
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = "?"
        self.request: Request | None = None  # the one being answered
        self.streaming = False
        self.websocket: WebSocket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.span: Span | None = None  # the current request's span, if its route traces it; ended by respond()
        self.received = 0  # bytes since the current request began
        self.reading_body: Request | None = None  # a POST or PATCH whose body is arriving
        self.format: OutputFormat = HTTP_FLV
        self.viewer: Viewer | None = None  # once a request of it is a viewer
        self.requests = 0
        self.paused = False  # the transport's buffer is full: answer nothing more until it drains
        self.reading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.caps is not None:
            ip = peer[0] if peer else "?"
            refused = self.caps.admit(ip, "http")
            if refused:
                self.respond(503, f"{refused}\n".encode(), [("Retry-After", "5")], close=True)
                event(log, "http.refused", level=logging.WARNING, peer=self.peer, reason=refused)
                return
            self.ip = ip
        self._arm(self.request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self._disarm()
        if self.span is not None:  # left before its answer (a playlist waiting for the first segment)
            tracing.http_done(self.span, 499)
            self.span = None
        if self.caps is not None and self.ip:
            self.caps.release(self.ip, "http")
            self.ip = ""
        self.on_gone(self)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.websocket is not None:
            self._websocket_input(data)
            return
        if self.streaming:
            return  # an HTTP-FLV viewer has nothing more to say; what it sends is dropped, never buffered
        self.received += len(data)
        try:
            self.http.receive_data(data)
        except h11.RemoteProtocolError as exc:
            self.respond(exc.error_status_hint, f"bad request: {exc}\n".encode(), close=True)
            return
        self._next_request()
        body = self.reading_body is not None or (self.request is not None and self.request.method in BODY_METHODS)
        if self.done or self.received <= MAX_REQUEST_HEAD + (MAX_REQUEST_BODY if body else 0):
            return
        # h11's own cap only applies while a head is incomplete; a big head in one read passes it,
        # and so would requests piled up behind one that is still being answered.
        if body:
            self.respond(413, f"request body over {MAX_REQUEST_BODY} bytes\n".encode(), close=True)
        else:
            self.respond(431, f"request head over {MAX_REQUEST_HEAD} bytes\n".encode(), close=True)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._next_request()

    def _next_request(self) -> None:
        """Answer what the client has sent, one request at a time and in order. A loop, not recursion:
        a client may pipeline hundreds of tiny requests."""
        if self.reading:
            return  # respond() called from inside the loop below: the loop carries on by itself
        self.reading = True
        try:
            # while paused, pipelined requests wait in h11's buffer (capped at MAX_REQUEST_HEAD)
            while self.request is None and not self.done and not self.paused:
                try:
                    ev = self.http.next_event()
                except h11.RemoteProtocolError as exc:
                    self.respond(exc.error_status_hint, f"bad request: {exc}\n".encode(), close=True)
                    return
                if isinstance(ev, h11.Request):
                    if len(ev.target) + sum(len(k) + len(v) + 4 for k, v in ev.headers) > MAX_REQUEST_HEAD:
                        self.respond(431, f"request head over {MAX_REQUEST_HEAD} bytes\n".encode(), close=True)
                        return  # (a whole head in one read passes h11's own cap, which is for incomplete ones)
                    target = urlsplit(ev.target.decode("ascii", "replace"))
                    request = Request(ev.method.decode("ascii", "replace"), target.path, dict(parse_qsl(target.query)),
                                      {k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers})
                    self.requests += 1
                    if request.method in BODY_METHODS:
                        self._read_body(request)
                        continue
                    self._disarm()
                    self.request = request
                    self._dispatch(request)
                elif isinstance(ev, h11.Data) and self.reading_body is not None:
                    self.reading_body.body += ev.data
                    if len(self.reading_body.body) > MAX_REQUEST_BODY:
                        self.respond(413, f"request body over {MAX_REQUEST_BODY} bytes\n".encode(), close=True)
                        return
                elif isinstance(ev, h11.EndOfMessage) and self.reading_body is not None:
                    self._disarm()
                    self.request, self.reading_body = self.reading_body, None
                    self._dispatch(self.request)
                elif isinstance(ev, h11.ConnectionClosed):
                    self.transport.close()
                    return
                else:
                    return  # more bytes needed
        finally:
            self.reading = False

    def _read_body(self, request: Request) -> None:
        """A POST or PATCH: its body is read whole (it must say its length, within MAX_REQUEST_BODY) before
        it is routed."""
        self.request = request  # so that a refusal answers this request
        length = request.headers.get("content-length", "")
        if not length:
            self.respond(411, b"say the body's Content-Length\n", close=True)
        elif int(length) > MAX_REQUEST_BODY:  # h11 has checked it is a number
            self.respond(413, f"request body over {MAX_REQUEST_BODY} bytes\n".encode(), close=True)
        else:
            self.request, self.reading_body = None, request

    def _dispatch(self, request: Request) -> None:
        if request.method not in ("GET", "HEAD", "OPTIONS", "DELETE", *BODY_METHODS):
            self.respond(405, b"only GET, HEAD, POST, PATCH, DELETE and OPTIONS\n",
                         [("Allow", "GET, HEAD, POST, PATCH, DELETE, OPTIONS")])
        else:
            self.route(self, request)

    def _arm(self, delay: float) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(delay, self._timeout)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timeout(self) -> None:
        self.timer = None
        if self.request is None and not self.done:
            if self.requests and self.received == 0:
                self.done = True
                self.transport.close()  # an idle kept-alive connection: nothing to say
            else:
                self.respond(408, b"request took too long\n", close=True)

    # Short responses ------------------------------------------------------------------------------------

    def respond(self, status: int, body: bytes, headers: Headers | None = None, close: bool = False) -> None:
        """A complete response. The connection stays open for the next request unless the client (or
        `close`) says otherwise."""
        if self.done or self.streaming:
            return
        head = [SERVER, *CORS, ("Content-Length", str(len(body)))]
        if close:
            head.append(("Connection", "close"))
        if headers is None or all(k.lower() != "content-type" for k, _ in headers):
            head.append(("Content-Type", "text/plain; charset=utf-8"))
        head += headers or []
        head_only = self.request is not None and self.request.method == "HEAD"
        send = self.http.send_with_data_passthrough  # the body is written as it is, never copied
        try:
            out = send(h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))) or []
            if body and not head_only:
                out += send(h11.Data(data=body)) or []
            out += send(h11.EndOfMessage()) or []
        except h11.LocalProtocolError:  # no request was read (a refusal before one): answer plainly
            close = True
            out = [b"HTTP/1.1 %d %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (
                status, REASONS.get(status, b""), len(body), body)]
        self.transport.writelines(out)
        self.request = None
        if self.span is not None:
            tracing.http_done(self.span, status)
            self.span = None
        self._end_of_request()
        if close or self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE:
            self.done = True
            self.transport.close()
            return
        self.http.start_next_cycle()
        self.received = len(self.http.trailing_data[0])
        self._arm(self.idle_timeout if not self.received else self.request_timeout)
        self._next_request()

    def _end_of_request(self) -> None:
        """Read past the rest of the answered request (h11 reports its end as an event of its own); a
        request body that has not all arrived leaves the connection to be closed."""
        try:
            while self.http.their_state is h11.SEND_BODY:
                if self.http.next_event() is h11.NEED_DATA:
                    return
        except h11.RemoteProtocolError:
            return

    # ViewerSink: called by the stream's feed ------------------------------------------------------------

    def start(self, body: bytes) -> bool:
        """Send the response head and the stream's start; False if this sink will not take frames."""
        if self.done or self.request is None:
            return False
        request = self.request
        self.streaming = True
        if self.format is WEBSOCKET_FLV:
            key = request.headers.get("sec-websocket-key", "").encode()
            head = self.http.send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols", headers=[
                SERVER, ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", generate_accept_token(key).decode())]))
            self.websocket = WebSocket(ConnectionType.SERVER, trailing_data=self.http.trailing_data[0])
        else:
            head = self.http.send(h11.Response(status_code=200, reason=b"OK", headers=[
                SERVER, *CORS, ("Content-Type", "video/x-flv"), ("Cache-Control", "no-cache"),
                ("Connection", "close"), ("Transfer-Encoding", "chunked")]))
        self.transport.write(head or b"")
        if request.method == "HEAD":
            self.done = True
            self.transport.close()
            return False
        self.transport.write(body)
        event(log, "viewer.start", peer=self.peer, path=request.path,
              protocol="ws-flv" if self.websocket is not None else "http-flv")
        return True

    def refuse(self, status: int, reason: str) -> None:
        self.respond(status, f"{reason}\n".encode(), close=True)

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if self.websocket is not None:
            self.transport.write(self.websocket.send(CloseConnection(code=1000, reason=reason[:100])))
        else:
            self.transport.write(b"0\r\n\r\n")
        self.transport.close()
        event(log, "viewer.stop", peer=self.peer, path=self.request.path if self.request else "?", reason=reason)

    def discontinuity(self) -> None:
        """FLV carries on across a new upstream or publish session: the feed keeps its timestamps going."""

    def watching(self) -> int:
        return 1

    def _websocket_input(self, data: bytes) -> None:
        """Control frames from a WebSocket-FLV viewer; its data messages mean nothing here and are dropped."""
        assert self.websocket is not None
        if len(data) > MAX_WEBSOCKET_INPUT:
            self.finish("sent too much")
            return
        try:
            self.websocket.receive_data(data)
            for ev in self.websocket.events():
                if isinstance(ev, CloseConnection):
                    self.transport.write(self.websocket.send(ev.response()))
                    self.done = True
                    self.transport.close()
                    return
                if isinstance(ev, Ping):
                    self.transport.write(self.websocket.send(ev.response()))
        except WebSocketError as exc:
            self.finish(f"bad WebSocket input: {exc}")
