"""gRPC channels and servers with the options every castmesh hop needs.

A frame batch can hold a large keyframe, so the 4 MB default receive limit is raised on both sides.
Keepalive lets a relay notice a vanished peer (half-open TCP) within seconds, not hours. Reconnect backoff
starts at 200 ms and is capped at 1 s instead of gRPC's 1 s and 120 s: a dispatch or relay that restarts
is reached again within about a second of coming back, not after a backoff that grew while it was down
(a refused connect costs next to nothing; BENCHMARKS.md has the dispatch-restart times). With tracing on,
every channel and server carries the tracing interceptors (castmesh.mesh.tracing).
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from castmesh.mesh import tracing

MAX_MESSAGE = 64 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
SERVER_OPTIONS = [*OPTIONS, ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]


def channel(target: str, traced: bool = True) -> grpc.aio.Channel:
    """A channel to `target`; traced=False for media calls, which trace themselves (tracing.media_call)."""
    return grpc.aio.insecure_channel(target, options=OPTIONS,
                                     interceptors=tracing.client_interceptors() if traced else None)


def server() -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=tracing.server_interceptors())


def add_health(srv: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    return servicer


async def mark_serving(servicer: health.aio.HealthServicer, *services: str) -> None:
    for name in ("", *services):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def wait_ready(chan: grpc.aio.Channel, target: str, timeout: float) -> None:
    """Raise ConnectionError naming the target if the channel cannot connect in time."""
    try:
        await asyncio.wait_for(chan.channel_ready(), timeout)
    except TimeoutError as exc:
        raise ConnectionError(f"cannot reach {target} (no answer within {timeout:g}s)") from exc


def bind(srv: grpc.aio.Server, host: str, port: int, what: str) -> int:
    """Listen on host:port; the port actually bound (port 0 picks one). A one-line OSError if it cannot."""
    try:
        bound = srv.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} ({what}): address in use or not available")
    return bound


class ChannelPool:
    """One channel per peer address, shared by every call to that peer. Forget a peer that failed: its
    channel is closed (it would otherwise retry a dead address for ever) and the next call opens a new one."""

    def __init__(self, traced: bool = True) -> None:
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.traced = traced
        self.closing: set[asyncio.Task[None]] = set()

    def get(self, target: str) -> grpc.aio.Channel:
        chan = self.channels.get(target)
        if chan is None:
            chan = self.channels[target] = channel(target, self.traced)
        return chan

    def forget(self, target: str) -> None:
        chan = self.channels.pop(target, None)
        if chan is not None:
            task = asyncio.get_running_loop().create_task(chan.close())
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)

    async def close(self) -> None:
        for chan in self.channels.values():
            await chan.close()
        self.channels.clear()
        await asyncio.gather(*self.closing)
