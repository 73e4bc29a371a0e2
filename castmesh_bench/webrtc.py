"""`castmesh bench webrtc`: WHEP viewers of one real 2 Mbps H.264 + AAC stream on loopback.

Setup as `bench fanout`: relay, ingest and playback run as separate processes; playback is pinned to CPU 0,
everything else (the publisher, the viewers) to the other CPUs. The cached 720p30 clip is published in real
time by a separate process that records when each video frame left, keyed by the frame's content (its last
bytes, which the RTMP tag, the WHIP packets and the WHEP packets all carry unchanged).

Viewers are real WebRTC peers (aiortc): each posts a WHEP offer, completes ICE and DTLS, and keeps
answering ICE consent checks. --sampled of them also decrypt and depacketize the video to time each picture
against its publishing (latency: receipt minus publish, so what the server adds on loopback). The others
count RTP packets as they come off the socket, without SRTP or decoding, so the load generator costs less
than what it measures.

Two parts, in one run:
- latency: only the sampled viewers, once with the stream published over RTMP (castmesh's RTMP client)
  and once over WHIP (an aiortc publisher sending the clip's own H.264, no re-encoding).
- scale (RTMP in): viewers added in stages (--viewers, e.g. 4,100,200,300); per stage, after the ramp:
  playback's CPU% of one core and RSS, the AAC-to-Opus transcode's own CPU (castmesh's
  castmesh_playback_webrtc_transcode_cpu_seconds) and how many transcoders run, packets per viewer per
  second, stalled viewers (no RTP for over a second in the window, or never any), lag of the sampled ones.
Every stage is bounded in time; everything stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp

from castmesh.media.codecs import VideoConfig, VideoSample, annex_b, read_video
from castmesh.media.flv import FlvReader
from castmesh.webrtc.rtp import H264Depacketizer
from castmesh_bench.common import (
    STALL,
    Arrivals,
    Clock,
    cpu_seconds,
    free_port,
    make_clip,
    pct,
    rss_mb,
    spawn,
    stop_all,
    wait_live,
)
from castmesh_bench.rtmp_publisher import run_in_process

HOST = "127.0.0.1"
KEY_BYTES = 32  # a picture's last bytes: the same in the FLV tag (AVCC) and in RTP (Annex-B)
OPEN_AT_ONCE = 10  # WHEP offers in flight while a stage ramps up


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("webrtc", help="WHEP viewers of one 2 Mbps stream: latency (RTMP and WHIP in), "
                            "viewers per core, the transcode's CPU, RSS per viewer",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--viewers", default="4,100,200,300",
                   help="viewer counts of the scale stages, ascending (default 4,100,200,300)")
    p.add_argument("--seconds", type=float, default=15, help="measured seconds per stage (default 15)")
    p.add_argument("--sampled", type=int, default=4, help="viewers that time every picture (default 4)")
    p.add_argument("--parts", default="latency,scale", help="what to run (default latency,scale)")
    p.add_argument("--out", default="bench-out", help="where the clip is cached (default bench-out)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def key(frame_end: bytes) -> bytes:
    return bytes(frame_end[-KEY_BYTES:])


# Viewers ----------------------------------------------------------------------------------------------------

class WhepViewer(Arrivals):
    """One WHEP peer: counts what arrives (sampled: decrypts and times each picture by its content)."""

    def __init__(self, clock: Clock, sampled: bool) -> None:
        self.clock = clock
        self.sampled = sampled
        self.started = time.monotonic()
        self.first_byte = self.last = self.max_gap = 0.0
        self.bytes = self.packets = self.audio_packets = 0
        self.pictures: list[tuple[bytes, float]] = []  # (content key, arrival)
        self.status = 0
        self.pc: Any = None

    async def open(self, http: aiohttp.ClientSession, url: str) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: loopback only
        for kind in ("video", "audio"):
            self.pc.addTransceiver(kind, direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(url, data=self.pc.localDescription.sdp.encode(),
                             headers={"Content-Type": "application/sdp"}) as response:
            self.status, answer = response.status, await response.text()
        if self.status != 201:
            return
        video, audio = (t.receiver for t in self.pc.getTransceivers())
        depacketizer = H264Depacketizer()

        async def on_video(packet: Any, arrival_time_ms: int | None = None) -> None:
            now = time.monotonic()
            self.arrived(now, len(packet.payload))
            self.packets += 1
            if self.sampled:
                picture = depacketizer.push(packet.payload, packet.sequence_number, packet.timestamp, packet.marker)
                if picture is not None and picture[1]:
                    self.pictures.append((key(picture[1][-1]), now))

        async def on_audio(packet: Any, arrival_time_ms: int | None = None) -> None:
            self.audio_packets += 1
            self.packets += not self.sampled

        video._handle_rtp_packet, audio._handle_rtp_packet = on_video, on_audio  # no jitter buffer, no decoding
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    def count_raw(self) -> bool:
        """From now on count RTP and RTCP datagrams off the socket, leaving STUN and DTLS to aiortc: what an
        unsampled viewer does once connected. False if the peer has no ICE pair yet."""
        connection = self.pc.getTransceivers()[0].receiver.transport.transport._connection
        pair = next(iter(connection._nominated.values()), None)
        if pair is None:
            return False
        protocol = pair.protocol
        passed_on = protocol.datagram_received

        def datagram_received(data: bytes, addr: Any) -> None:
            if data and 127 < data[0] < 192:  # RTP or RTCP (RFC 7983)
                self.arrived(time.monotonic(), len(data))
                self.packets += 1
            else:
                passed_on(data, addr)

        protocol.datagram_received = datagram_received
        return True

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()


async def open_whep(url: str, count: int, clock: Clock, sampled: int) -> list[WhepViewer]:
    """`count` viewers, OPEN_AT_ONCE offers at a time; unsampled ones switch to raw counting once connected."""
    viewers = [WhepViewer(clock, sampled=i < sampled) for i in range(count)]
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    async with aiohttp.ClientSession() as http:
        async def one(viewer: WhepViewer) -> None:
            async with gate:
                await viewer.open(http, url)
                deadline = time.monotonic() + 10
                while viewer.status == 201 and not viewer.sampled and time.monotonic() < deadline:
                    if viewer.pc.connectionState == "connected" and viewer.count_raw():
                        return
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one(v) for v in viewers))
    return viewers


# Publishers -------------------------------------------------------------------------------------------------

def whip_publish(clip: str, url: str, seconds: float, conn: Any, stop: Any) -> None:
    """multiprocessing target: publish the clip's H.264 over WHIP in real time (aiortc sends the encoded
    pictures as they are); send back {content key: send time}."""
    pictures: list[tuple[int, bytes, bytes]] = []  # (timestamp, Annex-B picture, content key)
    config: VideoConfig | None = None
    for tag in FlvReader().feed(Path(clip).read_bytes()):
        video = read_video(tag.payload) if tag.kind == 9 else None
        if isinstance(video, VideoConfig):
            config = video
        elif isinstance(video, VideoSample) and config is not None:
            pictures.append((tag.timestamp, annex_b(video, config), key(tag.payload)))
        if pictures and pictures[-1][0] - pictures[0][0] > seconds * 1000:
            break
    asyncio.run(_whip_publish(pictures, url, seconds, conn, stop))


async def _whip_publish(pictures: list[tuple[int, bytes, bytes]], url: str, seconds: float, conn: Any,
                        stop: Any) -> None:
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamTrack

    sent: dict[bytes, float] = {}
    done = asyncio.get_running_loop().create_future()

    class Clip(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.index = 0
            self.start = 0.0

        async def recv(self) -> av.Packet:
            if self.index >= len(pictures) or stop.is_set():
                if not done.done():
                    done.set_result(None)
                await asyncio.sleep(3600)
            timestamp, data, content = pictures[self.index]
            self.start = self.start or time.monotonic() - timestamp / 1000
            delay = self.start + timestamp / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.index += 1
            packet = av.Packet(data)
            packet.pts, packet.time_base = timestamp, Fraction(1, 1000)
            sent[content] = time.monotonic()
            return packet

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(Clip(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http, http.post(
            url, data=pc.localDescription.sdp.encode(), headers={"Content-Type": "application/sdp"}) as response:
        if response.status != 201:
            raise RuntimeError(f"WHIP publish refused: {response.status} {await response.text()}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=await response.text(), type="answer"))
    try:
        await asyncio.wait_for(done, seconds + 30)
    finally:
        await pc.close()
        conn.send(sent)


# Measuring ----------------------------------------------------------------------------------------------

async def _metric(http_port: int, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://{HOST}:{http_port}/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _system_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def _lags(viewers: list[WhepViewer], sent: dict[bytes, float], since: float, until: float) -> list[float]:
    return [(arrival - sent[k]) * 1000 for v in viewers for k, arrival in v.pictures
            if k in sent and since <= arrival <= until]


async def _setup(ingest: str, max_viewers: int, seconds: float, clip: Path,
                 cpus: tuple[set[int] | None, set[int] | None]) -> tuple[list[Any], Any, int, Any, Any]:
    """relay, ingest and playback processes and a publisher started; (procs, playback, its HTTP port, the
    publisher process, (the pipe its send times come back on, the event that stops it))."""
    server_cpus, load_cpus = cpus
    grpc_port, rtmp_port, whip_port, http_port = free_port(), free_port(), free_port(), free_port()
    relay = f"{HOST}:{grpc_port}"
    procs = [spawn(["serve", "relay", "--host", HOST, "--grpc-port", str(grpc_port)], load_cpus)]
    procs.append(spawn(["serve", "ingest", "--host", HOST, "--rtmp-port", str(rtmp_port), "--http-port",
                        str(whip_port), "--relay", relay], load_cpus))
    playback = spawn(["serve", "playback", "--host", HOST, "--http-port", str(http_port), "--rtmp-port", "0",
                      "--relay", relay, "--max-webrtc", str(max_viewers)], server_cpus)
    procs.append(playback)
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    if ingest == "rtmp":
        publisher = ctx.Process(target=run_in_process, args=(str(clip), HOST, rtmp_port, "live", "bench", seconds,
                                                             sender, "content", stop))
    else:
        publisher = ctx.Process(target=whip_publish, args=(str(clip), f"http://{HOST}:{whip_port}/live/bench/whip",
                                                           seconds, sender, stop))
    publisher.start()
    if load_cpus and publisher.pid:
        os.sched_setaffinity(publisher.pid, load_cpus)
    try:
        await wait_live(HOST, http_port, "/live/bench.flv", 20)
    except BaseException:
        publisher.kill()
        stop_all(procs)
        raise
    return procs, playback, http_port, publisher, (receiver, stop)


async def _stage(viewers: list[WhepViewer], playback: Any, http_port: int, clock: Clock,
                 seconds: float) -> dict[str, Any]:
    await asyncio.sleep(2)  # settle after the ramp
    clock.measuring = True
    for v in viewers:
        v.max_gap = 0.0
    packets0 = [v.packets for v in viewers]
    transcode0 = await _metric(http_port, "castmesh_playback_webrtc_transcode_cpu_seconds_total")
    cpu0, sys0, wall0 = cpu_seconds(playback.pid), _system_seconds(playback.pid), time.monotonic()
    load0 = time.process_time()
    rss = 0.0
    while time.monotonic() - wall0 < seconds:
        await asyncio.sleep(1)
        rss = max(rss, rss_mb(playback.pid))
    cpu1, sys1, wall1 = cpu_seconds(playback.pid), _system_seconds(playback.pid), time.monotonic()
    load1 = time.process_time()
    transcode1 = await _metric(http_port, "castmesh_playback_webrtc_transcode_cpu_seconds_total")
    transcoders = await _metric(http_port, "castmesh_playback_webrtc_transcoders")
    watching = await _metric(http_port, 'castmesh_playback_viewers{protocol="webrtc"}')
    clock.measuring = False
    elapsed = wall1 - wall0
    rates = [(v.packets - p0) / elapsed for v, p0 in zip(viewers, packets0, strict=True)]
    return {
        "viewers": len(viewers),
        "answers": dict(Counter(v.status for v in viewers)),
        "watching_per_metrics": int(watching),
        "playback_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 1),
        "playback_system_cpu_pct": round((sys1 - sys0) / elapsed * 100, 1),  # the kernel's part (sendto)
        "load_generator_cpu_pct": round((load1 - load0) / elapsed * 100, 1),
        "viewers_per_core": round(len(viewers) / max(1e-9, (cpu1 - cpu0) / elapsed)),
        "playback_rss_mb": round(rss, 1),
        "transcode_cpu_pct": round((transcode1 - transcode0) / elapsed * 100, 2),
        "transcoders": int(transcoders),
        "packets_per_viewer_s_median": round(statistics.median(rates), 1) if rates else 0,
        "packets_per_viewer_s_min": round(min(rates), 1) if rates else 0,
        "stalled_viewers": sum(1 for v in viewers if not v.first_byte or v.max_gap > STALL),
        "max_gap_s": round(max((v.max_gap for v in viewers), default=0.0), 2),
        "window": (wall0, wall1),
    }


async def _run(ingest: str, stages: list[int], sampled: int, seconds: float, clip: Path,
               cpus: tuple[set[int] | None, set[int] | None]) -> list[dict[str, Any]]:
    length = _length(stages, seconds)
    procs, playback, http_port, publisher, (receiver, stop) = await _setup(ingest, max(stages), length, clip, cpus)
    clock = Clock()
    viewers: list[WhepViewer] = []
    results = []
    url = f"http://{HOST}:{http_port}/live/bench/whep"
    try:
        for count in stages:
            ramp0 = time.monotonic()
            viewers += await open_whep(url, count - len(viewers), clock, max(0, sampled - len(viewers)))
            ramp = time.monotonic() - ramp0
            results.append({**await _stage(viewers, playback, http_port, clock, seconds), "ramp_s": round(ramp, 1)})
    finally:
        stop.set()
        sent: dict[bytes, float] = receiver.recv() if receiver.poll(30) else {}  # before join: a full pipe waits
        publisher.join(10)
        if publisher.is_alive():
            publisher.kill()
        await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)
        stop_all(procs)
    for result in results:
        lags = _lags([v for v in viewers if v.sampled], sent, *result.pop("window"))
        result.update({"ingest": ingest, "lag_ms_p50": round(pct(lags, 0.5), 1),
                       "lag_ms_p95": round(pct(lags, 0.95), 1), "lag_ms_max": round(max(lags), 1) if lags else None,
                       "lag_samples": len(lags),
                       "audio_packets_sampled": sum(v.audio_packets for v in viewers if v.sampled)})
    return results


def _length(stages: list[int], seconds: float) -> float:
    """Stream seconds a run may need: its stages and ramps, generously (the publisher is stopped at the end)."""
    return len(stages) * (seconds + 5) + sum(stages) / 3 + 30


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    pin = len(os.sched_getaffinity(0)) >= 2
    server_cpus = {min(os.sched_getaffinity(0))} if pin else None
    load_cpus = set(os.sched_getaffinity(0)) - (server_cpus or set()) if pin else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    stages = sorted({int(n) for n in args.viewers.split(",")} | {args.sampled})
    parts = args.parts.split(",")
    clip = make_clip(Path(args.out), _length(stages, args.seconds), bframes=False)
    result: dict[str, Any] = {"pinned": pin, "sampled": args.sampled}
    if "latency" in parts:
        for ingest in ("rtmp", "whip"):
            (stage,) = await _run(ingest, [args.sampled], args.sampled, args.seconds, clip, (server_cpus, load_cpus))
            result[f"latency_{ingest}_in"] = stage
    if "scale" in parts:
        result["scale"] = await _run("rtmp", stages, args.sampled, args.seconds, clip, (server_cpus, load_cpus))
        first, last = result["scale"][0], result["scale"][-1]
        if last["viewers"] > first["viewers"]:
            result["rss_mb_per_viewer"] = round((last["playback_rss_mb"] - first["playback_rss_mb"])
                                                / (last["viewers"] - first["viewers"]), 3)
    return result


def report(result: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
