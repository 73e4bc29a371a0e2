"""Requests handed on to an HTTP service on loopback and answered with its response: how `castmesh up`'s
one public port serves the gateway's API, and how the gateway's own HTTPS port speaks HTTP/2 and HTTP/1.1
through the playback node's sessions (aiohttp, the gateway's server, speaks HTTP/1.1 only). A caller that
came over TLS is named in X-Forwarded-Proto, so the gateway's answers point it at https:// and wss://."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

import aiohttp

from services.playback.http import NO_CACHE, Request

PASSED_ON = ("authorization", "accept", "content-type", "traceparent", "tracestate")  # the caller's trace goes on
PASSED_BACK = ("content-type", "location", "www-authenticate", "cache-control", "retry-after")
MAX_ANSWER = 4 << 20  # bytes of one answer (the gateway's are JSON listings and pages)


class Forwarder:
    """Routes every request it is given to `base` (http://127.0.0.1:PORT)."""

    def __init__(self, base: str, timeout: float = 10.0) -> None:
        self.base = base
        self.timeout = timeout
        self.http: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def route(self, session: Any, request: Request) -> None:
        """A Router (services.playback.http): the answer is written when the service has given it."""
        task = asyncio.get_running_loop().create_task(self.forward(session, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def forward(self, session: Any, request: Request) -> None:
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        query = f"?{urlencode(request.query)}" if request.query else ""
        headers = {k: v for k, v in request.headers.items() if k in PASSED_ON}
        headers["X-Forwarded-Proto"] = "https" if session.secure else "http"
        try:
            async with self.http.request(request.method, f"{self.base}{request.path}{query}", headers=headers,
                                         data=request.body or None, allow_redirects=False) as answer:
                chunks, size = [], 0
                async for chunk in answer.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_ANSWER:
                        raise aiohttp.ClientPayloadError(f"an answer over {MAX_ANSWER} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
                passed = [(k, v) for k, v in answer.headers.items() if k.lower() in PASSED_BACK]
                session.respond(answer.status, body, passed)
        except (aiohttp.ClientError, TimeoutError) as exc:
            session.respond(502, f"the gateway did not answer: {exc}\n".encode(), [NO_CACHE])

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.http is not None:
            await self.http.close()
