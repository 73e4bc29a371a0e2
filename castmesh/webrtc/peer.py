"""WebRTC peers on aiortc, for WHEP viewers: an SDP offer answered, ICE gathered within castmesh's settings,
and a send path for packets made once per stream (castmesh.webrtc.rtp), so that per viewer only SRTP and
the system calls remain (one per run of same-size packets, with UDP GSO).

aiortc does the standards (SDP, ICE, DTLS, SRTP keys, RTCP receiver reports, PLI/FIR) and castmesh takes
over where aiortc would do per-viewer work or has no setting:
- Media: each sender gets a track that never yields, so aiortc's own RTP loop (which would packetize per
  viewer) idles; castmesh writes whole packets with the peer's SRTP context straight to the socket of the
  ICE pair aiortc nominated (pylibsrtp's context called without its per-packet wrapper). The sender's
  counters and clock (what its RTCP sender reports say, which browsers use to line audio up with video)
  are updated once per write.
- A PLI or FIR from the viewer calls `on_keyframe` (it is answered from the stream's GOP cache, never
  passed to the publisher) instead of asking an encoder that is not there; a NACK's lost packets call
  `on_lost` (resent from the same cache) instead of looking in the sender's history, which stays empty.
- ICE: aiortc has no port range or host address setting (aioice #63 and #112 are unmerged), so the ICE
  connections aiortc creates are of a subclass that gathers host candidates on the configured address
  and within the configured UDP port range; the answer can name an advertised address instead (NAT 1:1,
  containers).
These are aiortc's private parts; aiortc is pinned to a minor version and tests/unit/test_webrtc_peer.py
checks each of them against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import aioice.ice
import aiortc.rtcicetransport
import aiortc.rtp
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc import codecs as aiortc_codecs
from aiortc.exceptions import OperationError
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtcpFeedback
from pylibsrtp import SRTP_MAX_TRAILER_LEN, Session
from pylibsrtp._binding import ffi as srtp_ffi  # type: ignore[import-not-found]
from pylibsrtp._binding import lib as srtp_lib

from castmesh.webrtc.settings import MAX_OFFER, MIME, IceSettings, OfferError

log = logging.getLogger("castmesh.webrtc")

__all__ = ["MAX_OFFER", "IceSettings", "OfferError", "Peer", "Publisher", "accept", "answer", "check_offer"]



class _Silent(MediaStreamTrack):
    """A track that never yields: aiortc's per-sender RTP loop waits on it for ever, at no cost."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def recv(self) -> Any:
        await asyncio.Event().wait()


class _Connection(aioice.ice.Connection):
    """aioice's ICE connection, gathering host candidates where castmesh's settings say."""

    settings = IceSettings()  # set per peer by `ice_within` just before aiortc creates the connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.castmesh = _Connection.settings
        # A publisher's connection (WHIP): consent freshness (RFC 7675) is consent to *send* media, and
        # castmesh sends a publisher only RTCP; the publisher's own packets show it is there (the WHIP
        # session's idle timeout). ffmpeg's whip muxer answers no check after ICE completes, so aioice's
        # consent checks would close its session after 30 s.
        self.receive_only = False

    async def query_consent(self) -> None:
        if not self.receive_only:
            await super().query_consent()

    async def get_component_candidates(self, component: int, addresses: list[str],
                                       timeout: int = 5) -> list[aioice.Candidate]:
        settings = self.castmesh
        if settings.bind:
            addresses = [settings.bind]
        if settings.ports is None:
            return await super().get_component_candidates(component, addresses, timeout)
        loop = asyncio.get_running_loop()
        low, high = settings.ports
        candidates = []
        for address in addresses:
            for port in _ports_from_random(low, high):
                try:
                    transport, protocol = await loop.create_datagram_endpoint(
                        lambda: aioice.ice.StunProtocol(self), local_addr=(address, port))
                    break
                except OSError:
                    continue
            else:
                raise OSError(f"no free UDP port in {low}-{high} on {address} for WebRTC")
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, aioice.turn.UDP_SOCKET_BUFFER_SIZE)
            self._protocols.append(protocol)
            host, bound = transport.get_extra_info("sockname")[:2]
            protocol.local_candidate = aioice.Candidate(
                foundation=aioice.candidate.candidate_foundation("host", "udp", host), component=component,
                transport="udp", priority=aioice.candidate.candidate_priority(component, "host"),
                host=host, port=bound, type="host")
            candidates.append(protocol.local_candidate)
        return candidates


