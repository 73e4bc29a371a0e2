"""An HTTPS port (castmesh.mesh.tls.serve_tls) on both event loops the services run on: clients that
send their ClientHello the moment they connect are all served (uvloop reads before start_tls takes over,
and those bytes are handed on), and each failed handshake is counted and logged with its reason while a
connection already open is undisturbed."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client import REGISTRY

from castmesh.mesh.tls import self_signed, serve_tls, tls_context
from services.playback.h2 import HTTPS_ALPN, H2Session, by_alpn
from services.playback.http import HttpSession, Request

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("castmesh_tls_handshake_failures_total",
                                     {"service": "unit", "reason": reason}) or 0.0


def route(session: HttpSession, request: Request) -> None:
    session.respond(200, f"{request.path} secure={session.secure}".encode())


async def get(port: int, context: ssl.SSLContext, path: str) -> tuple[bytes, str | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    writer.close()
    return answer, alpn


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_https_port_serves_eager_clients_and_logs_each_failed_handshake(
        loop: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = self_signed(tmp_path)
    client = ssl.create_default_context(cafile=str(cert))
    client.set_alpn_protocols(["http/1.1"])
    before = {reason: failures(reason) for reason in ("http_request", "timeout", "closed")}

    async def main() -> None:
        server = await serve_tls("127.0.0.1", 0, tls_context(str(cert), str(key), HTTPS_ALPN),
                                 by_alpn(lambda: HttpSession(route, lambda _: None),
                                         lambda: H2Session(route, lambda _: None)), 0.5, "unit")
        port = server.sockets[0].getsockname()[1]
        try:
            answers = await asyncio.gather(*(get(port, client, f"/{i}") for i in range(20)))
            for i, (answer, alpn) in enumerate(answers):
                assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(f"/{i} secure=True".encode())
                assert alpn == "http/1.1"
            h2 = ssl.create_default_context(cafile=str(cert))
            h2.set_alpn_protocols(["h2", "http/1.1"])
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=h2, server_hostname="localhost")
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            writer.close()

            reader, kept = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
            plain_r, plain = await asyncio.open_connection("127.0.0.1", port)  # plain HTTP on the HTTPS port
            plain.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(plain_r.read(), 2) == b""
            silent_r, _ = await asyncio.open_connection("127.0.0.1", port)  # never says a word
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(silent_r.read(), 3) == b""
            assert 0.4 < asyncio.get_running_loop().time() - started < 2.0
            _, gone = await asyncio.open_connection("127.0.0.1", port)  # half a record, then gone
            gone.write(b"\x16\x03\x01\x02\x00\x01")
            await gone.drain()
            gone.transport.abort()
            await asyncio.sleep(0.2)
            kept.write(b"GET /still HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"secure=True"), 2)
            assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"/still secure=True")
            kept.close()
            for _ in range(100):  # a socket closes a moment before its handshake's task logs why
                if all(failures(reason) > before[reason] for reason in before):
                    break
                await asyncio.sleep(0.02)
        finally:
            server.close()

    with caplog.at_level(logging.WARNING, logger="castmesh.tls"):
        LOOPS[loop](main())
    for reason in ("http_request", "timeout", "closed"):
        assert failures(reason) == before[reason] + 1, reason
    logged = [r.getMessage() for r in caplog.records if "tls.handshake_failed" in r.getMessage()]
    assert len(logged) == 3 and all("service=unit" in line for line in logged), logged
    assert any("HTTP_REQUEST" in line for line in logged) and any("timeout" in line for line in logged)
