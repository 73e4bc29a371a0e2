"""The playback node's HTTP/1.1 connections: short responses (playlists, segments, pages, /metrics) with
keep-alive, long ones (an HTTP-FLV body, a WebSocket-FLV upgrade) that last as long as the stream.

httptools (llhttp, Node's parser) parses requests; the session bounds what it takes: a request head over
16 KiB (counted as it arrives, so one sent in pieces is stopped too), a body over 64 KiB (only POST and
PATCH have one: a WHEP offer, a trickle-ICE fragment), or a request that takes longer than REQUEST_TIMEOUT
to arrive, is refused, and so are requests piled up (pipelined) behind one still being answered past the
same 16 KiB. A refusal is answered after the requests before it, then the connection closes. The session
only speaks HTTP; what a path means is the router's business (services.playback.server).

Response heads are written here (status line, a prebuilt block of the headers every response has, then
the response's own): this is the hot path of LL-HLS, where a thousand clients each make two requests per
part. httptools and these heads cost a quarter of what h11's parsing and framing did (docs/ARCHITECTURE.md).

For a stream, the session writes the response head and the feed then writes pre-framed bytes straight to
the transport: that is the serialize-once path, so nothing is framed per viewer. What a WebSocket-FLV
viewer sends is read by wsproto, which answers pings and closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qsl

import httptools
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
SERVED_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "DELETE", *BODY_METHODS))
MAX_WEBSOCKET_INPUT = 64 * 1024  # what a viewer may send between two reads of it
INFINITY = float("inf")
CORS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, POST, PATCH, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "*, Authorization"),  # the wildcard never covers Authorization
    ("Access-Control-Expose-Headers", "*, Location, ETag, Link"),
]
SERVER = ("Server", "castmesh")
NO_CACHE = ("Cache-Control", "no-cache")
REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
           403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 406: b"Not Acceptable",
           408: b"Request Timeout", 409: b"Conflict", 411: b"Length Required", 412: b"Precondition Failed",
           413: b"Content Too Large", 415: b"Unsupported Media Type", 422: b"Unprocessable Content",
           428: b"Precondition Required",
           426: b"Upgrade Required", 431: b"Request Header Fields Too Large", 502: b"Bad Gateway",
           503: b"Service Unavailable", 504: b"Gateway Timeout"}

Headers = Sequence[tuple[str, str]]


def header_lines(headers: Headers) -> bytes:
    """Header lines, each ended by CRLF; a value that would break the head (CR or LF in it) is an error."""
    text = "".join(f"{name}: {value}\r\n" for name, value in headers)
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise ValueError(f"a header would break the response head: {headers!r}")
    return text.encode("latin-1")


STATUS_LINES = {status: b"HTTP/1.1 %d %b\r\n" % (status, reason) for status, reason in REASONS.items()}
EVERY_RESPONSE = header_lines([SERVER, *CORS])
PLAIN_TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"


@lru_cache(maxsize=256)
def own_lines(headers: tuple[tuple[str, str], ...]) -> bytes:
    """A response's own header lines, with a plain-text Content-Type unless they name one. Made once per
    set of headers: a few sets (a playlist's, a part's) answer nearly every request."""
    own = header_lines(headers)
    return own if b"content-type:" in own.lower() else PLAIN_TEXT + own


def response_head(status: int, headers: Headers | None, length: int | None, close: bool) -> bytes:
    """An HTTP/1.1 response head: the headers every response has, Content-Length (unless None: a body
    framed otherwise), Connection: close if so, then the response's own headers."""
    return b"%b%b%b%b%b\r\n" % (
        STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status, EVERY_RESPONSE,
        b"Content-Length: %d\r\n" % length if length is not None else b"",
        b"Connection: close\r\n" if close else b"",
        own_lines(tuple(headers)) if headers else PLAIN_TEXT)


METHODS = {method.encode(): method for method in ("GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS")}


def parse_query(query: str) -> dict[str, str]:
    """A query string's fields (the last of a repeated name; empty values left out, as parse_qsl does).
    Percent-encoding is decoded by parse_qsl; a query without any (an LL-HLS reload) is split directly."""
    if "%" in query or "+" in query:
        return dict(parse_qsl(query))
    return {name: value for name, _, value in (field.partition("=") for field in query.split("&")) if value}


