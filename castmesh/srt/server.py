"""One SRT port (UDP) for publish and play: the listener, its handshake decisions, and each accepted
caller handed by its stream id's mode to the node's publish side (ingest: services.ingest.srt) or play
side (playback: services.playback.srt). A node that runs both (`castmesh up`) gives both, so one port
serves both, as with RTMP (castmesh.mesh.rtmp_server); a stream id that names no mode means the one side
a port has, and play where it has both (SRS's and MediaMTX's default).

What can be decided in the handshake is, so a caller learns it from libsrt's reject reason: a stream id
that is not understood (1400), a mode this port does not serve (1405), an address the IP lists deny or a
signed URL that does not check out (1403: the side says), an application with a passphrase and a caller
without the right one (libsrt's own BADSECRET, logged from libsrt's log). What is known only later (the
stream is taken, a hook says no) closes the accepted connection with a log line saying why.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter

from castmesh.mesh.config import ConfigError
from castmesh.mesh.logs import event
from castmesh.srt import libsrt as s
from castmesh.srt.poller import Accepted, SrtPoller
from castmesh.srt.streamid import StreamId, StreamIdError, parse

log = logging.getLogger("castmesh.srt")

REJECTED = Counter("castmesh_srt_rejected", "SRT callers rejected in the handshake, by reason", ["reason"])
LIBSRT_REJECT = re.compile(r"rsp\(REJECT\): 10(\d\d) - (.*)")  # libsrt's own reasons (1000 + SRT_REJ_*)


class SrtSide(Protocol):
    """What a node does with the callers of one mode."""

    def refuse(self, wanted: StreamId, peer: str) -> str:
        """Why this caller may not have the stream ("" if it may): IP lists, signed URLs. In libsrt's thread."""

    def accepted(self, new: Accepted, wanted: StreamId, poller: SrtPoller) -> None:
        """A caller the handshake let in: the side owns its socket from now on. On the loop."""

    def close(self) -> None:
        """End every caller it has (the node is stopping)."""


def _libsrt_log(level: int, message: str) -> None:
    """libsrt's warnings, of which castmesh keeps one: a handshake libsrt itself rejected (a wrong or
    missing passphrase, a version or congestion-control mismatch), which no callback reports."""
    found = LIBSRT_REJECT.search(message)
    if found is not None:
        REJECTED.labels("libsrt").inc()
        event(log, "srt.rejected", level=logging.WARNING, code=1000 + int(found[1]), reason=f"libsrt: {found[2]}")


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


class SrtServer:
    def __init__(self, publishes: SrtSide | None, plays: SrtSide | None, passphrases: dict[str, str] | None = None,
                 latency_ms: int = 120, max_bw: int = 0, idle_timeout: float = 5.0) -> None:
        self.sides = {"publish": publishes, "request": plays}
        self.default_mode = "publish" if plays is None else "request"
        self.passphrases = passphrases or {}
        self.latency_ms = latency_ms
        self.max_bw = max_bw
        self.idle_timeout = idle_timeout
        self.poller: SrtPoller | None = None
        self.listener = s.INVALID_SOCK
        self.callback = s.LISTEN_CALLBACK(self._decide)  # kept: libsrt holds only the pointer

    async def listen(self, host: str, port: int) -> Callable[[], None]:
        """Listen on host:port (UDP); the function that stops listening and ends every caller."""
        srt = s.lib()
        s.on_log(_libsrt_log)
        self.poller = SrtPoller(asyncio.get_running_loop())
        sock = s.check("srt_create_socket", srt.srt_create_socket())
        try:
            s.set_int(sock, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
            s.set_int(sock, s.SRTO_RCVSYN, 0)
            s.set_int(sock, s.SRTO_SNDSYN, 0)
            s.set_int(sock, s.SRTO_LATENCY, self.latency_ms)
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
        for side in self.sides.values():
            if side is not None:
                side.close()
        if self.poller is not None:
            self.poller.forget(self.listener)
            self.poller.close()
        s.lib().srt_close(self.listener)

    def _side(self, wanted: StreamId) -> SrtSide | None:
        return self.sides.get(wanted.mode or self.default_mode)

    # In libsrt's thread, during the handshake ---------------------------------------------------------

    def _decide(self, opaque: int | None, sock: int, version: int, peer_address: int | None,
                stream_id: bytes | None) -> int:
        peer = s.parse_sockaddr(peer_address)
        try:
            wanted = parse((stream_id or b"").decode("utf-8", "replace"))
        except StreamIdError as exc:
            return self._reject(sock, s.REJX_BAD_REQUEST, "bad_stream_id", peer, str(exc))
        side = self._side(wanted)
        if side is None:
            served = " or ".join(f"m={mode}" for mode, side in self.sides.items() if side is not None)
            return self._reject(sock, s.REJX_BAD_MODE, "mode", peer, f"this port takes {served} only")
        refused = side.refuse(wanted, peer)
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
            wanted = None
        side = self._side(wanted) if wanted is not None else None
        if side is None or wanted is None or self.poller is None:
            s.lib().srt_close(new.sock)
            return
        side.accepted(new, wanted, self.poller)
