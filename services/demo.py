"""The demo publisher of `castmesh up`: the ffmpeg from imageio-ffmpeg pushing a test pattern with a tone,
restarted if it exits while the suite runs."""

from __future__ import annotations

import asyncio
import logging

import imageio_ffmpeg

from castmesh.mesh.logs import event

log = logging.getLogger("castmesh.demo")


def publish_command(url: str, size: str = "640x360", fps: int = 30, bitrate: str = "1000k") -> list[str]:
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-g", str(fps * 2),
        "-b:v", bitrate, "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "96k",
        "-f", "flv", url,
    ]


async def run_demo(url: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(
            *publish_command(url), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        event(log, "demo.start", url=url, pid=proc.pid)
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            proc.terminate()
            await waiter
            stopper.cancel()
            return
        stopper.cancel()
        err = (await proc.stderr.read()).decode(errors="replace").strip() if proc.stderr else ""
        event(log, "demo.exit", level=logging.WARNING, code=proc.returncode, error=err[-300:] or "none")
        try:
            await asyncio.wait_for(stop.wait(), timeout=2)
        except TimeoutError:
            pass
