import itertools
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.rtmp import chunks
from castmesh.rtmp.chunks import ChunkLimits, ChunkReader, ChunkWriter, Message, basic_header
from castmesh.rtmp.errors import ChunkError, LimitExceeded
from castmesh.rtmp.handshake import HANDSHAKE_SIZE
from tests.rtmp_bytes import DATA

CAPTURES = ["ffmpeg-h264-aac.rtmp", "ffmpeg-hevc.rtmp"]


def chunk_stream(name: str) -> bytes:
    """The chunk-stream part of a capture (after C0, C1 and C2)."""
    return (DATA / name).read_bytes()[1 + 2 * HANDSHAKE_SIZE :]


def as_tuples(messages: list[Message]) -> list[tuple]:
    return [(m.csid, m.timestamp, m.type_id, m.stream_id, m.payload) for m in messages]


@pytest.mark.parametrize("capture", CAPTURES)
def test_random_splits_of_a_real_capture_give_identical_messages(capture):
    data = chunk_stream(capture)
    whole = as_tuples(ChunkReader().feed(data))
    assert len(whole) > 20
    rng = random.Random(capture)
    for _ in range(30):
        reader = ChunkReader()
        got: list[Message] = []
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 7, 100, 1000, 5000])
            got += reader.feed(data[pos : pos + step])
            pos += step
        assert as_tuples(got) == whole


def test_capture_has_the_expected_messages():
    reader = ChunkReader()
    messages = reader.feed(chunk_stream("ffmpeg-h264-aac.rtmp"))
    video = [m for m in messages if m.type_id == chunks.VIDEO]
    audio = [m for m in messages if m.type_id == chunks.AUDIO]
    assert len(video) == 52  # 50 frames (2 s at 25 fps), the AVC sequence header, end of sequence
    assert video[0].payload[:2] == b"\x17\x00"
    assert len(audio) == 89
    # ffmpeg sends connect, then raises its chunk size to 4096
    assert messages[0].type_id == chunks.COMMAND_AMF0
    assert messages[1].type_id == chunks.SET_CHUNK_SIZE
    assert struct.unpack(">I", messages[1].payload)[0] == 4096 == reader.chunk_size
    # timestamps never go backwards within a kind
    assert all(b.timestamp >= a.timestamp for a, b in itertools.pairwise(video[1:]))


@st.composite
def message_lists(draw):
    out = []
    for _ in range(draw(st.integers(1, 8))):
        out.append(Message(
            csid=draw(st.sampled_from([2, 3, 63, 64, 319, 320, 65599])),
            timestamp=draw(st.one_of(st.integers(0, 1000), st.integers(0xFFFFF0, 0xFFFFFFFF))),
            type_id=draw(st.sampled_from([8, 9, 18, 20])),
            stream_id=draw(st.integers(0, 2**32 - 1)),
            payload=draw(st.binary(max_size=700)),
        ))
    return out


@settings(max_examples=200)
@given(message_lists(), st.sampled_from([128, 129, 4096]), st.integers(1, 50))
def test_writer_and_reader_round_trip(messages, chunk_size, split):
    writer = ChunkWriter()
    reader = ChunkReader()
    data = b""
    if chunk_size != 128:
        data += writer.set_chunk_size(chunk_size)
    for m in messages:
        data += writer.write(m.csid, m.timestamp, m.type_id, m.stream_id, m.payload)
    got = []
    for i in range(0, len(data), split):
        got += reader.feed(data[i : i + split])
    got = [m for m in got if m.type_id != chunks.SET_CHUNK_SIZE]
    assert as_tuples(got) == as_tuples(messages)


def header(fmt, csid, ts=None, length=None, type_id=None, stream_id=None):
    out = basic_header(fmt, csid)
    if fmt <= 2:
        out += ts.to_bytes(3, "big")
    if fmt <= 1:
        out += length.to_bytes(3, "big") + bytes([type_id])
    if fmt == 0:
        out += struct.pack("<I", stream_id)
    return out


def test_basic_header_forms():
    assert basic_header(0, 2) == b"\x02"
    assert basic_header(1, 64) == b"\x40\x00"
    assert basic_header(1, 319) == b"\x40\xff"
    assert basic_header(3, 320) == b"\xc1\x00\x01"  # 3-byte form is little-endian: 64 + 0 + 256 * 1
    assert basic_header(0, 65599) == b"\x01\xff\xff"


