"""Bounded fuzzing of the RTMP and FLV parsers with real captures as seeds: whatever the damage, the
parser either gives messages or raises its typed error, never anything else, and what it holds stays
within its limits: unparsed input at most one chunk (plus its header), partial messages at most
max_pending_bytes, and an aggregate message never more events than max_aggregate_tags."""

from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.media.flv import FlvError, FlvReader, file_header, tag
from castmesh.rtmp import chunks
from castmesh.rtmp.connection import MediaReceived, ServerConnection
from castmesh.rtmp.errors import RtmpError
from castmesh.rtmp.handshake import HANDSHAKE_SIZE
from tests.rtmp_bytes import DATA, ClientMessages, handshake

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
def test_damaged_real_sessions_raise_only_rtmp_errors_and_stay_within_limits(data, split):
    conn = ServerConnection()
    reader = conn.reader
    try:
        for i in range(0, len(data), split):
            conn.receive_data(data[i : i + split])
            conn.data_to_send()
            assert len(reader._buffer) <= reader.chunk_size + 18 + split  # one chunk, its header, this read
            assert reader._pending <= reader.limits.max_pending_bytes
    except RtmpError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([8, 9, 3]), st.binary(max_size=40)), max_size=1500),
       st.binary(max_size=30))
def test_aggregate_messages_give_at_most_their_cap_of_events(tags, tail):
    client = ClientMessages()
    conn = ServerConnection()
    conn.receive_data(handshake() + client.publish_sequence())
    conn.accept_publish(1)
    body = b"".join(bytes([kind]) + len(payload).to_bytes(3, "big") + bytes(7) + payload
                    + (11 + len(payload)).to_bytes(4, "big") for kind, payload in tags) + tail
    try:
        events = conn.receive_data(client.writer.write(6, 0, chunks.AGGREGATE, 1, body))
    except RtmpError:
        assert len(tags) > conn.limits.max_aggregate_tags or tail
        return
    assert len(events) <= conn.limits.max_aggregate_tags
    assert all(isinstance(e, MediaReceived) for e in events)


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
