"""Malformed input on some connections must not disturb a real stream on another."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from castmesh.rtmp import chunks
from tests.integration.harness import Up, publish, wait_live, watch_in_background
from tests.rtmp_bytes import ClientMessages, handshake


def closed_by_server(port: int, payload: bytes, timeout: float = 3.0) -> bool:
    """Send payload; True if the server then closes the connection within timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
    return False


def rtmp_attacks() -> dict[str, tuple[bytes, str]]:
    client = ClientMessages()
    connect = handshake() + client.connect()
    bomb = b"\x02\x00\x07connect\x00" + bytes(8) + b"\x0a\x00\x00\x00\x01" * 5000
    return {
        "bad version": (b"\x06" + os.urandom(1536), "unsupported RTMP version 6"),
        "chunk size 0": (connect + client.writer.write(2, 0, chunks.SET_CHUNK_SIZE, 0, struct.pack(">I", 0)),
                         "Set Chunk Size 0"),
        "huge chunk size": (connect + client.writer.write(2, 0, chunks.SET_CHUNK_SIZE, 0,
                                                          struct.pack(">I", 1 << 24)), "Set Chunk Size 16777216"),
        "oversized message": (connect + b"\x06" + b"\x00\x00\x00" + b"\xff\xff\xff" + b"\x09" + b"\x01\x00\x00\x00",
                              "over the limit"),
        "AMF nesting bomb": (handshake() + ClientMessages().writer.write(3, 0, chunks.COMMAND_AMF0, 0, bomb),
                             "nesting deeper"),
        "random bytes after handshake": (handshake() + b"\xc7" + os.urandom(4000), "protocol error"),
    }


def test_garbage_on_other_connections_leaves_a_playing_stream_untouched(suite: Up) -> None:
    publisher = publish(suite.rtmp("steady"), 9, fps=30, gop=60)
    wait_live(suite.flv("steady"))
    seen, viewer = watch_in_background(suite.flv("steady"), 20)
    time.sleep(1.5)
    attack_start = time.monotonic()

    # Half-open and stuck clients that never finish: they must cost nothing to anyone else.
    idle = [socket.create_connection(("127.0.0.1", suite.rtmp_port)) for _ in range(20)]
    idle += [socket.create_connection(("127.0.0.1", suite.http_port)) for _ in range(20)]
    for sock in idle[20:]:
        sock.sendall(b"GET /live/steady.flv HTTP/1.1\r\nHost: x\r\n")  # never finishes its head

    failures = []
    rounds = 0
    while rounds < 5 or time.monotonic() - attack_start < 4.0:  # long enough to span ~120 deliveries
        rounds += 1
        for name, (payload, _reason) in rtmp_attacks().items():
            if not closed_by_server(suite.rtmp_port, payload):
                failures.append(name)
        for payload in (b"\x00\xff" * 500 + b"\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
                        b"GET /live/steady.flv HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 4000 + b"\r\n"):
            if not closed_by_server(suite.http_port, payload):
                failures.append(f"http {payload[:12]!r}")
    attack_end = time.monotonic()

    assert publisher.wait(30) == 0
    viewer.join(30)
    assert attack_end - attack_start >= 4.0
    for sock in idle:
        sock.close()
    assert failures == []
    log = suite.process.log()
    for name, (_payload, reason) in rtmp_attacks().items():
        assert reason in log, f"no log line for {name}"

    # The viewer of the real stream: every frame, evenly spaced, and nothing stalled during the attacks.
    assert seen.ended_cleanly and seen.error == ""
    video = [t.timestamp for t in seen.video()]
    steps = [b - a for a, b in itertools.pairwise(video)]
    assert steps and max(steps) <= 70, f"gap in video timestamps: {max(steps)} ms"
    assert len(video) >= 0.95 * 9 * 30 - 60  # it joined a moment after the publisher
    during = [at for at in seen.arrivals if attack_start <= at <= attack_end]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert len(during) > 50 and max(gaps) < 1.0, f"viewer stalled {max(gaps):.2f}s while garbage arrived"
