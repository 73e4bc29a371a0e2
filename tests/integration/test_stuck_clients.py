"""Clients that stop reading or go silent cost bounded resources and disturb nobody else."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from pathlib import Path

from services.ingest.lease import FixedLease
from services.ingest.session import Ingest
from tests.integration.harness import (
    Castmesh,
    Up,
    free_port,
    http_get,
    publish,
    wait_live,
    watch_in_background,
)
from tests.rtmp_bytes import ClientMessages, handshake


def test_a_viewer_that_stops_reading_is_skipped_then_dropped_and_others_see_nothing(tmp_path: Path) -> None:
    rtmp, http = free_port(), free_port()
    process = Castmesh(["up", "--no-demo", "--host", "127.0.0.1", "--rtmp-port", str(rtmp), "--http-port", str(http),
                        "--max-lag-ms", "1000"], tmp_path / "castmesh.log", "Ctrl-C stops.")
    up = Up(process, rtmp, http)
    try:
        # 8 Mbps CBR (x264 filler data), so a stuck socket's kernel buffers fill within seconds.
        publisher = publish(up.rtmp("fat"), 14, fps=30, gop=30, extra=[
            "-b:v", "8M", "-minrate", "8M", "-maxrate", "8M", "-bufsize", "1M", "-x264-params", "nal-hrd=cbr",
            "-preset", "ultrafast"])
        wait_live(up.flv("fat"))
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", http))
        stuck.sendall(b"GET /live/fat.flv HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads again
        seen, viewer = watch_in_background(up.flv("fat"), 25)
        deadline = time.monotonic() + 13
        while "viewer.drop" not in process.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "viewer.drop" in process.log(), "the stuck viewer was not dropped"
        metrics = http_get(f"http://127.0.0.1:{http}/metrics").read().decode()
        assert "castmesh_playback_viewer_skips_total 1.0" in metrics
        assert "castmesh_playback_viewer_drops_total 1.0" in metrics
        stuck.settimeout(5)
        try:
            while stuck.recv(1 << 20):
                pass  # what was already in flight, then the end
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        stuck.close()
        assert closed
        publisher.wait(30)
        viewer.join(30)
        assert seen.ended_cleanly
        video = [t.timestamp for t in seen.video()]
        assert max(b - a for a, b in itertools.pairwise(video[1:])) <= 70  # the healthy viewer never skipped
    finally:
        process.stop()


async def _closed_within(port: int, payload: bytes, seconds: float) -> float | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
    except TimeoutError:
        return None
    finally:
        writer.close()
    return time.monotonic() - started


def test_ingest_closes_half_open_and_silent_connections() -> None:
    async def scenario() -> tuple[float | None, float | None, float | None]:
        ingest = Ingest(leases=lambda *_: FixedLease("127.0.0.1:1"), handshake_timeout=0.5, idle_timeout=1.0)
        server = await ingest.listen("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await asyncio.gather(
                _closed_within(port, b"", 5),  # connects, never says anything
                _closed_within(port, b"\x03" + bytes(100), 5),  # half a handshake
                _closed_within(port, handshake() + ClientMessages().connect(), 5),  # connected, then silent
            )
        finally:
            server.close()  # its sweep stops with it

    silent, half, idle = asyncio.run(scenario())
    assert silent is not None and silent < 2.5
    assert half is not None and half < 2.5
    assert idle is not None and 0.8 < idle < 3.5
