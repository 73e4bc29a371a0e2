"""A thin ctypes binding of Debian's libsrt 1.5 (libsrt1.5-openssl): only the calls castmesh uses, with
errors raised as SrtError. No Python binding of libsrt is maintained on PyPI (docs/ARCHITECTURE.md, SRT).

libsrt runs its own threads for the protocol (ACKs, NAKs, retransmission, TSBPD delivery); its sockets
are not file descriptors, so an application waits on them with libsrt's epoll. ctypes releases the GIL
around every foreign call, so a Python thread blocked in srt_epoll_uwait costs the event loop nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from functools import cache

SRTSOCKET = ctypes.c_int
INVALID_SOCK, ERROR = -1, -1

# socket options (srt.h SRT_SOCKOPT)
SRTO_MSS, SRTO_SNDSYN, SRTO_RCVSYN = 0, 1, 2
SRTO_RCVBUF = 6
SRTO_REUSEADDR = 15
SRTO_MAXBW = 16
SRTO_STATE = 17
SRTO_LATENCY = 23
SRTO_PASSPHRASE = 26
SRTO_PBKEYLEN = 27
SRTO_CONNTIMEO = 36
SRTO_RCVLATENCY, SRTO_PEERLATENCY = 43, 44
SRTO_STREAMID = 46
SRTO_TRANSTYPE = 50
SRTO_ENFORCEDENCRYPTION = 53
SRTO_IPV6ONLY = 54
SRTO_PEERIDLETIMEO = 55
SRTT_LIVE = 0

# epoll events
EPOLL_IN, EPOLL_OUT, EPOLL_ERR = 0x1, 0x4, 0x8

# error codes (major * 1000 + minor)
EASYNCRCV, EASYNCSND = 6002, 6001
ECONNLOST, EINVSOCK = 2001, 5004

# socket states
SRTS_CONNECTING, SRTS_CONNECTED, SRTS_BROKEN, SRTS_CLOSING, SRTS_CLOSED, SRTS_NONEXIST = 4, 5, 6, 7, 8, 9

# reject reasons an application may give (access_control.h): 1000 + the HTTP-like code
REJX_BAD_REQUEST, REJX_UNAUTHORIZED, REJX_FORBIDDEN, REJX_NOTFOUND = 1400, 1401, 1403, 1404
REJX_BAD_MODE, REJX_CONFLICT, REJX_OVERLOAD = 1405, 1409, 1402

MAX_STREAMID = 512  # libsrt's own limit on the stream id
LOG_CRIT, LOG_WARNING = 2, 4  # syslog's level numbers


class SrtError(OSError):
    def __init__(self, call: str, code: int, text: str) -> None:
        super().__init__(code, f"{call}: {text}")
        self.code = code


class EpollEvent(ctypes.Structure):
    _fields_ = [("fd", SRTSOCKET), ("events", ctypes.c_int)]


class Stats(ctypes.Structure):
    """The head of libsrt's CBytePerfMon (srt.h): the totals since the connection began. libsrt writes the
    whole structure, so room for the rest follows."""

    _fields_ = [("ms", ctypes.c_int64), ("sent", ctypes.c_int64), ("received", ctypes.c_int64),
                ("send_lost", ctypes.c_int), ("receive_lost", ctypes.c_int), ("retransmitted", ctypes.c_int),
                ("acks_sent", ctypes.c_int), ("acks_received", ctypes.c_int), ("naks_sent", ctypes.c_int),
                ("naks_received", ctypes.c_int), ("send_us", ctypes.c_int64), ("send_dropped", ctypes.c_int),
                ("receive_dropped", ctypes.c_int), ("undecrypted", ctypes.c_int), ("rest", ctypes.c_char * 4096)]


def stats(sock: int) -> dict[str, int]:
    """A connection's packet totals for its log line: lost (seen missing by the receiver, or reported lost
    to the sender), retransmitted, dropped (too late to be of use); {} if libsrt has none."""
    totals = Stats()
    srt = lib()
    if srt.srt_bstats(sock, ctypes.byref(totals), 0) == ERROR:
        srt.srt_clearlasterror()
        return {}
    return {"packets": totals.received or totals.sent, "lost": totals.receive_lost or totals.send_lost,
            "retransmitted": totals.retransmitted, "dropped": totals.receive_dropped or totals.send_dropped}


class Totals:
    """A connection's totals (stats) for its last log line, read as it runs at most every `every` seconds:
    libsrt has none to give once the connection has broken, which is when a log line wants them. Every 5 s
    by default: srt_bstats takes libsrt's locks, and read every second for 100 publishers it cost ingest's
    event loop 3% (py-spy)."""

    def __init__(self, sock: int, every: float = 5.0, first: float = 1.0) -> None:
        self.sock = sock
        self.every = every
        self.read_at = time.monotonic() - every + first  # a short session is read once, after `first`
        self.last: dict[str, int] = {}

    def sample(self, now: float) -> None:
        if now - self.read_at >= self.every:
            self.read_at = now
            self.last = stats(self.sock) or self.last

    def final(self) -> dict[str, int]:
        """The totals now, or the last read if the connection is gone (call before srt_close)."""
        return stats(self.sock) or self.last


LOG_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_char_p)
LISTEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, SRTSOCKET, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_char_p)


@cache
def lib() -> ctypes.CDLL:
    """libsrt, loaded and started once (srt_startup)."""
    for name in ("libsrt.so.1.5", ctypes.util.find_library("srt") or "", "libsrt-gnutls.so.1.5"):
        if not name:
            continue
        try:
            srt = ctypes.CDLL(name, use_errno=True)
            break
        except OSError:
            continue
    else:
        raise OSError("libsrt 1.5 is not installed (Debian: apt install libsrt1.5-openssl; `make` does it)")
    srt.srt_getlasterror_str.restype = ctypes.c_char_p
    srt.srt_rejectreason_str.restype = ctypes.c_char_p
    srt.srt_getversion.restype = ctypes.c_uint32
    srt.srt_epoll_uwait.argtypes = [ctypes.c_int, ctypes.POINTER(EpollEvent), ctypes.c_int, ctypes.c_int64]
    srt.srt_recvmsg.argtypes = [SRTSOCKET, ctypes.c_void_p, ctypes.c_int]
    srt.srt_sendmsg.argtypes = [SRTSOCKET, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    srt.srt_listen_callback.argtypes = [SRTSOCKET, LISTEN_CALLBACK, ctypes.c_void_p]
    srt.srt_setsockflag.argtypes = [SRTSOCKET, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    srt.srt_getsockflag.argtypes = [SRTSOCKET, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    if srt.srt_startup() < 0:
        raise OSError("srt_startup failed")
    srt.srt_setloglevel(LOG_CRIT)  # libsrt's own warnings go to stderr; castmesh logs each event with its reason
    return srt


def version() -> str:
    v = lib().srt_getversion()
    return f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}"


def last_error(call: str) -> SrtError:
    srt = lib()
    code = srt.srt_getlasterror(None)
    text = (srt.srt_getlasterror_str() or b"").decode(errors="replace")
    srt.srt_clearlasterror()
    return SrtError(call, code, text)


def check(call: str, result: int) -> int:
    if result == ERROR:
        raise last_error(call)
    return result


def sockaddr(host: str, port: int) -> bytes:
    """A struct sockaddr_in or sockaddr_in6 (Linux layout)."""
    address = ipaddress.ip_address(host)
    if address.version == 4:
        return struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) + address.packed + bytes(8)
    return struct.pack("=H", socket.AF_INET6) + struct.pack(">HI", port, 0) + address.packed + bytes(4)


def parse_sockaddr(pointer: int | None) -> str:
    """"ip:port" of a struct sockaddr* (IPv4 or IPv6), "?" if there is none."""
    if not pointer:
        return "?"
    family = ctypes.c_ushort.from_address(pointer).value
    if family == socket.AF_INET:
        raw = ctypes.string_at(pointer, 16)
        return f"{ipaddress.ip_address(raw[4:8])}:{struct.unpack('>H', raw[2:4])[0]}"
    if family == socket.AF_INET6:
        raw = ctypes.string_at(pointer, 28)
        address = ipaddress.ip_address(raw[8:24])
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return f"{mapped or address}:{struct.unpack('>H', raw[2:4])[0]}"
    return "?"


def peer_of(sock: int) -> str:
    buffer = ctypes.create_string_buffer(128)
    size = ctypes.c_int(128)
    if lib().srt_getpeername(sock, buffer, ctypes.byref(size)) == ERROR:
        return "?"
    return parse_sockaddr(ctypes.addressof(buffer))


def connect(sock: int, host: str, port: int) -> None:
    """Call host:port (an IP address) as a caller. On a socket with SRTO_RCVSYN off this returns at once and
    the connection goes on in libsrt's threads: state() says when it is made, reject_reason() why not."""
    address = sockaddr(host, port)
    check("srt_connect", lib().srt_connect(sock, address, len(address)))


