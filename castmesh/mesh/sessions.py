"""What a protocol's adapter and the node's publish side say to each other, whatever the protocol (RTMP
now; WHIP, SRT and pulled sources next): the adapter turns its source into a StreamRequest and frames, the
publish side (services.ingest.session) turns them into a publish session (auth, hooks, lease, batching,
GOP replay, failover). An adapter needs nothing else of ingest, and ingest nothing of the protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from castmesh.mesh.access import ip_of
from castmesh.proto.v1.media_pb2 import Frame


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Someone asks to publish or play a stream."""

    app: str
    name: str
    query: dict[str, str]  # the URL's query: a signed URL's expires and sign, anything the hooks should see
    peer: str  # the client's address, "ip:port"
    protocol: str  # "rtmp", "whip", "srt"...
    headers: Mapping[str, str] | None = None  # an HTTP request's (lower-case names): X-Forwarded-For

    @property
    def ip(self) -> str:
        return ip_of(self.peer)


class Refused(Exception):
    """The node will not take a publish. `kind` is one word each protocol maps to its own answer:
    unauthorized (a bad signature, a hook said no; RTMP Publish.Unauthorized, HTTP 403), unavailable (no
    relay reachable; Publish.Failed, 503), rejected (the stream is taken, the request is bad; BadName, 409)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Publish(Protocol):
    """One publish, as its adapter drives it. Frames pushed before start() returns are kept (up to a cap)
    and sent once the publish is accepted."""

    id: str  # the publish session's id: in its logs, hooks and spans

    async def start(self) -> None:
        """Ask for the stream (auth, hooks, lease, origin); Refused if it is not taken."""

    def push(self, frame: Frame) -> None: ...

    def end(self, reason: str, clean: bool) -> None:
        """The source is gone (clean: it unpublished; otherwise the stream waits in grace for it)."""


class Publishes(Protocol):
    """The node's publish side (ingest)."""

    def publish(self, request: StreamRequest, pause: Callable[[bool], None],
                stop: Callable[[str], None]) -> Publish:
        """A publish for `request`. `pause(True)` asks the source to stop reading while the origin is behind,
        `pause(False)` to go on; `stop(reason)` ends the source's connection (kicked, or the stream was lost)."""
        ...


@dataclass(slots=True)
class Reply:
    """An HTTP answer from a protocol's adapter, whatever HTTP server carries it (WHIP on ingest's own port,
    or on `castmesh up`'s one)."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


def problem(status: int, detail: str, *headers: tuple[str, str]) -> Reply:
    """An RFC 9457 problem, as WHIP and WHEP answer their errors."""
    body = json.dumps({"type": "about:blank", "status": status, "detail": detail}).encode()
    return Reply(status, body, [("Content-Type", "application/problem+json"), ("Cache-Control", "no-cache"),
                                *headers])


class HttpPublishes(Protocol):
    """Publishes that arrive over HTTP (WHIP): what a node's HTTP server hands them to."""

    async def handle(self, method: str, app: str, name: str, session_id: str | None, query: dict[str, str],
                     headers: dict[str, str], body: bytes, peer: str) -> Reply:
        """One request on /{app}/{name}/whip[/{session_id}]; header names in lower case."""
        ...
