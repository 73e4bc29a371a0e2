"""Record what a real RTMP publisher sends, for the parser tests in tests/data.

Runs castmesh's own sans-IO server connection on a loopback port, accepts one publish, and writes every
byte the client sent (handshake included) to a file. Usage:
    python tools/capture_rtmp.py OUT.bin -- <ffmpeg arguments ending in rtmp://127.0.0.1:{port}/live/cap>
"{port}" in the ffmpeg arguments is replaced with the port chosen.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import cast

import imageio_ffmpeg

from castmesh.rtmp.connection import PublishRequested, ServerConnection


class Recorder(asyncio.Protocol):
    def __init__(self, sink: bytearray, done: asyncio.Event) -> None:
        self.sink, self.done, self.conn = sink, done, ServerConnection()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.sink += data
        for ev in self.conn.receive_data(data):
            if isinstance(ev, PublishRequested):
                self.conn.accept_publish(ev.stream_id)
        self.transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


async def main(out: Path, ffmpeg_args: list[str]) -> None:
    sink = bytearray()
    done = asyncio.Event()
    server = await asyncio.get_running_loop().create_server(lambda: Recorder(sink, done), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    args = [a.replace("{port}", str(port)) for a in ffmpeg_args]
    proc = await asyncio.create_subprocess_exec(imageio_ffmpeg.get_ffmpeg_exe(), *args)
    await proc.wait()
    await asyncio.wait_for(done.wait(), 5)
    server.close()
    out.write_bytes(bytes(sink))
    print(f"{out}: {len(sink)} bytes")


if __name__ == "__main__":
    dash = sys.argv.index("--")
    asyncio.run(main(Path(sys.argv[1]), sys.argv[dash + 1 :]))
