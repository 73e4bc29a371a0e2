"""TLS listeners for every service: HTTPS (playback, the gateway), RTMPS (ingest, playback). The
handshake is the loop's own (start_tls), run per connection instead of create_server(ssl=...), because
that one drops a failed handshake without a word (asyncio and uvloop log it only in debug mode): here each
failure is one `tls.handshake_failed` line with its reason and a count by service and reason. After the
handshake the protocol for the connection is chosen (by ALPN for HTTPS) and takes over.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import cast

from prometheus_client import Counter

from castmesh.mesh.logs import event

log = logging.getLogger("castmesh.tls")

MAX_EARLY = 256 * 1024  # bytes a peer may send around the handshake before the protocol takes over
TLS_FAILURES = Counter("castmesh_tls_handshake_failures", "TLS handshakes that failed or timed out, by service and "
                       "reason (OpenSSL's, or timeout, or closed)", ["service", "reason"])

Choose = Callable[[str | None], asyncio.Protocol]  # the ALPN protocol agreed (or None) -> the connection's protocol


def tls_context(cert: str, key: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and key (TLS 1.2 or later), offering `alpn`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


class Negotiated(asyncio.Protocol):
    """A TLS connection's protocol once the handshake is done, chosen by the ALPN protocol agreed. TlsAccept
    calls connection_made after the handshake; what the peer sent in the same read as its last handshake
    bytes may come before that, and waits here (at most MAX_EARLY)."""

    def __init__(self, choose: Choose) -> None:
        self.choose = choose
        self.inner: asyncio.Protocol | None = None
        self.early: list[bytes] = []
        self.early_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.early_size > MAX_EARLY:
            cast(asyncio.Transport, transport).abort()
            return
        tls = transport.get_extra_info("ssl_object")
        self.inner = self.choose(tls.selected_alpn_protocol() if tls is not None else None)
        self.inner.connection_made(transport)
        early, self.early = self.early, []
        for data in early:
            self.inner.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
        elif self.early_size <= MAX_EARLY:
            self.early.append(data)
            self.early_size += len(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class TlsAccept(asyncio.Protocol):
    """A connection on a TLS port while its handshake runs; then handed to a Negotiated protocol."""

    def __init__(self, context: ssl.SSLContext, choose: Choose, timeout: float, service: str,
                 handshakes: set[asyncio.Task[None]]) -> None:
        self.context = context
        self.choose = choose
        self.timeout = timeout
        self.service = service
        self.handshakes = handshakes
        self.early: list[bytes] = []  # what arrived before start_tls took the transport (a ClientHello)
        self.early_size = 0
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # asyncio's loop then reads nothing before start_tls; uvloop may
        task = asyncio.get_running_loop().create_task(self._handshake())
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    def data_received(self, data: bytes) -> None:
        self.early_size += len(data)
        if self.early_size > MAX_EARLY:
            self.transport.abort()
            return
        self.early.append(data)

    async def _handshake(self) -> None:
        protocol = Negotiated(self.choose)
        loop = asyncio.get_running_loop()
        loop.call_soon(self._hand_over)  # runs after start_tls (below) has put its TLS protocol in place
        try:
            tls = await loop.start_tls(self.transport, protocol, self.context, server_side=True,
                                       ssl_handshake_timeout=self.timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError, as are a reset and the timeout
            kind, reason = handshake_failure(exc)
            TLS_FAILURES.labels(self.service, kind).inc()
            peer = self.transport.get_extra_info("peername")
            event(log, "tls.handshake_failed", level=logging.WARNING, service=self.service,
                  peer=f"{peer[0]}:{peer[1]}" if peer else "?", reason=reason)
            self.transport.abort()
            return
        if tls is None or tls.is_closing():
            return
        protocol.connection_made(tls)

    def _hand_over(self) -> None:
        """Give the TLS protocol (a buffered protocol in asyncio and uvloop alike) the bytes read before it
        was in place; until its connection_made it only stores them."""
        early, self.early = b"".join(self.early), []
        tls = self.transport.get_protocol()
        if not early or tls is self or self.transport.is_closing():
            return
        view = memoryview(early)
        while view:
            buffer = memoryview(cast(asyncio.BufferedProtocol, tls).get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            cast(asyncio.BufferedProtocol, tls).buffer_updated(size)
            view = view[size:]


def handshake_failure(exc: BaseException) -> tuple[str, str]:
    """(a short kind for the metric's label, the reason for the log) of a failed TLS handshake."""
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or "ssl_error").lower(), str(exc)
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "timeout", "no complete handshake within the handshake timeout"
    return "closed", f"the peer went away during the handshake ({type(exc).__name__})"


async def serve_tls(host: str, port: int, context: ssl.SSLContext, choose: Choose, handshake_timeout: float,
                    service: str, what: str = "HTTPS") -> asyncio.Server:
    """A TLS port: each connection's handshake within handshake_timeout, then choose(ALPN) takes it."""
    handshakes: set[asyncio.Task[None]] = set()

    def accept() -> TlsAccept:
        return TlsAccept(context, choose, handshake_timeout, service, handshakes)
    try:
        return await asyncio.get_running_loop().create_server(accept, host, port, reuse_address=True, backlog=1024)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}") from exc


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, valid for a day: (certificate, key) PEM files
    in `directory`. For tests and benchmarks (cryptography comes with aiortc)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "castmesh test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