def _ports_from_random(low: int, high: int) -> list[int]:
    start = random.randint(low, high)
    return [*range(start, high + 1), *range(low, start)]


aiortc.rtcicetransport.Connection = _Connection  # type: ignore[misc]  # the one place aiortc makes them


def _register_video_codecs() -> None:
    """aiortc negotiates VP8 and H.264 video only; castmesh also sends VP9, AV1 and HEVC as published (it
    packetizes them; aiortc never encodes or decodes them), so aiortc's codec list gets them, each with RTX,
    NACK and PLI feedback like its own."""
    video = aiortc_codecs.CODECS["video"]
    known = {c.mimeType.lower() for c in video}
    payload_type = max(c.payloadType or 0 for c in video) + 1
    for mime, parameters in (("video/VP9", {"profile-id": "0"}), ("video/AV1", {}), ("video/H265", {})):
        if mime.lower() in known:
            continue
        video.append(RTCRtpCodecParameters(
            mimeType=mime, clockRate=90_000, payloadType=payload_type, parameters=dict(parameters),
            rtcpFeedback=[RTCRtcpFeedback(type="nack"), RTCRtcpFeedback(type="nack", parameter="pli")]))
        video.append(RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90_000, payloadType=payload_type + 1,
                                           parameters={"apt": payload_type}))
        payload_type += 2


_register_video_codecs()
# Browsers number codecs 35-63 too once 96-127 are used (Chromium offers AV1 as 45); aiortc would answer
# those with its own numbers, which the offer gave to other codecs. RFC 5761 keeps 64-95 for RTCP.
aiortc.rtp.DYNAMIC_PAYLOAD_TYPES = frozenset((*range(35, 64), *range(96, 128)))  # type: ignore[assignment]


def _ice_servers(settings: IceSettings) -> list[RTCIceServer]:
    return [RTCIceServer(urls=url, username=settings.username or None, credential=settings.credential or None)
            for url in settings.servers]


UDP_SEGMENT = 103  # linux/udp.h: one buffer sent as datagrams of this size (UDP GSO, Linux 4.18)
MAX_SEGMENTS = 64  # the kernel's limit per call (UDP_MAX_SEGMENTS)
MAX_GSO_BYTES = 65_000  # under the 64 KiB an IP packet may hold before segmentation


def gso_runs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """How datagrams of these sizes split into runs the kernel can segment from one buffer: within a run all
    have the first one's size, but the last may be shorter (an H.264 picture's FU-A fragments are such a run).
    (start, end) index pairs, in order."""
    runs = []
    start, count = 0, len(sizes)
    while start < count:
        size, end, total = sizes[start], start + 1, sizes[start]
        while end < count and end - start < MAX_SEGMENTS and sizes[end] <= size and total + sizes[end] <= MAX_GSO_BYTES:
            total += sizes[end]
            end += 1
            if sizes[end - 1] < size:
                break
        runs.append((start, end))
        start = end
    return runs


def _protector(session: Session) -> Callable[[bytes], bytes]:
    """`session.protect` without pylibsrtp's per-call allocation and checks (the packets are castmesh's own,
    never longer than MAX_PAYLOAD plus headers); pylibsrtp's own method if its internals are not as
    expected."""
    try:
        buffer, cdata, context = session._buffer, session._cdata, session._srtp[0]
        protect, length = srtp_lib.srtp_protect, srtp_ffi.new("int *")
        limit = len(cdata) - SRTP_MAX_TRAILER_LEN
    except AttributeError:
        return session.protect

    def protected(packet: bytes) -> bytes:
        size = len(packet)
        if size > limit:
            raise ValueError(f"an RTP packet of {size} bytes is over SRTP's {limit}")
        length[0] = size
        buffer[0:size] = packet
        if protect(context, cdata, length):
            return session.protect(packet)  # pylibsrtp raises with libsrtp's reason
        return buffer[0:length[0]]

    return protected


