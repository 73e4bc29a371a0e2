"""Hand-made client bytes for the server's unit, fuzz and bad-input tests: a handshake and chunked messages
built with castmesh's own writer, sent without waiting for answers, malformed ones included (the reader
under test is checked against captures from ffmpeg separately). This is not a client: a real RTMP session
is castmesh.rtmp.client, which the bench and the client-side tests use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from castmesh.media import amf0
from castmesh.rtmp import chunks
from castmesh.rtmp.chunks import ChunkWriter, Message
from castmesh.rtmp.connection import Event, ServerConnection

DATA = Path(__file__).parent / "data"


def plain_c0c1() -> bytes:
    return b"\x03" + b"\x00" * 8 + os.urandom(1528)


def handshake() -> bytes:
    """C0 + C1 + C2 for a plain handshake (C2 content is not checked by servers)."""
    return plain_c0c1() + os.urandom(1536)


class ClientMessages:
    def __init__(self) -> None:
        self.writer = ChunkWriter()

    def command(self, name: str, tid: float, *args: Any, stream_id: int = 0) -> bytes:
        return self.writer.write(3, 0, chunks.COMMAND_AMF0, stream_id, amf0.encode(name, tid, *args))

    def connect(self, app: str = "live") -> bytes:
        return self.command("connect", 1.0, {"app": app, "tcUrl": f"rtmp://127.0.0.1/{app}", "type": "nonprivate"})

    def publish_sequence(self, name: str = "s") -> bytes:
        return (self.connect() + self.command("createStream", 2.0, None)
                + self.command("publish", 3.0, None, name, "live", stream_id=1))


def connected(events_out: list[Event] | None = None) -> ServerConnection:
    """A server connection past handshake and connect."""
    conn = ServerConnection()
    events = conn.receive_data(handshake() + ClientMessages().connect())
    conn.data_to_send()
    if events_out is not None:
        events_out.extend(events)
    return conn


def server_messages(data: bytes) -> list[Message]:
    """Parse what a server sent (after S0S1S2 if present) as messages."""
    reader = chunks.ChunkReader()
    out: list[Message] = []
    for message in reader.feed(data):
        out.append(message)
    return out


def decoded_commands(data: bytes) -> list[list[Any]]:
    return [amf0.decode(m.payload) for m in server_messages(data) if m.type_id == chunks.COMMAND_AMF0]
