"""SRT publishers: a listener on --srt-port (UDP) whose callers name their stream in the stream id
(castmesh/srt/streamid.py) and send MPEG-TS, which becomes the same frames, in the same publish session
(lease, one publisher per stream, hooks, failover), as an RTMP publish's.

What can be decided in the handshake is, so a caller learns it from libsrt's reject reason: a stream id
that is not understood (1400), a mode other than publish (1405), an address the IP lists deny or a
signed URL that does not check out (1403), an application with a passphrase and a caller without the
right one (libsrt's own BADSECRET). The rest (the stream is taken, a hook says no) is known only after
the accept: that connection is closed with a log line saying why.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

from prometheus_client import Counter

from castmesh.media.elementary import TsFrames
from castmesh.media.frames import make_frame
from castmesh.mesh.access import ip_of
from castmesh.mesh.config import ConfigError
from castmesh.mesh.logs import event
from castmesh.mesh.sessions import Publish, Refused, StreamRequest
from castmesh.srt import libsrt as s
from castmesh.srt.poller import Accepted, SrtPoller
from castmesh.srt.streamid import StreamIdError, parse
from services.ingest.session import Ingest

log = logging.getLogger("castmesh.ingest")

REJECTED = Counter("castmesh_ingest_srt_rejected", "SRT callers rejected in the handshake, by reason", ["reason"])
LIBSRT_REJECT = re.compile(r"rsp\(REJECT\): 10(\d\d) - (.*)")  # libsrt's own reasons (1000 + SRT_REJ_*)


def _libsrt_log(level: int, message: str) -> None:
    """libsrt's warnings, of which castmesh keeps one: a handshake libsrt itself rejected (a wrong or
    missing passphrase, a version or congestion-control mismatch), which no callback reports."""
    found = LIBSRT_REJECT.search(message)
    if found is not None:
        REJECTED.labels("libsrt").inc()
        event(log, "srt.rejected", level=logging.WARNING, code=1000 + int(found[1]), reason=f"libsrt: {found[2]}")
MAX_EARLY = 4 << 20  # TS bytes kept while a publish is being asked for


def parse_passphrases(text: str) -> dict[str, str]:
    """"PASSPHRASE" (every app) or "live=PASS1,studio=PASS2"; each 10 to 79 characters, as SRT requires."""
    text = text.strip()
    if not text:
        return {}
    pairs = {"*": text} if "=" not in text else dict(part.partition("=")[::2] for part in text.split(","))
    for app, phrase in pairs.items():
        if not app or not 10 <= len(phrase) <= 79:
            raise ConfigError(f"--srt-passphrase: {app or '?'}: a passphrase is 10 to 79 characters")
    return pairs


class SrtIngest:
    def __init__(self, ingest: Ingest, passphrases: dict[str, str] | None = None, latency_ms: int = 120,
                 max_bw: int = 0, idle_timeout: float = 5.0) -> None:
        self.ingest = ingest
        self.passphrases = passphrases or {}
        self.latency_ms = latency_ms
        self.max_bw = max_bw
        self.idle_timeout = idle_timeout
        self.poller: SrtPoller | None = None
        self.listener = s.INVALID_SOCK
        self.callback = s.LISTEN_CALLBACK(self._decide)  # kept: libsrt holds only the pointer
        self.publishers: set[SrtPublisher] = set()

    async def listen(self, host: str, port: int) -> Callable[[], None]:
        """Listen on host:port (UDP); the function that stops listening."""
        srt = s.lib()
        s.on_log(_libsrt_log)
        self.poller = SrtPoller(asyncio.get_running_loop())
        sock = s.check("srt_create_socket", srt.srt_create_socket())
        try:
            s.set_int(sock, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
            s.set_int(sock, s.SRTO_RCVSYN, 0)
            s.set_int(sock, s.SRTO_RCVLATENCY, self.latency_ms)
            s.set_int(sock, s.SRTO_PEERIDLETIMEO, int(self.idle_timeout * 1000))
            if self.max_bw:
                s.set_int64(sock, s.SRTO_MAXBW, self.max_bw)
            address = s.sockaddr(host if host not in ("", "0.0.0.0") else "0.0.0.0", port)
            s.check("srt_bind", srt.srt_bind(sock, address, len(address)))
            s.check("srt_listen_callback", srt.srt_listen_callback(sock, self.callback, None))
            s.check("srt_listen", srt.srt_listen(sock, 128))
        except s.SrtError as exc:
            srt.srt_close(sock)
            self.poller.close()
            raise OSError(f"cannot listen on {host}:{port} (SRT): {exc}") from exc
        self.listener = sock
        self.poller.listen(sock, self._accepted)
        return self.close

    def close(self) -> None:
        for publisher in list(self.publishers):
            publisher.stop("the node is stopping")
        if self.poller is not None:
            self.poller.forget(self.listener)
            self.poller.close()
        s.lib().srt_close(self.listener)

    # In libsrt's thread, during the handshake ---------------------------------------------------------

    def _decide(self, opaque: int | None, sock: int, version: int, peer_address: int | None,
                stream_id: bytes | None) -> int:
        peer = s.parse_sockaddr(peer_address)
        try:
            wanted = parse((stream_id or b"").decode("utf-8", "replace"))
        except StreamIdError as exc:
            return self._reject(sock, s.REJX_BAD_REQUEST, "bad_stream_id", peer, str(exc))
        if wanted.mode not in ("publish", ""):
            return self._reject(sock, s.REJX_BAD_MODE, "mode", peer, "this is an ingest port: m=publish only")
        refused = (self.ingest.access.refuse("publish", wanted.app, ip_of(peer))
                   or self.ingest.signer.refuse(wanted.app, wanted.name, wanted.query))
        if refused:
            return self._reject(sock, s.REJX_FORBIDDEN, "refused", peer, refused)
        phrase = self.passphrases.get(wanted.app, self.passphrases.get("*"))
        if phrase:
            s.set_bytes(sock, s.SRTO_PASSPHRASE, phrase.encode())
        return 0

    def _reject(self, sock: int, code: int, kind: str, peer: str, reason: str) -> int:
        s.lib().srt_setrejectreason(sock, code)
        REJECTED.labels(kind).inc()
        event(log, "srt.rejected", level=logging.WARNING, peer=peer, code=code, reason=reason)
        return -1

    # On the loop ----------------------------------------------------------------------------------------

    def _accepted(self, new: Accepted) -> None:
        try:
            wanted = parse(new.stream_id)
        except StreamIdError:  # the callback let it through, so this cannot be; close it all the same
            s.lib().srt_close(new.sock)
            return
        request = StreamRequest(wanted.app, wanted.name, wanted.query, new.peer, "srt")
        publisher = SrtPublisher(self, new.sock, request)
        self.publishers.add(publisher)
        publisher.begin()


class SrtPublisher:
    """One SRT caller publishing: its TS into frames, pushed into its publish session."""

    def __init__(self, owner: SrtIngest, sock: int, request: StreamRequest) -> None:
        self.owner = owner
        self.sock = sock
        self.request = request
        self.frames = TsFrames(encoder="castmesh SRT")
        self.publish: Publish = owner.ingest.publish(request, pause=lambda paused: None, stop=self.stop)
        self.started = False
        self.early = 0
        self.ended = False
        self.task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        assert self.owner.poller is not None
        self.owner.poller.watch(self.sock, self._data, self.stop)
        self.task = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        try:
            await self.publish.start()
        except Refused as exc:
            self.stop(f"refused: {exc.reason}", publish_end=False)
            return
        self.started = True
        event(log, "srt.publish", session=self.publish.id, peer=self.request.peer,
              stream=f"{self.request.app}/{self.request.name}")

    def _data(self, messages: list[bytes]) -> None:
        if self.ended:
            return
        data = b"".join(messages)
        if not self.started:
            self.early += len(data)
            if self.early > MAX_EARLY:
                return  # the publish is slow to be granted: what it will miss is the start of the stream
        for kind, ms, payload in self.frames.feed(data):
            self.publish.push(make_frame(kind, ms, payload))

    def stop(self, reason: str, publish_end: bool = True) -> None:
        """End this caller: its socket closed, its publish ended (the stream waits in grace for it: SRT
        callers on bad links come back)."""
        if self.ended:
            return
        self.ended = True
        self.owner.publishers.discard(self)
        if self.owner.poller is not None:
            self.owner.poller.forget(self.sock)
        s.lib().srt_close(self.sock)
        if publish_end:
            self.publish.end(reason, clean=False)
        event(log, "srt.end", session=self.publish.id, peer=self.request.peer,
              stream=f"{self.request.app}/{self.request.name}", reason=reason, ts_errors=self.frames.errors)