def state(sock: int) -> int:
    """The socket's SRTS_* state."""
    return int(lib().srt_getsockstate(sock))


def reject_reason(sock: int) -> str:
    """Why a connection was not made, as libsrt words it, with its code (1000 and up: the listener's own)."""
    srt = lib()
    code = int(srt.srt_getrejectreason(sock))
    return f"{(srt.srt_rejectreason_str(code) or b'').decode(errors='replace')} ({code})"


def set_int(sock: int, option: int, value: int) -> None:
    v = ctypes.c_int(value)
    check("srt_setsockflag", lib().srt_setsockflag(sock, option, ctypes.byref(v), ctypes.sizeof(v)))


def set_int64(sock: int, option: int, value: int) -> None:
    v = ctypes.c_int64(value)
    check("srt_setsockflag", lib().srt_setsockflag(sock, option, ctypes.byref(v), ctypes.sizeof(v)))


def set_bytes(sock: int, option: int, value: bytes) -> None:
    check("srt_setsockflag", lib().srt_setsockflag(sock, option, ctypes.c_char_p(value), len(value)))


def get_bytes(sock: int, option: int, size: int = MAX_STREAMID + 1) -> bytes:
    buffer = ctypes.create_string_buffer(size)
    length = ctypes.c_int(size)
    check("srt_getsockflag", lib().srt_getsockflag(sock, option, buffer, ctypes.byref(length)))
    return buffer.raw[:length.value]


def get_int(sock: int, option: int) -> int:
    v = ctypes.c_int(0)
    length = ctypes.c_int(ctypes.sizeof(v))
    check("srt_getsockflag", lib().srt_getsockflag(sock, option, ctypes.byref(v), ctypes.byref(length)))
    return v.value


_handlers: list[object] = []  # the ctypes callbacks libsrt holds pointers to: kept alive here


def on_log(handler: Callable[[int, str], None], level: int = LOG_WARNING) -> None:
    """libsrt's log lines up to `level` to handler(level, message) (in libsrt's threads), not to stderr."""
    def call(opaque: int | None, lvl: int, file: bytes | None, line: int, area: bytes | None,
             message: bytes | None) -> None:
        handler(lvl, (message or b"").decode("utf-8", "replace").strip())
    callback = LOG_HANDLER(call)
    _handlers.append(callback)
    lib().srt_setloghandler(None, callback)
    lib().srt_setloglevel(level)
