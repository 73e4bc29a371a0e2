"""castmesh/srt/libsrt.py over Debian's libsrt: a listener and a caller on loopback exchange live-mode
messages; the listener sees the caller's stream id and address; a wrong passphrase is rejected by the
handshake with libsrt's reason, and the caller's error says so."""

from __future__ import annotations

import ctypes
import time

import pytest

from castmesh.srt import libsrt as s


def socket(blocking: bool = True) -> int:
    sock = s.check("srt_create_socket", s.lib().srt_create_socket())
    s.set_int(sock, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
    s.set_int(sock, s.SRTO_RCVSYN, int(blocking))
    return sock


def listener(passphrase: bytes = b"") -> tuple[int, int]:
    srt = s.lib()
    sock = socket()
    if passphrase:
        s.set_bytes(sock, s.SRTO_PASSPHRASE, passphrase)
    address = s.sockaddr("127.0.0.1", 0)
    s.check("srt_bind", srt.srt_bind(sock, address, len(address)))
    buffer, size = ctypes.create_string_buffer(128), ctypes.c_int(128)
    s.check("srt_getsockname", srt.srt_getsockname(sock, buffer, ctypes.byref(size)))
    s.check("srt_listen", srt.srt_listen(sock, 4))
    return sock, int(s.parse_sockaddr(ctypes.addressof(buffer)).rpartition(":")[2])


def caller(port: int, stream_id: bytes, passphrase: bytes = b"") -> int:
    sock = socket()
    s.set_bytes(sock, s.SRTO_STREAMID, stream_id)
    s.set_int(sock, s.SRTO_CONNTIMEO, 1500)
    if passphrase:
        s.set_bytes(sock, s.SRTO_PASSPHRASE, passphrase)
    address = s.sockaddr("127.0.0.1", port)
    s.check("srt_connect", s.lib().srt_connect(sock, address, len(address)))
    return sock


def test_messages_stream_id_and_peer_over_loopback() -> None:
    srt = s.lib()
    assert s.version().startswith("1.5.")
    server, port = listener()
    client = caller(port, b"#!::r=live/cam,m=publish")
    accepted = s.check("srt_accept", srt.srt_accept(server, None, None))
    assert s.get_bytes(accepted, s.SRTO_STREAMID) == b"#!::r=live/cam,m=publish"
    assert s.peer_of(accepted).startswith("127.0.0.1:")
    for i in range(50):
        payload = bytes([i]) * 1316
        assert srt.srt_sendmsg(client, payload, len(payload), -1, 1) == 1316
    data = ctypes.create_string_buffer(1500)
    got = [srt.srt_recvmsg(accepted, data, 1500) for _ in range(50)]
    assert got == [1316] * 50 and data.raw[:1316] == bytes([49]) * 1316
    srt.srt_close(client)
    deadline = time.monotonic() + 5
    while srt.srt_getsockstate(accepted) < s.SRTS_BROKEN and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srt.srt_getsockstate(accepted) >= s.SRTS_BROKEN  # the caller's close reaches the listener
    for sock in (accepted, server):
        srt.srt_close(sock)


def test_a_wrong_passphrase_is_rejected_in_the_handshake() -> None:
    server, port = listener(b"the right passphrase")
    with pytest.raises(s.SrtError) as refused:
        caller(port, b"publish:live/cam", b"a wrong passphrase")
    assert "reject" in str(refused.value).lower() or "password" in str(refused.value).lower(), str(refused.value)
    s.lib().srt_close(server)
