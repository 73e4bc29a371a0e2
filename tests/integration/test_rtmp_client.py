"""castmesh's own RTMP client (castmesh.rtmp.client, driven by castmesh.mesh.rtmp_client) against real far
ends: it publishes into ffmpeg listening as an RTMP server, which records what it got, and it plays from
`castmesh up` while ffmpeg publishes there; a refusal arrives as RtmpRefused with the server's reason."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from castmesh.media.flv import FlvReader
from castmesh.mesh.rtmp_client import RtmpClient, RtmpRefused
from castmesh.rtmp import chunks
from tests.integration.harness import FFMPEG, Up, decode, free_port, publish, wait_live


def test_it_publishes_into_ffmpeg_listening_as_an_rtmp_server(tmp_path: Path) -> None:
    clip, received = tmp_path / "clip.flv", tmp_path / "received.flv"
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25:duration=3", "-f", "lavfi", "-i", "sine=duration=3",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    "-f", "flv", str(clip)], check=True, timeout=60)
    port = free_port()
    server = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-listen", "1", "-i",
                               f"rtmp://127.0.0.1:{port}/live/cam", "-c", "copy", "-f", "flv", str(received)],
                              stderr=subprocess.PIPE)

    async def send() -> int:
        for _ in range(100):  # until ffmpeg listens
            try:
                client = await RtmpClient.open("127.0.0.1", port, "live", "cam")
                break
            except OSError:
                await asyncio.sleep(0.1)
        tags = FlvReader().feed(clip.read_bytes())
        for tag in tags:
            client.send_media(tag.kind, tag.timestamp, tag.payload)
            await client.drain()
        await client.close()
        return sum(1 for t in tags if t.kind == chunks.VIDEO)

    try:
        sent_video = asyncio.run(asyncio.wait_for(send(), 30))
        assert server.wait(30) == 0, server.stderr.read() if server.stderr else ""
    finally:
        server.kill()
    counts, errors = decode(str(received))
    assert errors == ""
    assert counts.get(0) == 75 and sent_video >= 75  # every picture arrived (and a sequence header)
    assert counts.get(1, 0) > 100


def test_it_plays_from_castmesh_and_hears_refusals(suite: Up) -> None:
    publisher = publish(suite.rtmp("mirror"), 6, fps=25, gop=25)
    wait_live(suite.flv("mirror"))

    async def play() -> tuple[list[int], str]:
        client = await RtmpClient.open("127.0.0.1", suite.rtmp_port, "live", "mirror", mode="play")
        video = []
        async for media in client.media():
            if media.kind == chunks.VIDEO:
                video.append(media.timestamp)
        await client.close()
        with pytest.raises(RtmpRefused) as refused:
            await RtmpClient.open("127.0.0.1", suite.rtmp_port, "live", "nobody-here", mode="play")
        return video, str(refused.value)

    video, refusal = asyncio.run(asyncio.wait_for(play(), 40))
    assert publisher.wait(30) == 0
    assert len(video) > 100  # ~6 s at 25 fps, from the join (the GOP cache) to the unpublish
    assert video == sorted(video)
    assert refusal.startswith("NetStream.Play.StreamNotFound") and "nobody is publishing" in refusal