class _Wire:
    """The nominated ICE pair's socket, written to directly: SRTP per packet, then one sendmsg per run of
    same-size datagrams (UDP GSO: the kernel cuts the buffer) where the kernel has it, else a sendto per
    datagram. A send the socket's buffer cannot take drops the datagrams, as a full network would."""

    gso = sys.platform == "linux"  # off for the process at the first refusal

    def __init__(self, session: Session, sock: socket.socket | None, sendto: Callable[[bytes, Any], None],
                 address: tuple[str, int]) -> None:
        self.protect = _protector(session)
        self.sock = sock  # a duplicate of the ICE socket's descriptor; None: through the transport
        self.sendto = sendto
        self.address = address
        self.dropped = 0

    def send(self, packets: list[bytes]) -> int:
        protect = self.protect
        data = [protect(p) for p in packets]
        sock, address = self.sock, self.address
        if sock is None:
            for datagram in data:
                self.sendto(datagram, address)
            return sum(len(d) for d in data)
        sizes = [len(d) for d in data]
        sent = 0
        for start, end in gso_runs(sizes) if _Wire.gso and len(data) > 1 else ((i, i + 1) for i in range(len(data))):
            try:
                if end - start == 1:
                    sock.sendto(data[start], address)
                else:
                    sock.sendmsg([b"".join(data[start:end])], [(socket.SOL_UDP, UDP_SEGMENT,
                                                              sizes[start].to_bytes(2, sys.byteorder))], 0, address)
                sent += sum(sizes[start:end])
            except (BlockingIOError, InterruptedError):
                self.dropped += end - start
            except OSError as exc:
                if end - start == 1 or not _Wire.gso:
                    raise
                _Wire.gso = False  # a kernel or device without UDP GSO: a datagram per call from now on
                log.warning("UDP GSO refused (%s): WebRTC packets go one per sendto", exc)
                for datagram in data[start:end]:
                    sock.sendto(datagram, address)
                sent += sum(sizes[start:end])
        return sent

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _ntp_now() -> int:
    """Now as a 64-bit NTP timestamp (seconds since 1900, 32.32 fixed point), as RTCP sender reports carry."""
    return int((time.time() + NTP_UNIX_OFFSET) * (1 << 32)) & 0xFFFF_FFFF_FFFF_FFFF


NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900 to 1970


class Peer:
    """One WHEP viewer's peer connection, sending packets made elsewhere."""

    def __init__(self, pc: RTCPeerConnection, senders: dict[str, RTCRtpSender], payload_types: dict[str, int],
                 on_keyframe: Callable[[], None]) -> None:
        self.pc = pc
        self.senders = senders  # by kind
        self.payload_types = payload_types  # by kind, as negotiated
        self.on_keyframe = on_keyframe
        self.on_lost: Callable[[str, int], None] = lambda kind, sequence: None
        self.wire: _Wire | None = None
        self.sent_bytes = 0
        for kind, sender in senders.items():
            sender._send_keyframe = self._keyframe  # type: ignore[method-assign]
            sender._retransmit = partial(self._lost, kind)  # type: ignore[method-assign]

    async def _lost(self, kind: str, sequence: int) -> None:
        """A NACK's lost packet (aiortc's sender would look in a history it never filled)."""
        self.on_lost(kind, sequence)

    def _keyframe(self) -> None:
        self.on_keyframe()

    @property
    def transport(self) -> RTCDtlsTransport | None:
        sender = next(iter(self.senders.values()), None)
        return sender.transport if sender is not None else None

    def connected(self) -> bool:
        transport = self.transport
        return transport is not None and transport.state == "connected"

    def send(self, batch: list[tuple[str, list[bytes]]]) -> int:
        """Protect and send packets of this peer's streams, (kind, packets) in order; the bytes sent (0 until
        connected)."""
        wire = self.wire or self._find_wire()
        if wire is None:
            return 0
        packets = [p for _, kind_packets in batch for p in kind_packets]
        if not packets:
            return 0
        size = wire.send(packets)
        self.sent_bytes += size
        now = _ntp_now()
        for kind, kind_packets in batch:
            if kind_packets:
                self._count(self.senders[kind], kind_packets, now)
        return size

    def _find_wire(self) -> _Wire | None:
        transport = self.transport
        if transport is None or transport.state != "connected":
            return None
        pair = transport.transport._connection._nominated.get(1)
        if pair is None or pair.protocol.transport is None:
            return None
        sock = None
        raw = pair.protocol.transport.get_extra_info("socket")
        if raw is not None and pair.protocol.local_candidate.type == "host":  # not through a TURN relay
            sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
        self.wire = _Wire(transport._tx_srtp, sock, pair.protocol.transport.sendto, pair.remote_addr)
        return self.wire

    @staticmethod
    def _count(sender: RTCRtpSender, packets: list[bytes], ntp: int) -> None:
        """What the sender's RTCP reports will say: its packets and octets, and the RTP time of now."""
        counters = sender.__dict__
        counters["_RTCRtpSender__packet_count"] += len(packets)
        counters["_RTCRtpSender__octet_count"] += sum(len(p) - 12 for p in packets)
        counters["_RTCRtpSender__rtp_timestamp"] = int.from_bytes(packets[-1][4:8], "big")
        counters["_RTCRtpSender__ntp_timestamp"] = ntp

    async def close(self) -> None:
        if self.wire is not None:
            self.wire.close()
        await self.pc.close()