def test_fmt3_chunk_that_starts_a_new_message_adds_the_previous_delta():
    data = header(0, 4, ts=1000, length=2, type_id=8, stream_id=1) + b"ab"
    data += header(1, 4, ts=20, length=2, type_id=8) + b"cd"
    data += basic_header(3, 4) + b"ef"
    data += basic_header(3, 4) + b"gh"
    data += header(2, 4, ts=30) + b"ij"
    msgs = ChunkReader().feed(data)
    assert [(m.timestamp, m.payload) for m in msgs] == [
        (1000, b"ab"), (1020, b"cd"), (1040, b"ef"), (1060, b"gh"), (1090, b"ij")]
    assert all(m.stream_id == 1 for m in msgs)


def test_fmt3_after_fmt0_reuses_the_absolute_timestamp_as_delta():
    # as ffmpeg and SRS do
    data = header(0, 4, ts=40, length=1, type_id=9, stream_id=1) + b"a" + basic_header(3, 4) + b"b"
    assert [m.timestamp for m in ChunkReader().feed(data)] == [40, 80]


def test_extended_timestamp_on_continuation_chunks_present_or_omitted():
    payload = bytes(range(200))
    ts = 0x01000000
    first = header(0, 5, ts=0xFFFFFF, length=200, type_id=9, stream_id=1) + struct.pack(">I", ts) + payload[:128]
    with_ext = first + basic_header(3, 5) + struct.pack(">I", ts) + payload[128:]
    without_ext = first + basic_header(3, 5) + payload[128:]
    for data in (with_ext, without_ext):
        (m,) = ChunkReader().feed(data)
        assert (m.timestamp, m.payload) == (ts, payload)


def test_extended_timestamp_on_a_fmt3_new_message():
    data = header(0, 5, ts=0xFFFFFF, length=1, type_id=9, stream_id=1) + struct.pack(">I", 0x01000000) + b"a"
    data += basic_header(3, 5) + struct.pack(">I", 0x01000000) + b"b"
    msgs = ChunkReader().feed(data)
    assert [(m.timestamp, m.payload) for m in msgs] == [(0x01000000, b"a"), (0x02000000, b"b")]


def test_set_chunk_size_applies_in_the_middle_of_a_buffer():
    writer = ChunkWriter()
    data = writer.set_chunk_size(1000) + writer.write(6, 0, 9, 1, b"x" * 900)
    msgs = ChunkReader().feed(data)
    assert msgs[-1].payload == b"x" * 900


def test_abort_drops_a_partial_message():
    data = header(0, 6, ts=0, length=300, type_id=9, stream_id=1) + b"a" * 128
    data += header(0, 2, ts=0, length=4, type_id=chunks.ABORT, stream_id=0) + struct.pack(">I", 6)
    data += header(0, 6, ts=5, length=3, type_id=9, stream_id=1) + b"new"
    msgs = [m for m in ChunkReader().feed(data) if m.type_id == 9]
    assert [(m.timestamp, m.payload) for m in msgs] == [(5, b"new")]


@pytest.mark.parametrize("size", [0, 1, 127, 65537, 0x80000080])
def test_bad_chunk_sizes_are_refused(size):
    data = header(0, 2, ts=0, length=4, type_id=chunks.SET_CHUNK_SIZE, stream_id=0) + struct.pack(">I", size)
    with pytest.raises(LimitExceeded, match="Set Chunk Size"):
        ChunkReader().feed(data)


def test_oversized_message_length_is_refused_before_buffering():
    reader = ChunkReader(ChunkLimits(max_message_length=1 << 20))
    with pytest.raises(LimitExceeded, match="over the limit"):
        reader.feed(header(0, 4, ts=0, length=0xFFFFFF, type_id=9, stream_id=1))


def test_too_many_chunk_streams_are_refused():
    reader = ChunkReader(ChunkLimits(max_chunk_streams=4))
    data = b"".join(header(0, csid, ts=0, length=1, type_id=9, stream_id=1) + b"x" for csid in range(3, 9))
    with pytest.raises(LimitExceeded, match="chunk streams"):
        reader.feed(data)


def test_partial_messages_are_bounded_in_total():
    reader = ChunkReader(ChunkLimits(max_message_length=1000, max_pending_bytes=1500))
    data = b"".join(header(0, csid, ts=0, length=1000, type_id=9, stream_id=1) + b"x" * 128
                    for csid in range(3, 20))
    with pytest.raises(LimitExceeded, match="incomplete"):
        reader.feed(data)


def test_a_chunk_stream_must_start_with_fmt0():
    with pytest.raises(ChunkError, match="must start with fmt 0"):
        ChunkReader().feed(basic_header(3, 7) + b"zzzz")