class Request:
    """A request as the router sees it. Its headers (names in lower case) are decoded when first asked
    for: an LL-HLS request never asks."""

    __slots__ = ("body", "decoded", "keep_alive", "method", "path", "query", "raw_headers", "size")

    def __init__(self, method: str, path: str, query: dict[str, str], headers: dict[str, str] | None = None,
                 body: bytes = b"", raw_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.decoded = headers
        self.raw_headers = raw_headers or []
        self.body = body  # POST and PATCH only, whole
        self.keep_alive = True  # HTTP/1.1 without Connection: close
        self.size = 0  # on the wire (head and body)

    @property
    def headers(self) -> dict[str, str]:
        if self.decoded is None:
            self.decoded = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.raw_headers}
        return self.decoded

    @property
    def websocket(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket"


Router = Callable[["HttpSession", Request], None]


class Refusal(Exception):
    """A request the parser will not take: answered with `status` (after those before it), then closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


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
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.peer = "?"
        self.secure = False  # over TLS
        self.request: Request | None = None  # the one being answered
        self.queue: deque[Request] = deque()  # complete requests behind it (pipelined), in order
        self.queued = 0  # their bytes, with those of the request being read
        self.refusal: Refusal | None = None  # what the parser refused, answered once those before it are
        self.streaming = False
        self.websocket: WebSocket | None = None
        self.upgrade_data = b""  # what followed a WebSocket request's head, for wsproto once it is accepted
        self.upgraded = False  # the parser stopped at an Upgrade request: it reads nothing more
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = INFINITY  # when the request (or an idle keep-alive) times out: one timer, moved lazily
        self.done = False
        self.span: Span | None = None  # the current request's span, if its route traces it; ended by respond()
        self.format: OutputFormat = HTTP_FLV
        self.viewer: Viewer | None = None  # once a request of it is a viewer
        self.requests = 0
        self.paused = False  # the transport's buffer is full: answer nothing more until it drains
        self.reading = False
        # the request being read (between on_message_begin and on_message_complete)
        self.incoming: Request | None = None
        self.in_message = False
        self.in_head = False
        self.url = b""
        self.header_list: list[tuple[bytes, bytes]] = []
        self.head_size = 0  # its URL and header lines so far, as the parser has passed them on
        self.partial = 0  # what the parser holds of a line not finished yet
        self.url_in_read = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.secure = transport.get_extra_info("ssl_object") is not None
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
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
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
        if self.streaming or self.refusal is not None:
            return  # an HTTP-FLV viewer has nothing more to say; what it sends is dropped, never buffered
        if self.upgraded:
            self._after_upgrade(data)
            return
        self.url_in_read = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            self._after_upgrade(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self.refusal = cause if isinstance(cause, Refusal) else Refusal(400, f"bad request: {cause}")
        except httptools.HttpParserError as exc:
            self.refusal = Refusal(400, f"bad request: {exc}")
        if self.in_head:  # a head arriving in pieces: the parser holds its unfinished line (after the last LF;
            newline = data.rfind(b"\n")  # URL bytes are passed on as they come, and counted as such)
            after = len(data) - newline - 1 if newline >= 0 else self.partial + len(data)
            self.partial = max(0, after - self.url_in_read)
            if self.head_size + self.partial > MAX_REQUEST_HEAD and self.refusal is None:
                self.refusal = Refusal(431, f"request head over {MAX_REQUEST_HEAD} bytes")
        limit = MAX_REQUEST_HEAD + (MAX_REQUEST_BODY if any(r.body for r in self.queue) or (
            self.incoming is not None and self.incoming.method in BODY_METHODS) else 0)
        if self.queued > limit and self.refusal is None:
            # requests piled up behind one that is still being answered (or a client that does not read)
            self.refusal = Refusal(431, f"requests waiting to be answered over {MAX_REQUEST_HEAD} bytes")
            self.queue.clear()
        self._next_request()

    # The parser's callbacks (httptools) ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.request is None and self.requests:
            self._arm(self.request_timeout)  # from the first byte of a kept-alive connection's next request
        self.in_message = self.in_head = True
        self.url = b""
        self.header_list = []
        self.head_size = self.partial = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        self.url_in_read += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_list.append((name, value))
        self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.partial = 0  # the parser holds no unfinished line of this head any more
        raw_method = self.parser.get_method()
        method = METHODS.get(raw_method) or raw_method.decode("ascii", "replace")
        size = self.head_size + len(method) + 13  # the URL and the header lines, the rest of the request line
        if size > MAX_REQUEST_HEAD:
            raise Refusal(431, f"request head over {MAX_REQUEST_HEAD} bytes")
        path, _, query = self.url.decode("ascii", "replace").partition("?")
        request = self.incoming = Request(method, path, parse_query(query) if query else {},
                                          raw_headers=self.header_list)
        request.keep_alive = self.parser.should_keep_alive()
        request.size = size
        if method in BODY_METHODS:
            length = request.headers.get("content-length", "")
            if not length:
                raise Refusal(411, "say the body's Content-Length")
            if int(length) > MAX_REQUEST_BODY:  # the parser has checked it is a number
                raise Refusal(413, f"request body over {MAX_REQUEST_BODY} bytes")

    def on_body(self, body: bytes) -> None:
        request = self.incoming
        assert request is not None
        request.body += body
        request.size += len(body)
        if len(request.body) > MAX_REQUEST_BODY:
            raise Refusal(413, f"request body over {MAX_REQUEST_BODY} bytes")

    def on_message_complete(self) -> None:
        request = self.incoming
        assert request is not None
        self.in_message = False
        self.incoming = None
        self.requests += 1
        self.queue.append(request)
        self.queued += request.size

    def _after_upgrade(self, data: bytes) -> None:
        """Bytes after a request with an Upgrade: a WebSocket's first frames (kept for wsproto, bounded);
        any other upgrade is not spoken here, and the connection closes once that request is answered."""
        self.upgrade_data += data
        if len(self.upgrade_data) > MAX_WEBSOCKET_INPUT:
            self.refusal = Refusal(413, "sent too much before its upgrade was answered")
            self.queue.clear()
            self._next_request()
        for request in self.queue:
            request.keep_alive = False

    # Answering, in order --------------------------------------------------------------------------------

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
            while self.request is None and not self.done:
                if self.queue and not self.paused:
                    request = self.request = self.queue.popleft()
                    self.queued -= request.size
                    self._dispatch(request)
                elif self.refusal is not None and not self.queue:  # (even into a full buffer: it is the last)
                    self.respond(self.refusal.status, f"{self.refusal}\n".encode(), close=True)
                else:
                    return  # more bytes needed, or the client to read what it was sent
        finally:
            self.reading = False

    def _dispatch(self, request: Request) -> None:
        self.deadline = INFINITY  # no timeout while it is answered (a blocking reload, a stream)
        if request.method not in SERVED_METHODS:
            self.respond(405, b"only GET, HEAD, POST, PATCH, DELETE and OPTIONS\n",
                         [("Allow", "GET, HEAD, POST, PATCH, DELETE, OPTIONS")])
        else:
            self.route(self, request)

    def _arm(self, delay: float) -> None:
        """Time out `delay` from now (INFINITY: not at all). One timer per connection, moved lazily: a
        request costs a number stored, not a timer made and cancelled."""
        self.deadline = self.loop.time() + delay
        if self.timer is None and delay != INFINITY:
            self.timer = self.loop.call_at(self.deadline, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.done or self.deadline == INFINITY:
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._timeout)
            return
        if self.request is None:
            if self.requests and not self.in_message:
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
        request = self.request
        close = close or request is None or not request.keep_alive
        head_only = request is not None and request.method == "HEAD"
        head = response_head(status, headers, len(body), close)
        self.transport.writelines((head, body) if body and not head_only else (head,))
        self.request = None
        if self.span is not None:
            tracing.http_done(self.span, status)
            self.span = None
        if close:
            self.done = True
            self.transport.close()
            return
        self._arm(self.request_timeout if self.in_message else self.idle_timeout)
        self._next_request()

    def begin(self, status: int, headers: Headers, length: int) -> bool:
        """The head of a long response whose body follows through transport.write (a download), then end();
        the connection closes after it. False if no body is to follow (a HEAD request, a client gone)."""
        if self.done or self.request is None:
            return False
        self.streaming = True
        self.transport.write(response_head(status, headers, length, close=True))
        if self.request.method == "HEAD":
            self.end()
            return False
        return True

    def end(self) -> None:
        if not self.done:
            self.done = True
            self.transport.close()

    # ViewerSink: called by the stream's feed ------------------------------------------------------------

    def start(self, body: bytes) -> bool:
        """Send the response head and the stream's start; False if this sink will not take frames."""
        if self.done or self.request is None:
            return False
        request = self.request
        self.streaming = True
        if self.format is WEBSOCKET_FLV:
            key = request.headers.get("sec-websocket-key", "").encode()
            head = b"HTTP/1.1 101 Switching Protocols\r\n%b\r\n" % header_lines(
                [SERVER, ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                 ("Sec-WebSocket-Accept", generate_accept_token(key).decode())])
            self.websocket = WebSocket(ConnectionType.SERVER, trailing_data=self.upgrade_data)
            self.upgrade_data = b""
        else:
            head = response_head(200, [("Content-Type", "video/x-flv"), NO_CACHE, ("Transfer-Encoding", "chunked")],
                                 None, close=True)
        self.transport.write(head)
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