def _codec(offer: Any, kind: str, mime: str) -> Any:
    """The offer's first codec of type `mime` for `kind`, if it has one."""
    for media in offer.media:
        if media.kind == kind:
            return next((c for c in media.rtp.codecs if c.mimeType.lower() == mime), None)
    return None


def check_offer(offer_sdp: str, kinds: tuple[str, ...], sends: bool, mimes: dict[str, str] | None = None) -> list[str]:
    """Which of `kinds` the offer has media for, in the direction asked (`sends`: a publisher's offer) and
    with the codecs asked (`mimes` by kind, default MIME); OfferError if castmesh cannot answer it."""
    mimes = mimes or MIME
    from aiortc import sdp

    if len(offer_sdp) > MAX_OFFER:
        raise OfferError(413, f"an offer over {MAX_OFFER} bytes")
    try:
        parsed = sdp.SessionDescription.parse(offer_sdp)
    except Exception as exc:  # aiortc's parser raises whatever its code meets (StopIteration for an a=fmtp
        # naming a payload type the m= line has not, IndexError, ValueError, ...): all of it is bad SDP
        raise OfferError(400, f"the offer is not SDP castmesh can read: {exc!r}") from exc
    if not offer_sdp.startswith("v=0") or not parsed.media:
        raise OfferError(400, "the offer is not SDP with media sections (v=0, then m= lines)")
    if not any(m.kind in kinds for m in parsed.media):
        raise OfferError(406, f"the offer has no {' or '.join(kinds)} section")
    chosen = [kind for kind in kinds if any(m.kind == kind for m in parsed.media)]
    for media in parsed.media:
        if media.kind in chosen and (media.dtls is None or not media.dtls.fingerprints):
            raise OfferError(400, f"the offer's {media.kind} section has no DTLS fingerprint")
        if media.kind in chosen and (media.ice is None or not media.ice.usernameFragment or not media.ice.password):
            raise OfferError(400, f"the offer's {media.kind} section has no ICE credentials")
        if media.kind in chosen and not media.rtp.muxId:  # JSEP and BUNDLE name every section
            raise OfferError(400, f"the offer's {media.kind} section has no a=mid")
    mids = {m.rtp.muxId for m in parsed.media}
    for group in parsed.group:
        if group.semantic == "BUNDLE" and not set(map(str, group.items)) <= mids:
            raise OfferError(400, f"the offer bundles sections it does not have: {' '.join(map(str, group.items))}")
    wanted = ("sendonly", "sendrecv") if sends else ("recvonly", "sendrecv")
    for media in parsed.media:
        if media.kind in chosen and media.direction not in wanted:
            raise OfferError(422, f"the offer's {media.kind} section is {media.direction}: "
                             f"{'a publisher sends' if sends else 'a viewer receives'}")
    for kind in chosen:
        if _codec(parsed, kind, mimes[kind]) is None:
            raise OfferError(406, f"the offer cannot carry {kind} as {mimes[kind]}, which the stream is")
    return chosen


