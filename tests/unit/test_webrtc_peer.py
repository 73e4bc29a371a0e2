"""castmesh's use of aiortc for WHEP viewers, against an aiortc client on this machine: the answer, ICE on
the configured address and ports, packets made once and sent per peer (SRTP only), the sender's counters
for RTCP, a PLI reaching `on_keyframe`, and offers castmesh cannot answer."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.webrtc import peer as webrtc_peer
from castmesh.webrtc.peer import IceSettings, OfferError, answer
from castmesh.webrtc.rtp import Packetizer

LOCAL = IceSettings(bind="127.0.0.1", ports=(41_000, 41_010))


async def client(kinds: tuple[str, ...] = ("video", "audio")) -> RTCPeerConnection:
    webrtc_peer._Connection.settings = IceSettings(bind="127.0.0.1")  # the client gathers on loopback too
    pc = RTCPeerConnection()
    for kind in kinds:
        pc.addTransceiver(kind, direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


@pytest.mark.parametrize("gso", [True, False], ids=["udp-gso", "sendto-each"])
def test_a_viewer_gets_the_packets_of_its_streams_and_its_plis_are_heard(gso: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webrtc_peer._Wire, "gso", gso)

    async def scenario() -> None:
        viewer = await client()
        received: dict[int, list[int]] = {}

        def count(receiver: object) -> None:
            async def handle(packet: object, arrival_time_ms: int | None = None) -> None:
                received.setdefault(packet.payload_type, []).append(packet.sequence_number)  # type: ignore[attr-defined]
            receiver._handle_rtp_packet = handle  # type: ignore[attr-defined]

        for transceiver in viewer.getTransceivers():
            count(transceiver.receiver)
        keyframes = []
        peer, text = await answer(viewer.localDescription.sdp, LOCAL, ("video", "audio"),
                                  {"video": 0x11111111, "audio": 0x22222222}, lambda: keyframes.append(1))
        ports = [int(p) for p in re.findall(r"a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 (\d+) typ host", text)]
        assert ports and all(41_000 <= p <= 41_010 for p in ports) and "a=ssrc:286331153" in text
        await viewer.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
        for _ in range(200):
            if peer.connected():
                break
            await asyncio.sleep(0.025)
        assert peer.connected()
        video = Packetizer(peer.payload_types["video"], 90_000, ssrc=0x11111111)
        audio = Packetizer(peer.payload_types["audio"], 48_000, ssrc=0x22222222)
        sent = 0
        for i in range(10):
            sent += peer.send([("video", video.packets([b"\x65" + bytes(100), b"\x41" + bytes(50)], i * 33)),
                               ("audio", audio.packets([b"\xfc" + bytes(60)], i * 20))])
        for _ in range(100):
            if sum(len(v) for v in received.values()) >= 30:
                break
            await asyncio.sleep(0.02)
        assert len(received[peer.payload_types["video"]]) == 20 and len(received[peer.payload_types["audio"]]) == 10
        assert sent == peer.sent_bytes > 30 * 12
        stats = await peer.senders["video"].getStats()
        outbound = next(s for s in stats.values() if s.type == "outbound-rtp")
        assert outbound.packetsSent == 20 and outbound.bytesSent == 10 * (101 + 51)  # what RTCP reports say
        await viewer.getTransceivers()[0].receiver._send_rtcp_pli(0x11111111)
        for _ in range(50):
            if keyframes:
                break
            await asyncio.sleep(0.02)
        assert keyframes == [1]
        lost: list[tuple[str, int]] = []
        peer.on_lost = lambda kind, sequence: lost.append((kind, sequence))
        await viewer.getTransceivers()[0].receiver._send_rtcp_nack(0x11111111, [7, 9])
        for _ in range(50):
            if len(lost) == 2:
                break
            await asyncio.sleep(0.02)
        assert lost == [("video", 7), ("video", 9)]  # a NACK reaches the stream's cache, not aiortc's history
        await viewer.close()
        await peer.close()

    asyncio.run(scenario())


def test_offers_castmesh_cannot_answer_say_why() -> None:
    async def scenario() -> None:
        with pytest.raises(OfferError) as bad:
            await answer("this is not sdp", LOCAL, ("video",), {"video": 1}, lambda: None)
        assert bad.value.status == 400
        viewer = await client(("audio",))
        vp8_only = re.sub(r"(m=audio \d+ \S+) .*", r"\1 0", viewer.localDescription.sdp)  # PCMU only
        vp8_only = re.sub(r"a=(rtpmap|fmtp|rtcp-fb):(?!0 ).*\r\n", "", vp8_only)
        with pytest.raises(OfferError) as unusable:
            await answer(vp8_only, LOCAL, ("video", "audio"), {"video": 1, "audio": 2}, lambda: None)
        assert unusable.value.status == 406 and "audio/opus" in unusable.value.detail
        video = await client(("video",))
        high_only = re.sub(r"profile-level-id=\w{6}", "profile-level-id=640c1f", video.localDescription.sdp)
        with pytest.raises(OfferError) as no_profile:  # aiortc sends no High: 406, not an exception
            await answer(high_only, LOCAL, ("video",), {"video": 1}, lambda: None)
        assert no_profile.value.status == 406
        await video.close()
        with pytest.raises(OfferError) as nothing:
            await answer(viewer.localDescription.sdp, LOCAL, ("video",), {"video": 1}, lambda: None)
        assert nothing.value.status == 406
        unkeyed = re.sub(r"a=fingerprint:.*\r\n", "", viewer.localDescription.sdp)
        with pytest.raises(OfferError) as no_dtls:
            await answer(unkeyed, LOCAL, ("audio",), {"audio": 2}, lambda: None)
        assert no_dtls.value.status == 400 and "fingerprint" in no_dtls.value.detail.lower()
        nat = IceSettings(bind="127.0.0.1", advertise="203.0.113.7")
        peer, text = await answer(viewer.localDescription.sdp, nat, ("audio",), {"audio": 2}, lambda: None)
        assert re.search(r"a=candidate:\S+ 1 udp \d+ 203\.0\.113\.7 \d+ typ host", text)
        assert "127.0.0.1 " not in text.split("a=candidate", 1)[1]
        await peer.close()
        await viewer.close()

    asyncio.run(scenario())


def test_datagrams_split_into_runs_the_kernel_can_segment() -> None:
    runs = webrtc_peer.gso_runs
    assert runs([]) == []
    assert runs([1210, 1210, 1210, 700]) == [(0, 4)]  # a picture's FU-A fragments: one buffer
    assert runs([40, 1210, 1210, 300, 83, 83]) == [(0, 1), (1, 4), (4, 6)]  # longer, or after the short one: a new run
    assert runs([83, 90]) == [(0, 1), (1, 2)]
    assert runs([1000] * 70) == [(0, 64), (64, 70)]  # the kernel's 64 segments
    assert runs([1400] * 60) == [(0, 46), (46, 60)]  # and 64 KiB
    sizes = [1210] * 9 + [500, 1210, 83, 83, 1210, 1210]
    assert [i for a, b in runs(sizes) for i in range(a, b)] == list(range(len(sizes)))  # all, once, in order


def test_a_publishers_connection_asks_no_consent_and_a_viewers_does() -> None:
    """A WHIP publisher's ICE connection never closes for unanswered consent checks (ffmpeg answers none
    after ICE completes; its packets and the WHIP session's idle timeout say it is there); a WHEP viewer's
    keeps aioice's checks, which are consent to send it media."""
    async def scenario() -> None:
        publisher_pc = RTCPeerConnection()
        publisher_pc.addTransceiver("audio", direction="sendonly")
        await publisher_pc.setLocalDescription(await publisher_pc.createOffer())
        publisher, _ = await webrtc_peer.accept(publisher_pc.localDescription.sdp, LOCAL, lambda kind, p: None)
        viewer_pc = await client(("audio",))
        peer, _ = await answer(viewer_pc.localDescription.sdp, LOCAL, ("audio",), {"audio": 2}, lambda: None)

        def connection(pc: RTCPeerConnection) -> webrtc_peer._Connection:
            found = pc.getTransceivers()[0].receiver.transport.transport._connection
            assert isinstance(found, webrtc_peer._Connection)
            return found

        published, viewed = connection(publisher.pc), connection(peer.pc)
        assert published.receive_only and not viewed.receive_only
        published.remote_password = viewed.remote_password = "x"  # what connect() has before the checks start
        await asyncio.wait_for(published.query_consent(), 0.5)  # returns: no checks, no expiry
        checking = asyncio.ensure_future(viewed.query_consent())  # aioice's loop: runs until cancelled
        await asyncio.sleep(0.1)
        assert not checking.done()
        checking.cancel()
        for pc in (publisher_pc, viewer_pc, publisher.pc, peer.pc):
            await pc.close()

    asyncio.run(scenario())


