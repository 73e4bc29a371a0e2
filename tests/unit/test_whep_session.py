"""A WHEP viewer's packets with no network: the stream's packets as they are, then after a PLI the cached
GOP again, numbered on from the last packet the viewer got and stamped just after it, and the live packets
after that numbered on too; at most one answer a second."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

from castmesh.media.elementary import avc_record
from castmesh.media.frames import VIDEO, make_frame
from castmesh.webrtc.rtp import parse_header
from services.playback.viewer import Viewer
from services.playback.webrtc import RESEND_PER_SECOND, WebRtcStream, WhepSession
from tests.unit.test_rtp import PPS, SPS


class Pc:
    connectionState = "connected"

    def on(self, name: str, handler: Any) -> None: ...


class FakePeer:
    def __init__(self) -> None:
        self.pc = Pc()
        self.payload_types = {"video": 102, "audio": 111}
        self.on_keyframe: Any = None
        self.sent: list[bytes] = []

    def send(self, batch: list[tuple[str, list[bytes]]]) -> int:
        packets = [p for _, kind_packets in batch for p in kind_packets]
        self.sent += packets
        return sum(len(p) for p in packets)

    async def close(self) -> None: ...


def watching(stream: WebRtcStream, peer: FakePeer) -> tuple[WhepSession, Viewer]:
    """A connected WHEP viewer of the stream, with no network."""
    session = WhepSession(stream, peer, "v.1", lambda s: None, 5.0)  # type: ignore[arg-type]
    viewer = Viewer("v.1", "webrtc", "", session, {"app": "live", "stream": "x"}, 3.0)
    stream.add(viewer)
    session.flowing = True
    return session, viewer


def picture(ts: int, keyframe: bool, size: int = 3000) -> Any:
    nal = (b"\x65" if keyframe else b"\x41") + bytes(size)
    return make_frame(VIDEO, ts, bytes((0x17 if keyframe else 0x27, 1, 0, 0, 0)) + struct.pack(">I", len(nal)) + nal)


def test_a_pli_is_answered_with_the_gop_renumbered_for_that_viewer_alone() -> None:
    async def scenario() -> None:
        stream = WebRtcStream("live/x", lambda s: None)
        peer = FakePeer()
        session, _viewer = watching(stream, peer)
        config = make_frame(VIDEO, 0, b"\x17\x00\x00\x00\x00" + avc_record(SPS, PPS))
        stream.write([config, picture(0, True), picture(33, False), picture(66, False)])
        live = [parse_header(p) for p in peer.sent]
        assert [h[2] for h in live] == [(live[0][2] + i) & 0xFFFF for i in range(len(live))]
        gop = list(stream.gop)
        peer.sent.clear()
        session.keyframe()
        again = [parse_header(p) for p in peer.sent]
        assert len(again) == len(gop) and [p[12:] for p in peer.sent] == [p[12:] for p in gop]
        assert [h[2] for h in again] == [(live[-1][2] + 1 + i) & 0xFFFF for i in range(len(gop))]
        assert again[-1][3] == live[-1][3] + 1 and again[0][3] > live[-1][3] - 3  # decoded at once, after
        peer.sent.clear()
        stream.write([picture(99, False)])
        after = [parse_header(p) for p in peer.sent]
        assert after[0][2] == (again[-1][2] + 1) & 0xFFFF and after[0][3] > again[-1][3]
        peer.sent.clear()
        session.keyframe()  # again at once: not answered (at most once a second)
        assert peer.sent == []

    asyncio.run(scenario())


def test_a_nacked_packet_is_sent_again_from_the_gop_with_that_viewers_numbers() -> None:
    async def scenario() -> None:
        stream = WebRtcStream("live/x", lambda s: None)
        peer = FakePeer()
        config = make_frame(VIDEO, 0, b"\x17\x00\x00\x00\x00" + avc_record(SPS, PPS))
        stream.write([config, picture(0, True)])  # before the viewer: it gets these in its join burst
        session, _viewer = watching(stream, peer)
        session._send_gop("start")
        burst_seqs = [parse_header(p)[2] for p in peer.sent]
        stream.write([picture(33, False), picture(66, False)])
        live = peer.sent[len(burst_seqs):]
        peer.sent.clear()
        lost = live[2]
        session.lost("video", parse_header(lost)[2])
        assert peer.sent == [lost]  # the very packet, its number and stamp
        peer.sent.clear()
        session.lost("video", burst_seqs[1])  # restamped in the burst: left to a PLI
        session.lost("video", (parse_header(live[-1])[2] + 5) & 0xFFFF)  # never sent
        session.lost("audio", 1)
        assert peer.sent == []
        session.last_keyframe = -10.0
        session.keyframe()  # from here this viewer's numbers run ahead of the stream's
        peer.sent.clear()
        stream.write([picture(99, False)])
        after = peer.sent[1]
        peer.sent.clear()
        session.lost("video", parse_header(after)[2])
        assert peer.sent == [after]
        peer.sent.clear()
        session.resent_window, session.resent = time.monotonic(), 0  # a new second starts
        for _ in range(500):  # a viewer NACKing without end gets RESEND_PER_SECOND a second
            session.lost("video", parse_header(after)[2])
        assert len(peer.sent) == RESEND_PER_SECOND

    asyncio.run(scenario())


def test_a_bad_frame_is_dropped_and_pictures_wait_for_the_next_keyframe_the_stream_goes_on() -> None:
    """One unreadable picture or AAC frame (a corrupt publisher) must not end every WebRTC viewer of the
    stream: it is left out, the pictures after it wait for a keyframe, joiners for the next GOP."""
    async def scenario() -> None:
        stream = WebRtcStream("live/x", lambda s: None)
        peer = FakePeer()
        _session, viewer = watching(stream, peer)
        config = make_frame(VIDEO, 0, b"\x17\x00\x00\x00\x00" + avc_record(SPS, PPS))
        corrupt = make_frame(VIDEO, 33, b"\x27\x01\x00\x00\x00" + struct.pack(">I", 5000) + b"\x41\x00")
        stream.write([config, picture(0, True), corrupt, picture(66, False)])
        assert stream.problem == "" and not stream.stopped
        stamps = {parse_header(p)[3] for p in peer.sent}
        assert len(stamps) == 1  # the keyframe only: the picture after the bad one waited
        assert stream.gop == []  # a joiner waits for the next keyframe
        peer.sent.clear()
        stream.write([picture(99, True), picture(133, False)])
        assert len({parse_header(p)[3] for p in peer.sent}) == 2 and stream.gop
        assert viewer in stream.viewers

    asyncio.run(scenario())