async def _negotiate(offer_sdp: str, settings: IceSettings, chosen: list[str], direction: str,
                     prepare: Callable[[str, Any], None],
                     mimes: dict[str, str] = MIME) -> tuple[RTCPeerConnection, str, dict[str, int]]:
    """A peer connection that answers the offer for the chosen kinds in `direction`; `prepare(kind,
    transceiver)` before the offer is applied. The answer (every candidate gathered) and the payload types."""
    from aiortc import sdp

    _Connection.settings = settings
    pc = RTCPeerConnection(RTCConfiguration(iceServers=_ice_servers(settings)))
    try:
        for kind in ("video", "audio"):
            if kind not in chosen:
                continue
            transceiver = pc.addTransceiver(_Silent(kind) if direction == "sendonly" else kind, direction=direction)
            capabilities = RTCRtpSender.getCapabilities(kind).codecs
            transceiver.setCodecPreferences([c for c in capabilities if c.mimeType.lower() == mimes[kind]])
            prepare(kind, transceiver)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except ValueError as exc:  # aiortc's word for an offer it cannot take (no fingerprint, no ICE...)
            raise OfferError(400, f"the offer cannot be used: {exc}") from exc
        except OperationError as exc:  # no codec aiortc takes in common (an H.264 profile it does not know)
            raise OfferError(406, f"no codec in common with the offer: {exc}") from exc
        await pc.setLocalDescription(await pc.createAnswer())
        text = pc.localDescription.sdp
        payload_types = {m.kind: int(m.rtp.codecs[0].payloadType or 0)
                         for m in sdp.SessionDescription.parse(text).media if m.kind in chosen and m.rtp.codecs}
        if set(payload_types) != set(chosen):
            raise OfferError(406, f"no codec in common for {', '.join(set(chosen) - set(payload_types))}")
    except BaseException:
        with contextlib.suppress(Exception):  # a half-made connection may not close cleanly; the error is the news
            await pc.close()
        raise
    if settings.advertise:
        text = re.sub(r"(a=candidate:\S+ \d+ udp \d+ )(\S+)( \d+ typ host)", rf"\g<1>{settings.advertise}\g<3>", text)
    return pc, text, payload_types


async def answer(offer_sdp: str, settings: IceSettings, kinds: tuple[str, ...], ssrcs: dict[str, int],
                 on_keyframe: Callable[[], None], mimes: dict[str, str] = MIME) -> tuple[Peer, str]:
    """Answer a viewer's offer for the given kinds in the stream's codecs (`mimes`: video H.264, VP9 or
    AV1; audio Opus) with fixed SSRCs (the stream's packets carry them); the peer and the answer's SDP, with
    every candidate gathered."""
    chosen = check_offer(offer_sdp, kinds, sends=False, mimes=mimes)
    senders: dict[str, RTCRtpSender] = {}

    def fixed_ssrc(kind: str, transceiver: Any) -> None:
        transceiver.sender._ssrc = ssrcs[kind]
        senders[kind] = transceiver.sender

    pc, text, payload_types = await _negotiate(offer_sdp, settings, chosen, "sendonly", fixed_ssrc, mimes)
    return Peer(pc, senders, payload_types, on_keyframe), text


Received = Callable[[str, Any], None]  # (kind, aiortc's RtpPacket)


class Publisher:
    """One WHIP publisher's peer connection: its RTP packets go to `on_packet` as they arrive (no jitter
    buffer, no decoding: castmesh depacketizes), and `ask_keyframe` sends it a PLI."""

    def __init__(self, pc: RTCPeerConnection, receivers: dict[str, Any], payload_types: dict[str, int]) -> None:
        self.pc = pc
        self.receivers = receivers
        self.payload_types = payload_types
        self.ssrcs: dict[str, int] = {}

    def ask_keyframe(self) -> None:
        receiver, ssrc = self.receivers.get("video"), self.ssrcs.get("video")
        if receiver is not None and ssrc is not None:
            task = asyncio.get_running_loop().create_task(receiver._send_rtcp_pli(ssrc))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        await self.pc.close()


async def accept(offer_sdp: str, settings: IceSettings, on_packet: Received) -> tuple[Publisher, str]:
    """Answer a publisher's offer (H.264 video, Opus audio, either or both); the publisher and the answer."""
    chosen = check_offer(offer_sdp, ("video", "audio"), sends=True)
    receivers: dict[str, Any] = {}
    publisher: Publisher | None = None

    def hear(kind: str, transceiver: Any) -> None:
        receiver = receivers[kind] = transceiver.receiver

        async def handle(packet: Any, arrival_time_ms: int | None = None) -> None:
            if publisher is not None:
                publisher.ssrcs.setdefault(kind, packet.ssrc)
            on_packet(kind, packet)

        receiver._handle_rtp_packet = handle

    # aiortc only knows (constrained) baseline H.264 and would find no codec in common with an encoder's
    # High or Main offer; castmesh does not decode what it receives, so any profile will do.
    baseline = re.sub(r"profile-level-id=[0-9a-fA-F]{6}", "profile-level-id=42e01f", offer_sdp)
    pc, text, payload_types = await _negotiate(baseline, settings, chosen, "recvonly", hear)
    for transceiver in pc.getTransceivers():  # before ICE can complete: the publisher has not the answer yet
        connection = transceiver.receiver.transport.transport._connection
        if isinstance(connection, _Connection):
            connection.receive_only = True
    publisher = Publisher(pc, receivers, payload_types)
    return publisher, text
