"""A minimal RTMP publisher for benchmarks: plays an FLV file to an RTMP server in real time and records
when each video frame left, so viewers' lag can be measured against the moment of publishing.

Runs in its own process, so the viewers' load does not delay the publisher's clock.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from castmesh.media import amf0
from castmesh.media.flv import FlvReader
from castmesh.rtmp import chunks
from castmesh.rtmp.chunks import ChunkReader, ChunkWriter
from castmesh.rtmp.handshake import HANDSHAKE_SIZE

CSID = {chunks.AUDIO: 4, chunks.VIDEO: 6, chunks.DATA_AMF0: 5}


async def _await_status(reader: asyncio.StreamReader, chunk_reader: ChunkReader, code: str) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError(f"server closed before {code}")
        for message in chunk_reader.feed(data):
            if message.type_id == chunks.COMMAND_AMF0:
                values = amf0.decode(message.payload)
                if values[0] == "onStatus" and isinstance(values[3], dict):
                    if values[3].get("code") == code:
                        return
                    raise ConnectionError(f"server said {values[3].get('code')}: {values[3].get('description')}")
                if values[0] == "_error":
                    raise ConnectionError(f"server refused: {values!r}")


async def publish_file(path: Path, host: str, port: int, app: str, name: str, seconds: float) -> dict[int, float]:
    """Publish up to `seconds` of the file in real time; return {video timestamp: monotonic send time}."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x03" + bytes(8) + os.urandom(HANDSHAKE_SIZE - 8))
    s0s1s2 = await reader.readexactly(1 + 2 * HANDSHAKE_SIZE)
    writer.write(s0s1s2[1 : 1 + HANDSHAKE_SIZE])
    out = ChunkWriter()
    incoming = ChunkReader()
    writer.write(out.set_chunk_size(60000))
    writer.write(out.write(3, 0, chunks.COMMAND_AMF0, 0, amf0.encode(
        "connect", 1.0, {"app": app, "type": "nonprivate", "tcUrl": f"rtmp://{host}:{port}/{app}"})))
    writer.write(out.write(3, 0, chunks.COMMAND_AMF0, 0, amf0.encode("createStream", 2.0, None)))
    writer.write(out.write(3, 0, chunks.COMMAND_AMF0, 1, amf0.encode("publish", 3.0, None, name, "live")))
    await _await_status(reader, incoming, "NetStream.Publish.Start")
    drain = asyncio.get_running_loop().create_task(_discard(reader))

    sent: dict[int, float] = {}
    flv = FlvReader()
    start = time.monotonic()
    first_ts: int | None = None
    with path.open("rb") as clip:
        while True:
            data = clip.read(1 << 16)
            if not data:
                break
            for tag in flv.feed(data):
                first_ts = tag.timestamp if first_ts is None else first_ts
                due = start + (tag.timestamp - first_ts) / 1000
                if due - start > seconds:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(out.write(CSID.get(tag.kind, 7), tag.timestamp, tag.kind, 1, tag.payload))
                if tag.kind == chunks.VIDEO:
                    sent[tag.timestamp] = time.monotonic()
            else:
                continue
            break
    writer.write(out.write(3, 0, chunks.COMMAND_AMF0, 0, amf0.encode("deleteStream", 4.0, None, 1.0)))
    await writer.drain()
    writer.close()
    drain.cancel()
    return sent


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def run_in_process(path: str, host: str, port: int, app: str, name: str, seconds: float, conn: object) -> None:
    """multiprocessing target: publish, then send the send-time table back through the pipe."""
    result = asyncio.run(publish_file(Path(path), host, port, app, name, seconds))
    conn.send(result)  # type: ignore[attr-defined]
