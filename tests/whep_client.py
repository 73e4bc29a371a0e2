"""A WHEP viewer for tests, on aiortc (a real WebRTC stack, not castmesh's): POST an offer, take the answer,
decode what arrives, DELETE the session."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from multidict import CIMultiDict


@dataclass
class Watched:
    status: int = 0
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)  # names in any case
    body: str = ""
    first_video: float | None = None  # seconds from the POST to the first decoded picture
    size: tuple[int, int] = (0, 0)
    frames: dict[str, int] = field(default_factory=lambda: {"video": 0, "audio": 0})
    video_times: list[float] = field(default_factory=list)  # time.monotonic() of each decoded picture
    deleted: int = 0


STOCK_VIDEO = ("video/VP8", "video/H264", "video/rtx")  # what aiortc offers and decodes by itself


async def offer(kinds: tuple[str, ...] = ("video", "audio")) -> RTCPeerConnection:
    """An offer to receive, with aiortc's own video codecs only: castmesh.webrtc.peer adds VP9, AV1 and HEVC
    to aiortc's list when a test process imports it, and this viewer could decode none of them."""
    pc = RTCPeerConnection()
    for kind in kinds:
        transceiver = pc.addTransceiver(kind, direction="recvonly")
        if kind == "video":
            transceiver.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("video").codecs
                                             if c.mimeType in STOCK_VIDEO])
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def post(url: str, sdp: str, content_type: str = "application/sdp",
               headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], str]:
    async with aiohttp.ClientSession() as http, http.post(
            url, data=sdp.encode(), headers={"Content-Type": content_type, **(headers or {})}) as response:
        return response.status, CIMultiDict(response.headers), await response.text()


async def request(method: str, url: str) -> tuple[int, CIMultiDict[str], str]:
    async with aiohttp.ClientSession() as http, http.request(method, url) as response:
        return response.status, CIMultiDict(response.headers), await response.text()


async def watch(url: str, seconds: float, delete: bool = True) -> Watched:
    """Play `url` over WHEP for `seconds`, decoding video and audio."""
    pc = await offer()
    seen = Watched()
    started = time.monotonic()

    async def pull(track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            seen.frames[track.kind] += 1
            if track.kind == "video":
                seen.video_times.append(time.monotonic())
            if track.kind == "video" and seen.first_video is None:
                seen.first_video = time.monotonic() - started
                seen.size = (frame.width, frame.height)  # type: ignore[union-attr]

    tasks: list[asyncio.Task[None]] = []
    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(pull(track))))
    try:
        seen.status, seen.headers, seen.body = await post(url, pc.localDescription.sdp)
        if seen.status != 201:
            return seen
        await pc.setRemoteDescription(RTCSessionDescription(sdp=seen.body, type="answer"))
        await asyncio.sleep(seconds)
        if delete:
            seen.deleted = (await request("DELETE", urljoin(url, seen.headers["Location"])))[0]
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()
    return seen
