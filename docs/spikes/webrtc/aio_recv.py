"""Spike receivers: N aiortc peers that POST an offer to the WHEP-ish server and count RTP packets
(no jitter buffer, no decoding: the receivers must cost less than the server)."""
import asyncio
import sys
import time

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpreceiver import RTCRtpReceiver

N, URL, SECONDS = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
counts: dict[int, int] = {}
seqs: dict[int, set] = {}


async def count(self, packet, arrival_time_ms=None):  # replaces RTCRtpReceiver._handle_rtp_packet
    counts[id(self)] = counts.get(id(self), 0) + 1
    seqs.setdefault(id(self), set()).add(packet.sequence_number)

RTCRtpReceiver._handle_rtp_packet = count


async def one(session: aiohttp.ClientSession) -> RTCPeerConnection:
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("video", direction="recvonly")
    caps = RTCRtpReceiver.getCapabilities("video")
    transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType == "video/H264"
                                     and c.parameters.get("profile-level-id") == "42e01f"])
    await pc.setLocalDescription(await pc.createOffer())
    async with session.post(URL, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}) as r:
        answer = await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc


async def main() -> None:
    async with aiohttp.ClientSession() as session:
        pcs = []
        for _ in range(N):
            pcs.append(await one(session))
        await asyncio.sleep(5)  # connected and flowing
        print("states", [(pc.iceConnectionState, pc.connectionState) for pc in pcs][:3], flush=True)
        before = dict(counts)
        t0 = time.monotonic()
        print("measure-start", flush=True)
        await asyncio.sleep(SECONDS)
        elapsed = time.monotonic() - t0
        rates = sorted((counts.get(k, 0) - before.get(k, 0)) / elapsed for k in counts)
        print(f"receivers={len(counts)}/{N} pkt/s min={rates[0] if rates else 0:.0f} "
              f"median={rates[len(rates)//2] if rates else 0:.0f} max={rates[-1] if rates else 0:.0f}", flush=True)
        for pc in pcs:
            await pc.close()

asyncio.run(main())
