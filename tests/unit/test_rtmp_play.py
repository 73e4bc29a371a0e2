"""RTMP play bytes are made once per stream and sent to every player: they must parse the same for a
player whatever was sent to it before, in any order of separately made pieces."""

from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.proto.v1.media_pb2 import Frame
from castmesh.rtmp.chunks import AUDIO, DATA_AMF0, VIDEO, ChunkReader, ChunkWriter
from castmesh.rtmp.connection import OUT_CHUNK_SIZE
from castmesh.rtmp.play import play_messages

frames = st.builds(
    Frame,
    kind=st.sampled_from([AUDIO, VIDEO, DATA_AMF0]),
    timestamp=st.one_of(st.integers(0, 100_000), st.integers(0xFFFFF0, 0xFFFFFFFF)),  # extended timestamps too
    # Small payloads, and ones over the 4096-byte chunk size (a repeated byte: large random payloads would
    # exceed hypothesis's entropy budget and fail its health check now and then).
    payload=st.one_of(st.binary(min_size=1, max_size=64),
                      st.builds(lambda n, b: bytes([b]) * n, st.integers(4000, 9000), st.integers(0, 255))),
)


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.lists(frames, min_size=1, max_size=4), min_size=1, max_size=4),
       stream_id=st.integers(1, 4))
def test_separately_made_pieces_parse_to_the_frames_in_any_concatenation(pieces: list[list[Frame]],
                                                                         stream_id: int) -> None:
    reader = ChunkReader()
    connect = ChunkWriter().set_chunk_size(OUT_CHUNK_SIZE)  # what every connection says at connect
    reader.feed(connect)
    for piece in reversed(pieces):  # pieces made independently, sent in another order than made
        got = reader.feed(play_messages(piece, stream_id))
        assert [(m.type_id, m.timestamp, m.stream_id, m.payload) for m in got] == \
            [(f.kind, f.timestamp, stream_id, f.payload) for f in piece]
