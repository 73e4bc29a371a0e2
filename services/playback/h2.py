"""The playback node's HTTP/2 connections (TLS with ALPN h2): the same router and the same requests as
HTTP/1.1 (services.playback.http), one H2Stream per request. h2 (the sans-IO HTTP/2 state machine,
h11's sibling) does the framing, HPACK and flow control; this module only moves bytes and events.

Limits, each closing one connection with a GOAWAY that says why, or resetting one stream: at most
MAX_STREAMS concurrent streams (h2 refuses more), a header list over MAX_REQUEST_HEAD, a request body over
MAX_REQUEST_BODY, more than MAX_RESETS streams reset by the client (the "rapid reset" flood), and a
connection that sends nothing for the idle timeout. What a stream may not send yet (its flow-control
window is shut) waits in that stream's buffer, which counts as the viewer's backlog: the feed's lag
policy skips or drops a viewer whose window stays shut, as it does a slow socket.

WebSocket-FLV is not spoken over HTTP/2 (no extended CONNECT is offered): browsers open an HTTP/1.1
connection for it on the same TLS port, which ALPN allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from opentelemetry.trace import Span

from castmesh.mesh import tracing
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.logs import event
from castmesh.mesh.tls import Choose
from services.playback.formats import H2_FLV, OutputFormat
from services.playback.http import (
    BODY_METHODS,
    CORS,
    MAX_REQUEST_BODY,
    MAX_REQUEST_HEAD,
    SERVED_METHODS,
    Headers,
    Request,
    Router,
)

if TYPE_CHECKING:
    from services.playback.viewer import Viewer

log = logging.getLogger("castmesh.playback")

MAX_STREAMS = 128
MAX_RESETS = 1000  # streams a client may reset over a connection's life before it is closed
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"}


class H2Session(asyncio.Protocol):
    """One HTTP/2 connection."""

    def __init__(self, route: Router, on_gone: Callable[[Any], None], caps: ConnectionCaps | None = None,
                 idle_timeout: float = 60.0) -> None:
        self.route = route
        self.on_gone = on_gone
        self.caps = caps
        self.ip = ""
        self.idle_timeout = idle_timeout
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=True))
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = "?"
        self.streams: dict[int, H2Stream] = {}
        self.resets = 0
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_REQUEST_HEAD,
            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        # Enforced from the first request, not only once the client has acknowledged the setting: a bigger
        # header list (or an HPACK bomb) is a DenialOfServiceError, answered with GOAWAY ENHANCE_YOUR_CALM.
        self.conn.decoder.max_header_list_size = MAX_REQUEST_HEAD
        self.conn.initiate_connection()
        if self.caps is not None:
            ip = peer[0] if peer else "?"
            refused = self.caps.admit(ip, "http")
            if refused:
                self.close(h2.errors.ErrorCodes.REFUSED_STREAM, refused)
                return
            self.ip = ip
        self.flush()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for stream in list(self.streams.values()):
            stream.gone()
        self.streams.clear()
        if self.caps is not None and self.ip:
            self.caps.release(self.ip, "http")
            self.ip = ""

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # h2 has queued a GOAWAY naming the error
            self.close(None, f"HTTP/2 protocol error: {type(exc).__name__}: {exc}")
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self._request(ev)
            elif isinstance(ev, h2.events.DataReceived):
                self._data(ev)
            elif isinstance(ev, h2.events.StreamEnded):
                stream = self.streams.get(ev.stream_id)
                if stream is not None and stream.request is not None and not stream.routed:
                    stream.dispatch()
            elif isinstance(ev, h2.events.StreamReset):
                self.resets += 1
                stream = self.streams.pop(ev.stream_id, None)
                if stream is not None:
                    stream.gone()
                if self.resets > MAX_RESETS:
                    self.close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, f"more than {MAX_RESETS} streams reset")
                    return
            elif isinstance(ev, h2.events.WindowUpdated):
                targets = list(self.streams.values()) if ev.stream_id == 0 else [self.streams.get(ev.stream_id)]
                for stream in targets:
                    if stream is not None:
                        stream.send_pending()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                self.transport.close()
                return
        self._arm()
        self.flush()

    def pause_writing(self) -> None:
        pass  # the streams' backlogs include the transport's buffer (H2Stream.get_write_buffer_size)

    def resume_writing(self) -> None:
        pass

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, code: h2.errors.ErrorCodes | None, reason: str) -> None:
        """Close the connection with a log line; with `code`, after a GOAWAY naming it (None: h2 has
        already queued one for a protocol error)."""
        if self.closed:
            return
        event(log, "http2.close", level=logging.WARNING, peer=self.peer, reason=reason)
        if code is not None:
            self.conn.close_connection(error_code=code, additional_data=reason[:200].encode())
        self.flush()
        self.closed = True
        self.transport.close()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        if not self.streams:
            self.close(h2.errors.ErrorCodes.NO_ERROR, "idle")
        else:
            self._arm()

    def _request(self, ev: h2.events.RequestReceived) -> None:
        fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers or []}
        target = urlsplit(fields.get(":path", "/"))
        request = Request(fields.get(":method", "GET"), target.path, dict(parse_qsl(target.query)),
                          {k: v for k, v in fields.items() if not k.startswith(":")})
        if ":authority" in fields:
            request.headers.setdefault("host", fields[":authority"])
        stream = self.streams[ev.stream_id] = H2Stream(self, ev.stream_id, request)
        if request.method not in BODY_METHODS:
            stream.dispatch()
            return
        length = request.headers.get("content-length", "")  # a body: routed once it has arrived (StreamEnded)
        if length.isdigit() and int(length) > MAX_REQUEST_BODY:
            stream.respond(413, f"request body over {MAX_REQUEST_BODY} bytes\n".encode())

    def _data(self, ev: h2.events.DataReceived) -> None:
        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        stream = self.streams.get(ev.stream_id)
        if stream is None or stream.routed or stream.request is None:
            return
        stream.request.body += ev.data
        if len(stream.request.body) > MAX_REQUEST_BODY:
            stream.respond(413, f"request body over {MAX_REQUEST_BODY} bytes\n".encode())


class H2Stream:
    """One request on an HTTP/2 connection: what the router and a stream's feed talk to, as they talk to
    an HttpSession (respond; or, for HTTP-FLV, start, then the feed writes to `transport`: this stream)."""

    secure = True  # HTTP/2 is spoken over TLS only here

    def __init__(self, session: H2Session, stream_id: int, request: Request) -> None:
        self.session = session
        self.stream_id = stream_id
        self.request: Request | None = request
        self.peer = session.peer
        self.span: Span | None = None
        self.format: OutputFormat = H2_FLV
        self.viewer: Viewer | None = None
        self.done = False
        self.routed = False
        self.streaming = False
        self.pending: list[bytes] = []  # body bytes its flow-control window does not let out yet
        self.pending_size = 0
        self.end_after = False  # end the stream once what is pending has gone

    @property
    def transport(self) -> H2Stream:
        return self

    def dispatch(self) -> None:
        self.routed = True
        assert self.request is not None
        if self.request.method not in SERVED_METHODS:
            self.respond(405, b"only GET, HEAD, POST, PATCH, DELETE and OPTIONS\n",
                         [("Allow", "GET, HEAD, POST, PATCH, DELETE, OPTIONS")])
        else:
            self.session.route(self, self.request)  # type: ignore[arg-type]

    # Short responses ------------------------------------------------------------------------------------

    def respond(self, status: int, body: bytes, headers: Headers | None = None, close: bool = False) -> None:
        if self.done or self.streaming:
            return
        self.routed = True  # a refusal before its body arrived: it is not routed afterwards
        head = [(":status", str(status)), ("server", "castmesh"), *((k.lower(), v) for k, v in CORS),
                ("content-length", str(len(body)))]
        if headers is None or all(k.lower() != "content-type" for k, _ in headers):
            head.append(("content-type", "text/plain; charset=utf-8"))
        head += [(k.lower(), v) for k, v in headers or [] if k.lower() not in HOP_BY_HOP]
        head_only = self.request is not None and self.request.method == "HEAD"
        if self.span is not None:
            tracing.http_done(self.span, status)
            self.span = None
        if not self._send_headers(head, end=head_only or not body):
            return
        self.done = True
        if body and not head_only:
            self.end_after = True
            self.write(body)
        self.session.flush()
        self._forget_if_ended()

    def _send_headers(self, head: list[tuple[str, str]], end: bool) -> bool:
        try:
            self.session.conn.send_headers(self.stream_id, head, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.gone()  # the client reset it meanwhile
            return False
        return True

    def begin(self, status: int, headers: Headers, length: int) -> bool:
        """The head of a long response whose body follows through transport.write (a download), then end()."""
        if self.done or self.request is None:
            return False
        self.streaming = True
        head = [(":status", str(status)), ("server", "castmesh"), *((k.lower(), v) for k, v in CORS),
                ("content-length", str(length)), *((k.lower(), v) for k, v in headers if k.lower() not in HOP_BY_HOP)]
        if not self._send_headers(head, end=self.request.method == "HEAD"):
            return False
        if self.request.method == "HEAD":
            self.done = True
            self.session.flush()
            return False
        return True

    def end(self) -> None:
        if not self.done:
            self.done = True
            self.end_after = True
            self.send_pending()

    # ViewerSink: called by the stream's feed ------------------------------------------------------------

    def start(self, body: bytes) -> bool:
        if self.done or self.request is None:
            return False
        self.streaming = True
        if not self._send_headers([(":status", "200"), ("server", "castmesh"),
                                   *((k.lower(), v) for k, v in CORS), ("content-type", "video/x-flv"),
                                   ("cache-control", "no-cache")], end=self.request.method == "HEAD"):
            return False
        if self.request.method == "HEAD":
            self.done = True
            self.session.flush()
            return False
        self.write(body)
        event(log, "viewer.start", peer=self.peer, path=self.request.path, protocol="http-flv", http="2")
        return True

    def refuse(self, status: int, reason: str) -> None:
        self.respond(status, f"{reason}\n".encode())

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.end_after = True
        self.send_pending()
        event(log, "viewer.stop", peer=self.peer, path=self.request.path if self.request else "?", reason=reason)

    def discontinuity(self) -> None:
        """FLV carries on across a new upstream or publish session: the feed keeps its timestamps going."""

    def watching(self) -> int:
        return 1

    # Output: the feed writes the stream's bytes here ----------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.session.closed or self.stream_id not in self.session.streams:
            return
        self.pending.append(data)
        self.pending_size += len(data)
        self.send_pending()

    def get_write_buffer_size(self) -> int:
        transport = self.session.transport
        return self.pending_size + (transport.get_write_buffer_size() if transport is not None else 0)

    def abort(self) -> None:
        """The feed drops this viewer: reset the stream, not the connection (other streams share it)."""
        self.done = True
        self.pending.clear()
        self.pending_size = 0
        try:
            self.session.conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.session.flush()
        self.session.streams.pop(self.stream_id, None)
        self.gone()

    def send_pending(self) -> None:
        """Send what the stream's and the connection's windows allow, in frames h2 may send."""
        conn = self.session.conn
        try:
            while self.pending:
                room = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = self.pending[0]
                if len(chunk) > room:
                    self.pending[0] = chunk[room:]
                    chunk = chunk[:room]
                else:
                    self.pending.pop(0)
                self.pending_size -= len(chunk)
                conn.send_data(self.stream_id, chunk)
            if not self.pending and self.end_after:
                conn.end_stream(self.stream_id)
                self.end_after = False
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.session.streams.pop(self.stream_id, None)
            self.gone()
            return
        self.session.flush()
        self._forget_if_ended()

    def _forget_if_ended(self) -> None:
        if self.done and not self.pending and not self.end_after:
            self.session.streams.pop(self.stream_id, None)
            if self.viewer is not None:
                self.session.on_gone(self)

    def gone(self) -> None:
        """The stream ended under it (a reset, the connection closed)."""
        if self.span is not None:
            tracing.http_done(self.span, 499)
            self.span = None
        self.done = True
        self.pending.clear()
        self.pending_size = 0
        self.session.on_gone(self)  # the server forgets it if it was a viewer (twice is harmless)


HTTPS_ALPN = ["h2", "http/1.1"]


def by_alpn(http1: Callable[[], asyncio.Protocol], http2: Callable[[], asyncio.Protocol]) -> Choose:
    """An HTTPS port's sessions: HTTP/2 when the client agreed to "h2" in the handshake, HTTP/1.1 otherwise."""
    return lambda alpn: http2() if alpn == "h2" else http1()
