"""Spike: one pre-encoded 2 Mbps H.264 stream to N WHEP-ish viewers with aiortc.

mode track:  aiortc as documented: a track per viewer returning av.Packet, RTCRtpSender packs per viewer.
mode shared: packetize once per stream (aiortc's H264 packer), per viewer only rewrite SSRC/PT,
             SRTP-protect and send through the viewer's DTLS transport.
"""
import asyncio
import fractions
import struct
import sys
import time

import av
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.h264 import H264Encoder
from aiortc.mediastreams import MediaStreamTrack

MODE = sys.argv[1]
PORT = int(sys.argv[2])
TB = fractions.Fraction(1, 90000)
SSRC = struct.pack("!I", 0x12345678)


def load_aus(path: str) -> list[bytes]:
    container = av.open(path, format="h264")
    return [bytes(p) for p in container.demux(video=0) if p.size]


AUS = load_aus("src.h264")


class Broadcast:
    def __init__(self) -> None:
        self.queues: set[asyncio.Queue] = set()
        self.peers: list = []  # (transport, sender) for shared mode
        self.packer = H264Encoder()
        self.seq = 0

    async def run(self) -> None:
        start = time.monotonic()
        for i in range(10**9):
            au = AUS[i % len(AUS)]
            due = start + i / 30
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pts = i * 3000
            if MODE == "track":
                for q in self.queues:
                    q.put_nowait((au, pts))
            else:
                packet = av.Packet(au)
                packet.pts = pts
                packet.time_base = TB
                payloads, ts = self.packer.pack(packet)
                built = []
                for j, payload in enumerate(payloads):
                    marker = 0x80 if j == len(payloads) - 1 else 0
                    built.append((marker, struct.pack("!HI", self.seq & 0xFFFF, ts & 0xFFFFFFFF), payload))
                    self.seq += 1
                if MODE == "direct":  # whole packets once per stream; per viewer only SRTP and sendto
                    ready = [bytes((0x80, 101 | marker)) + seq_ts + SSRC + payload for marker, seq_ts, payload in built]
                    for transport, _ssrc, _pt in self.peers:
                        if transport.state != "connected":
                            continue
                        pair = transport.transport._connection._nominated.get(1)
                        if pair is None:
                            continue
                        protect, sendto, addr = transport._tx_srtp.protect, pair.protocol.transport.sendto, pair.remote_addr
                        for packet in ready:
                            sendto(protect(packet), addr)
                    continue
                for transport, ssrc, pt in list(self.peers):
                    if transport.state != "connected":
                        continue
                    for marker, seq_ts, payload in built:
                        data = bytes((0x80, pt | marker)) + seq_ts + ssrc + payload
                        try:
                            await transport._send_rtp(data)
                        except ConnectionError:
                            break


B = Broadcast()


class PacketTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.q: asyncio.Queue = asyncio.Queue()
        B.queues.add(self.q)

    async def recv(self):  # type: ignore[override]
        au, pts = await self.q.get()
        packet = av.Packet(au)
        packet.pts = pts
        packet.time_base = TB
        return packet


class Idle(MediaStreamTrack):
    kind = "video"

    async def recv(self):  # type: ignore[override]
        await asyncio.Event().wait()


pcs: set = set()


async def whep(request: web.Request) -> web.Response:
    offer = RTCSessionDescription(sdp=await request.text(), type="offer")
    pc = RTCPeerConnection()
    pcs.add(pc)
    track = PacketTrack() if MODE == "track" else Idle()
    pc.addTrack(track)
    if MODE == "direct":
        pc.getSenders()[0]._ssrc = 0x12345678
    await pc.setRemoteDescription(offer)
    answer = await pc.createAnswer()
    await pc.setLocalDescription(answer)
    if MODE == "direct":
        pc.getSenders()[0]._ssrc = 0x12345678
    if MODE in ("shared", "direct"):
        sender = pc.getSenders()[0]
        transceiver = pc.getTransceivers()[0]
        codec = transceiver._codecs[0]
        B.peers.append((sender.transport, struct.pack("!I", sender._ssrc), codec.payloadType))
    return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp")


async def main() -> None:
    app = web.Application()
    app.router.add_post("/whep", whep)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    print("ready", flush=True)
    await B.run()


asyncio.run(main())
