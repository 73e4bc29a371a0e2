"""The server side of the RTMP handshake, sans-IO.

C0 (version 3) + C1 (1536 bytes) in, S0 + S1 + S2 out, then C2 in. Two flavours:
- plain: S1 is random, S2 echoes C1;
- digest ("complex", what Flash Player, FMLE, librtmp and ffmpeg send): C1 carries an HMAC-SHA256 digest
  made with the Flash Player key at an offset given by one of two schemas. When it validates, S1 gets a
  digest made with the Flash Media Server key at the same schema, and S2 ends with a digest keyed on C1's.
  Clients that check the server (ffmpeg when playing, Flash) need this.
A C1 with no valid digest falls back to plain, as SRS and nginx-rtmp do.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from enum import Enum, auto

from castmesh.rtmp.errors import HandshakeError

RTMP_VERSION = 3
HANDSHAKE_SIZE = 1536
DIGEST_SIZE = 32

_SHARED_KEY_TAIL = bytes.fromhex("f0eec24a8068bee82e00d0d1029e7e576eec5d2d29806fab93b8e636cfeb31ae")
FMS_KEY = b"Genuine Adobe Flash Media Server 001" + _SHARED_KEY_TAIL  # 68 bytes; S1 uses the first 36
FP_KEY = b"Genuine Adobe Flash Player 001" + _SHARED_KEY_TAIL  # 62 bytes; C1 uses the first 30
SERVER_VERSION = bytes([4, 5, 0, 1])


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def digest_offset(block: bytes | bytearray, schema: int) -> int:
    """Where the 32-byte digest sits in a C1/S1: schema 0 puts the key block first, schema 1 the digest."""
    base = 8 if schema == 1 else 772
    return sum(block[base : base + 4]) % 728 + base + 4


def block_digest(block: bytes, offset: int, key: bytes) -> bytes:
    return _hmac(key, block[:offset] + block[offset + DIGEST_SIZE :])


def find_client_digest(c1: bytes) -> tuple[bytes, int] | None:
    """C1's digest and schema if it validates under either schema, else None (a plain handshake)."""
    for schema in (1, 0):
        offset = digest_offset(c1, schema)
        digest = c1[offset : offset + DIGEST_SIZE]
        if hmac.compare_digest(digest, block_digest(c1, offset, FP_KEY[:30])):
            return digest, schema
    return None


def make_s1(schema: int) -> bytes:
    s1 = bytearray(struct.pack(">I", int(time.monotonic() * 1000) & 0xFFFFFFFF) + SERVER_VERSION)
    s1 += os.urandom(HANDSHAKE_SIZE - 8)
    offset = digest_offset(s1, schema)
    s1[offset : offset + DIGEST_SIZE] = block_digest(bytes(s1), offset, FMS_KEY[:36])
    return bytes(s1)


def make_s2(client_digest: bytes) -> bytes:
    body = os.urandom(HANDSHAKE_SIZE - DIGEST_SIZE)
    return body + _hmac(_hmac(FMS_KEY, client_digest), body)


class HandshakeState(Enum):
    WAIT_C0C1 = auto()
    WAIT_C2 = auto()
    DONE = auto()


class ServerHandshake:
    """Feed bytes with receive(); send what it returns. `done` once C2 has arrived; bytes past C2 belong to
    the chunk stream and are returned by receive() as its second value."""

    def __init__(self) -> None:
        self.state = HandshakeState.WAIT_C0C1
        self.buffer = bytearray()
        self.digest_used = False

    @property
    def done(self) -> bool:
        return self.state is HandshakeState.DONE

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Returns (bytes to send, leftover chunk-stream bytes)."""
        self.buffer += data
        out = b""
        if self.state is HandshakeState.WAIT_C0C1:
            if self.buffer and self.buffer[0] != RTMP_VERSION:
                raise HandshakeError(
                    f"unsupported RTMP version {self.buffer[0]} in C0 (only {RTMP_VERSION}; "
                    "RTMPE/encrypted handshakes are not supported)"
                )
            if len(self.buffer) < 1 + HANDSHAKE_SIZE:
                return b"", b""
            c1 = bytes(self.buffer[1 : 1 + HANDSHAKE_SIZE])
            del self.buffer[: 1 + HANDSHAKE_SIZE]
            out = bytes([RTMP_VERSION]) + self._answer(c1)
            self.state = HandshakeState.WAIT_C2
        if self.state is HandshakeState.WAIT_C2 and len(self.buffer) >= HANDSHAKE_SIZE:
            # C2 should echo S1; clients disagree on how exactly, so like SRS we do not check it.
            leftover = bytes(self.buffer[HANDSHAKE_SIZE:])
            self.buffer.clear()
            self.state = HandshakeState.DONE
            return out, leftover
        return out, b""

    def _answer(self, c1: bytes) -> bytes:
        client_version = c1[4:8]
        found = find_client_digest(c1) if client_version != b"\x00\x00\x00\x00" else None
        if found is None:
            s1 = struct.pack(">I", 0) + b"\x00\x00\x00\x00" + os.urandom(HANDSHAKE_SIZE - 8)
            return s1 + c1
        digest, schema = found
        self.digest_used = True
        return make_s1(schema) + make_s2(digest)
