import hashlib
import hmac
import os
import struct

import pytest

from castmesh.rtmp.errors import HandshakeError
from castmesh.rtmp.handshake import (
    FMS_KEY,
    FP_KEY,
    HANDSHAKE_SIZE,
    ServerHandshake,
    block_digest,
    digest_offset,
)


def digest_c1(schema: int) -> tuple[bytes, bytes]:
    """A C1 as Flash Player or ffmpeg make it: client version set, digest keyed with the Flash Player key."""
    c1 = bytearray(struct.pack(">I", 0) + bytes([9, 0, 124, 2]) + os.urandom(HANDSHAKE_SIZE - 8))
    offset = digest_offset(c1, schema)
    digest = block_digest(bytes(c1), offset, FP_KEY[:30])
    c1[offset : offset + 32] = digest
    return bytes(c1), digest


def test_plain_handshake_echoes_c1_in_s2_and_passes_leftover_bytes():
    hs = ServerHandshake()
    c1 = b"\x00" * 8 + os.urandom(HANDSHAKE_SIZE - 8)
    out, rest = hs.receive(b"\x03" + c1[:100])
    assert (out, rest) == (b"", b"")
    out, rest = hs.receive(c1[100:])
    assert out[0] == 3 and len(out) == 1 + 2 * HANDSHAKE_SIZE
    assert out[1 + HANDSHAKE_SIZE :] == c1
    out, rest = hs.receive(os.urandom(HANDSHAKE_SIZE) + b"chunks")
    assert hs.done and not hs.digest_used and rest == b"chunks"


@pytest.mark.parametrize("schema", [0, 1])
def test_digest_handshake_answers_with_valid_server_digests(schema):
    c1, client_digest = digest_c1(schema)
    hs = ServerHandshake()
    out, _ = hs.receive(b"\x03" + c1)
    assert hs.digest_used
    s1, s2 = out[1 : 1 + HANDSHAKE_SIZE], out[1 + HANDSHAKE_SIZE :]
    # What a checking client (ffmpeg playing, Flash Player) verifies:
    s1_offset = digest_offset(s1, schema)
    assert s1[s1_offset : s1_offset + 32] == block_digest(s1, s1_offset, FMS_KEY[:36])
    key = hmac.new(FMS_KEY, client_digest, hashlib.sha256).digest()
    assert s2[-32:] == hmac.new(key, s2[:-32], hashlib.sha256).digest()


def test_c1_with_a_version_but_no_valid_digest_falls_back_to_plain():
    c1 = struct.pack(">I", 0) + bytes([9, 0, 124, 2]) + os.urandom(HANDSHAKE_SIZE - 8)
    hs = ServerHandshake()
    out, _ = hs.receive(b"\x03" + c1)
    assert not hs.digest_used and out[1 + HANDSHAKE_SIZE :] == c1


@pytest.mark.parametrize("version", [0, 6, 0x47])  # 6 = RTMPE; 'G' = someone speaking HTTP
def test_bad_version_is_refused_at_once(version):
    with pytest.raises(HandshakeError, match=f"version {version}"):
        ServerHandshake().receive(bytes([version]))
