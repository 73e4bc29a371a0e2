"""What a node's WebRTC needs to know before any peer exists, apart from aiortc (which is imported only
when the first WebRTC request comes: it costs a process about 30 MB that FLV-only nodes need not pay)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_OFFER = 64 * 1024
MIME = {"video": "video/h264", "audio": "audio/opus"}  # what WHIP takes, and WHEP's default
VIDEO_MIMES = {"avc1": "video/h264", "hvc1": "video/h265", "vp09": "video/vp9", "av01": "video/av1"}  # WHEP's


class OfferError(ValueError):
    """An offer castmesh cannot answer: `status` says how (400 malformed, 406 no usable codec)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(slots=True, frozen=True)
class IceSettings:
    """Where a node's WebRTC media is reachable."""

    servers: tuple[str, ...] = ()  # stun:host:port or turn:host:port?transport=udp, offered to aiortc
    username: str = ""  # for the TURN servers
    credential: str = ""
    bind: str = ""  # gather host candidates on this address only (default: every interface but loopback)
    ports: tuple[int, int] | None = None  # and on UDP ports in this range (inclusive)
    advertise: str = ""  # name this address in the answer's candidates instead (NAT 1:1, containers)
