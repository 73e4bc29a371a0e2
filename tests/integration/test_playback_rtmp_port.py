"""The playback node's RTMP port refuses what is not a play, and closes connections that never ask."""

from __future__ import annotations

import asyncio
import time

import pytest

from castmesh.mesh.rtmp_client import RtmpClient, RtmpRefused
from castmesh.proto.v1.media_pb2 import StreamKey
from castmesh.rtmp.handshake import HANDSHAKE_SIZE
from services.playback.server import Playback, PlaybackSettings
from tests.rtmp_bytes import ClientMessages, decoded_commands, handshake


async def nowhere(key: StreamKey, avoid: set[str]) -> str | None:
    return None


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send `data`; everything the server sends back until it closes, and whether it closed in time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except TimeoutError:
            break
        if not chunk:
            closed = True
            break
        received += chunk
    writer.close()
    return received, closed


def test_publish_garbage_and_silence_on_the_play_port() -> None:
    async def scenario() -> None:
        playback = Playback(nowhere, PlaybackSettings(handshake_timeout=0.5))
        server = await playback.listen_rtmp("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(RtmpRefused) as refused:  # a real client's publish
                await RtmpClient.open("127.0.0.1", port, "live", "x")
            assert refused.value.code == "NetStream.Publish.BadName"
            _, closed = await exchange(port, b"\x09" + b"\x00" * 1600)  # not RTMP version 3
            assert closed
            _, closed = await exchange(port, b"", timeout=3)  # connects and says nothing
            assert closed
            # A play without createStream's answer, on a stream id of its own (some clients do): refused too.
            answer, closed = await exchange(port, handshake() + ClientMessages().connect()
                                            + ClientMessages().command("play", 2.0, None, "nobody", stream_id=1))
            statuses = [c[3]["code"] for c in decoded_commands(answer[1 + 2 * HANDSHAKE_SIZE:])
                        if c[0] == "onStatus"]
            assert statuses == ["NetStream.Play.StreamNotFound"] and closed
            with pytest.raises(RtmpRefused) as refused:
                await RtmpClient.open("127.0.0.1", port, "live", "nobody", mode="play")
            assert refused.value.code == "NetStream.Play.StreamNotFound"
        finally:
            server.close()

    asyncio.run(scenario())
