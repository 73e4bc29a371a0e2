"""A WHIP publisher's RTP turned into the frames an RTMP publisher would send, with no network: the video
sequence header from the SPS and PPS, AVC pictures with their keyframe flags, the Opus as AAC with its
sequence header first, and the timestamps on one clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from castmesh.media.audio import aac_to_opus
from castmesh.media.codecs import VideoConfig, VideoSample, aac_config, read_audio, read_video
from castmesh.media.frames import AUDIO, VIDEO
from castmesh.proto.v1.media_pb2 import Frame
from castmesh.webrtc.rtp import Packetizer, h264_payloads, parse_header
from services.ingest.whip import WhipSession
from tests.unit.test_audio import aac_tone
from tests.unit.test_rtp import CONFIG, PPS, SPS, sample


@dataclass
class Packet:  # what aiortc hands over: the fields WhipSession reads
    payload: bytes
    sequence_number: int
    timestamp: int
    marker: int
    ssrc: int = 1


class Recorder:
    id = "test"

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.ended: tuple[str, bool] | None = None

    def push(self, frame: Frame) -> None:
        self.frames.append(frame)

    def end(self, reason: str, clean: bool) -> None:
        self.ended = (reason, clean)

    async def start(self) -> None: ...


def rtp(packets: list[bytes]) -> list[Packet]:
    out = []
    for p in packets:
        marker, _, sequence, timestamp, _ = parse_header(p)
        out.append(Packet(p[12:], sequence, timestamp, int(marker)))
    return out


def test_rtp_becomes_the_frames_an_rtmp_publisher_sends() -> None:
    async def scenario() -> Recorder:
        publish = Recorder()
        whip = WhipSession(publish, "whip-1", "live/x", 30.0, lambda s: None)
        video = Packetizer(106, 90_000)
        idr, p_frame = b"\x65" + bytes(3000), b"\x41\x9a" + bytes(200)
        for i, (unit, key) in enumerate([(idr, True), (p_frame, False), (p_frame, False)]):
            for packet in rtp(video.packets(h264_payloads(sample(unit, keyframe=key), CONFIG), i * 40)):
                whip.packet("video", packet)
        config, tone = aac_tone(1.0)
        to_opus = aac_to_opus(aac_config(config))
        audio = Packetizer(111, 48_000)
        for data, ts in tone:
            for coded in to_opus.push(data, ts):
                for packet in rtp(audio.packets([coded.data], coded.presented_ms, marker=False)):
                    whip.packet("audio", packet)
        whip.end("done", clean=True)
        return publish

    publish = asyncio.run(scenario())
    video = [read_video(f.payload) for f in publish.frames if f.kind == VIDEO]
    assert isinstance(video[0], VideoConfig) and video[0].parameter_sets == (SPS, PPS)
    samples = [v for v in video[1:] if isinstance(v, VideoSample)]
    assert [s.keyframe for s in samples] == [True, False, False]
    assert samples[0].data == len(b"\x65" + bytes(3000)).to_bytes(4, "big") + b"\x65" + bytes(3000)  # no SPS/PPS
    times = [f.timestamp for f in publish.frames if f.kind == VIDEO][1:]
    assert [t - times[0] for t in times] == [0, 40, 80]
    audio = [f for f in publish.frames if f.kind == AUDIO]
    first = read_audio(audio[0].payload)
    assert not isinstance(first, bytes) and first is not None and (first.sample_rate, first.channels) == (48000, 2)
    assert len(audio) >= 30 and all(isinstance(read_audio(f.payload), bytes) for f in audio[1:])
    assert publish.ended == ("done", True)


def test_a_picture_before_the_parameter_sets_is_not_sent() -> None:
    async def scenario() -> Recorder:
        publish = Recorder()
        whip = WhipSession(publish, "whip-2", "live/x", 30.0, lambda s: None)
        video = Packetizer(106, 90_000)
        bare = VideoConfig("avc1", b"", 4, ())  # an IDR whose parameter sets never came
        for packet in rtp(video.packets(h264_payloads(sample(b"\x65" + bytes(10), keyframe=True), bare), 0)):
            whip.packet("video", packet)
        return publish

    assert asyncio.run(scenario()).frames == []


def test_whip_publishers_count_against_ingests_connection_caps() -> None:
    """A WHIP publisher holds a place like an RTMP connection: over the cap, 503 with Retry-After and no
    stream asked for; its DELETE gives the place back."""
    from aiortc import RTCPeerConnection

    from castmesh.mesh.caps import ConnectionCaps
    from castmesh.webrtc.settings import IceSettings
    from services.ingest.whip import WhipIngest

    asked: list[str] = []

    class Publishes:
        def publish(self, request: Any, pause: Any, stop: Any) -> Recorder:
            asked.append(request.name)
            return Recorder()

    async def offer() -> tuple[RTCPeerConnection, bytes]:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        return pc, pc.localDescription.sdp.encode()

    async def scenario() -> list[int]:
        whip = WhipIngest(Publishes(), IceSettings(bind="127.0.0.1"), 5.0, 5.0,  # type: ignore[arg-type]
                          ConnectionCaps("ingest", total=1))
        sdp = {"content-type": "application/sdp"}
        pcs = [await offer() for _ in range(3)]
        first = await whip.handle("POST", "live", "a", None, {}, sdp, pcs[0][1], "10.0.0.1:1")
        second = await whip.handle("POST", "live", "b", None, {}, sdp, pcs[1][1], "10.0.0.2:1")
        assert ("Retry-After", "5") in second.headers
        session = dict(first.headers)["Location"].rsplit("/", 1)[1]
        deleted = await whip.handle("DELETE", "live", "a", session, {}, {}, b"", "10.0.0.1:1")
        third = await whip.handle("POST", "live", "c", None, {}, sdp, pcs[2][1], "10.0.0.3:1")
        for pc, _ in pcs:
            await pc.close()
        for open_session in list(whip.sessions.values()):
            open_session.end("test over", clean=True)
        return [first.status, second.status, deleted.status, third.status]

    assert asyncio.run(scenario()) == [201, 503, 200, 201]
    assert asked == ["a", "c"]  # the refused one never asked for its stream
