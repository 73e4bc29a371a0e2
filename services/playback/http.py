"""The playback node's HTTP/1.1 front: /{app}/{stream}.flv (HTTP-FLV) and /metrics.

h11 parses the request (bounded: a request head over 16 KiB, or one that takes longer than
REQUEST_TIMEOUT to arrive, is refused). For a stream, h11 writes the response head and the feed then
writes pre-framed HTTP chunks straight to the transport: that is the serialize-once path, so h11 is not
asked to frame each chunk per viewer.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from castmesh.mesh.logs import event
from services.playback.formats import HTTP_FLV, OutputFormat

log = logging.getLogger("castmesh.playback")

REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 16 * 1024
FLV_PATH = re.compile(r"^/(?P<app>[A-Za-z0-9_.~-]{1,128})/(?P<stream>[A-Za-z0-9_.~-]{1,256})\.flv$")
CORS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
    ("Access-Control-Allow-Headers", "*"),
    ("Access-Control-Expose-Headers", "*"),
]
SERVER = ("Server", "castmesh")
REASONS = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
           502: b"Bad Gateway"}

OpenStream = Callable[[str, str, "HttpSession"], None]


class HttpSession(asyncio.Protocol):
    """One HTTP connection. Serves one request, then closes (a stream response lasts as long as the stream)."""

    def __init__(self, open_stream: OpenStream, on_gone: Callable[[HttpSession], None]) -> None:
        self.open_stream = open_stream
        self.on_gone = on_gone
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = "?"
        self.streaming = False
        self.head_only = False
        self.target = ""
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.head_bytes = 0
        self.format: OutputFormat = HTTP_FLV

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.done or self.target:
            return  # a viewer has nothing more to say; what it sends is dropped, never buffered
        self.head_bytes += len(data)
        if self.head_bytes > MAX_REQUEST_HEAD:
            # h11's own cap only applies while the head is incomplete; a big head in one read passes it.
            self._simple(431, f"request head over {MAX_REQUEST_HEAD} bytes\n")
            return
        try:
            self.http.receive_data(data)
            ev = self.http.next_event()
        except h11.RemoteProtocolError as exc:
            self._simple(exc.error_status_hint, f"bad request: {exc}\n")
            return
        if isinstance(ev, h11.Request):
            self._route(ev)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.on_gone(self)

    def _timeout(self) -> None:
        if not self.target:
            self._simple(408, "request took too long\n")

    # Routing --------------------------------------------------------------------------------------------

    def _route(self, request: h11.Request) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        method = request.method.decode("ascii", "replace")
        path = urlsplit(request.target.decode("ascii", "replace")).path
        self.target = path
        if method == "OPTIONS":
            self._simple(204, "")
            return
        if method not in ("GET", "HEAD"):
            self._simple(405, "only GET, HEAD and OPTIONS\n", [("Allow", "GET, HEAD, OPTIONS")])
            return
        self.head_only = method == "HEAD"
        if path == "/metrics":
            self._simple(200, generate_latest().decode(), [("Content-Type", CONTENT_TYPE_LATEST)])
            return
        match = FLV_PATH.match(path)
        if match is None:
            self._simple(404, "no such path; streams are at /{app}/{stream}.flv\n")
            return
        self.open_stream(match["app"], match["stream"], self)

    def _simple(self, status: int, body: str, headers: list[tuple[str, str]] | None = None) -> None:
        """A complete small response, then close."""
        if self.done:
            return
        payload = body.encode()
        head = [SERVER, *CORS, ("Connection", "close"), ("Content-Length", str(len(payload)))]
        if headers is None or all(k.lower() != "content-type" for k, _ in headers):
            head.append(("Content-Type", "text/plain; charset=utf-8"))
        head += headers or []
        try:
            out = self.http.send(h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b"")))
        except h11.LocalProtocolError:
            out = b""
        if out:
            self.transport.write(out)
            if not self.head_only:
                self.transport.write(payload)
        self.done = True
        self.transport.close()

    # ViewerSink: called by the stream's feed ------------------------------------------------------------

    def start(self, body: bytes) -> bool:
        """Send the response head and the stream's start; False if this sink will not take frames."""
        if self.done:
            return False
        head = self.http.send(h11.Response(status_code=200, reason=b"OK", headers=[
            SERVER, *CORS, ("Content-Type", "video/x-flv"), ("Cache-Control", "no-cache"),
            ("Connection", "close"), ("Transfer-Encoding", "chunked")]))
        self.streaming = True
        self.transport.write(head)
        if self.head_only:
            self.done = True
            self.transport.close()
            return False
        self.transport.write(body)
        event(log, "viewer.start", peer=self.peer, path=self.target)
        return True

    def refuse(self, status: int, reason: str) -> None:
        self._simple(status, f"{reason}\n")

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.transport.write(b"0\r\n\r\n")
        self.transport.close()
        event(log, "viewer.stop", peer=self.peer, path=self.target, reason=reason)
