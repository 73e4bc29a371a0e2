"""Bounded fuzzing of the RTMP and FLV parsers with real captures as seeds: whatever the damage, the
parser either gives messages or raises its typed error, never anything else."""

from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.media.flv import FlvError, FlvReader, file_header, tag
from castmesh.rtmp.connection import ServerConnection
from castmesh.rtmp.errors import RtmpError
from castmesh.rtmp.handshake import HANDSHAKE_SIZE
from tests.rtmp_client import DATA

CAPTURE = (DATA / "ffmpeg-h264-aac.rtmp").read_bytes()
HEAD = 1 + 2 * HANDSHAKE_SIZE


@st.composite
def damaged_capture(draw):
    data = bytearray(CAPTURE[: HEAD + draw(st.integers(200, 20000))])
    for _ in range(draw(st.integers(1, 12))):
        pos = draw(st.integers(HEAD, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x3F, 0xC0, 0x7F]))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@settings(max_examples=150, deadline=None)
@given(damaged_capture(), st.integers(1, 4096))
def test_damaged_real_sessions_raise_only_rtmp_errors(data, split):
    conn = ServerConnection()
    try:
        for i in range(0, len(data), split):
            conn.receive_data(data[i : i + split])
            conn.data_to_send()
    except RtmpError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 300))
def test_flv_reader_on_garbage_raises_only_flv_errors(tail, split):
    data = file_header(True, True) + tag(9, 0, b"\x17\x00abc") + tail
    reader = FlvReader(max_tag_size=1 << 16)
    try:
        for i in range(0, len(data), split):
            reader.feed(data[i : i + split])
    except FlvError:
        pass