def _real_offer() -> str:
    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        text: str = pc.localDescription.sdp
        await pc.close()
        return text

    return asyncio.run(make())


OFFER_LINES = _real_offer().split("\r\n")


EDITS = st.lists(st.tuples(st.integers(0, len(OFFER_LINES) - 1), st.sampled_from(["drop", "twice", "cut", "junk"]),
                           st.text(max_size=40)), max_size=8)


def _mangled(edits: list[tuple[int, str, str]]) -> str:
    """A real offer with lines dropped, repeated, cut short or replaced."""
    lines = list(OFFER_LINES)
    for at, how, junk in edits:
        if not lines:
            break
        at %= len(lines)
        if how == "drop":
            del lines[at]
        elif how == "twice":
            lines.insert(at, lines[at])
        elif how == "cut":
            lines[at] = lines[at][: len(junk)]
        else:
            lines[at] = lines[at][:2] + junk
    return "\r\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(EDITS)
def test_a_mangled_offer_is_answered_with_a_reason_or_taken(edits: list[tuple[int, str, str]]) -> None:
    """check_offer says which kinds it takes or raises OfferError with a 4xx, never anything else
    (aiortc's parser is behind it)."""
    try:
        chosen = webrtc_peer.check_offer(_mangled(edits), ("video", "audio"), sends=False)
    except OfferError as exc:
        assert exc.status in (400, 406, 413, 415, 422) and exc.detail
    else:
        assert chosen and set(chosen) <= {"video", "audio"}
    with pytest.raises(OfferError) as big:
        webrtc_peer.check_offer("v=0\r\n" + "a=x\r\n" * (webrtc_peer.MAX_OFFER // 5), ("video",), sends=False)
    assert big.value.status == 413


@settings(max_examples=40, deadline=None)
@given(EDITS)
def test_a_mangled_offer_that_passes_the_checks_is_answered_or_refused_with_a_4xx(
        edits: list[tuple[int, str, str]]) -> None:
    """The whole answer, aiortc's negotiation included: an answer, or OfferError with a 4xx; never another
    exception (which the HTTP side would have to call a 500)."""
    async def scenario() -> None:
        try:
            peer, text = await answer(_mangled(edits), LOCAL, ("video", "audio"), {"video": 1, "audio": 2},
                                      lambda: None)
        except OfferError as exc:
            assert 400 <= exc.status < 500
        else:
            assert "a=candidate" in text
            await peer.close()

    asyncio.run(scenario())


def test_a_viewer_offering_the_streams_codec_gets_it_and_one_that_does_not_is_told() -> None:
    """VP9, AV1 and HEVC are answered in the offer's own payload numbers when offered (aiortc offers them
    in a process that imported castmesh.webrtc.peer); an offer without the stream's codec gets 406."""
    from aiortc import RTCRtpReceiver

    async def scenario() -> None:
        for mime, name in (("video/h265", "H265"), ("video/vp9", "VP9"), ("video/av1", "AV1")):
            viewer = await client(("video",))
            offered = re.search(rf"a=rtpmap:(\d+) {name}/90000", viewer.localDescription.sdp)
            assert offered, viewer.localDescription.sdp
            peer, text = await answer(viewer.localDescription.sdp, LOCAL, ("video",), {"video": 0x11},
                                      lambda: None, {"video": mime, "audio": "audio/opus"})
            assert peer.payload_types["video"] == int(offered.group(1))
            assert re.search(rf"a=rtpmap:{offered.group(1)} {name}/90000", text)
            await peer.close()
            await viewer.close()
        stock = RTCPeerConnection()
        transceiver = stock.addTransceiver("video", direction="recvonly")
        transceiver.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("video").codecs
                                         if c.mimeType in ("video/VP8", "video/H264")])
        await stock.setLocalDescription(await stock.createOffer())
        with pytest.raises(OfferError) as refused:
            await answer(stock.localDescription.sdp, LOCAL, ("video",), {"video": 0x11}, lambda: None,
                         {"video": "video/h265", "audio": "audio/opus"})
        assert refused.value.status == 406 and "video/h265" in refused.value.detail
        await stock.close()

    asyncio.run(scenario())
