"""RTMP play output that one stream serializes once and sends to every RTMP viewer as it is.

Chunk bytes depend on what a connection has said before, so the shared bytes carry no such state: every
message starts with a fmt-0 header (absolute timestamp, length, type and message stream id), every
connection announced the same chunk size at connect (connection.OUT_CHUNK_SIZE), and each kind of media
has a fixed chunk stream. The message stream id is the one the viewer plays on: clients ask createStream
for one and get 1, so in practice one serialization serves everyone; callers key what they cache by it.
"""

from __future__ import annotations

from collections.abc import Iterable

from castmesh.proto.v1.media_pb2 import Frame
from castmesh.rtmp.chunks import AUDIO, DATA_AMF0, VIDEO, ChunkWriter
from castmesh.rtmp.connection import OUT_CHUNK_SIZE

CSID_DATA, CSID_AUDIO, CSID_VIDEO = 5, 4, 6  # data shares the stream-command chunk stream, as in SRS
_CSID = {AUDIO: CSID_AUDIO, VIDEO: CSID_VIDEO, DATA_AMF0: CSID_DATA}


def play_messages(frames: Iterable[Frame], stream_id: int) -> bytes:
    """Each frame as one RTMP message on message stream `stream_id` (FLV tag bodies are RTMP payloads)."""
    writer = ChunkWriter()
    writer.chunk_size = OUT_CHUNK_SIZE
    return b"".join(writer.write(_CSID.get(f.kind, CSID_DATA), f.timestamp, f.kind, stream_id, f.payload)
                    for f in frames)
