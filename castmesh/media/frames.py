"""Frames: FLV tag bodies with the flags every hop needs, read once at ingest from the body's first bytes.

A frame is the protobuf castmesh.v1.Frame; these functions only look at the body's first two bytes, never
decode media. Enhanced RTMP (video byte 0 with bit 0x80: hvc1, av01, vp09, ...) keeps its FourCC and
packet type in the body, so it passes through untouched.
"""

from __future__ import annotations

import time

from castmesh.proto.v1.media_pb2 import (
    FRAME_KIND_AUDIO,
    FRAME_KIND_DATA,
    FRAME_KIND_VIDEO,
    Frame,
    FrameBatch,
    StreamKey,
)

AUDIO, VIDEO, DATA = FRAME_KIND_AUDIO, FRAME_KIND_VIDEO, FRAME_KIND_DATA
DEFAULT_VHOST = "__defaultVhost__"

_VIDEO_KEYFRAME = 1
_AVC, _HEVC_LEGACY, _AV1_LEGACY = 7, 12, 13
_AAC = 10
_AUDIO_EX_HEADER = 9
_EX_SEQUENCE_START, _EX_MPEG2TS_SEQUENCE_START = 0, 5


def video_flags(payload: bytes) -> tuple[bool, bool]:
    """(keyframe, sequence_header) of an FLV video tag body, legacy or enhanced."""
    if not payload:
        return False, False
    b0 = payload[0]
    if b0 & 0x80:  # enhanced RTMP ExVideoTagHeader
        packet_type = b0 & 0x0F
        if packet_type in (_EX_SEQUENCE_START, _EX_MPEG2TS_SEQUENCE_START):
            return False, True
        return (b0 >> 4) & 0x07 == _VIDEO_KEYFRAME and packet_type in (1, 3), False
    frame_type, codec = b0 >> 4, b0 & 0x0F
    if codec in (_AVC, _HEVC_LEGACY, _AV1_LEGACY):
        if len(payload) < 2:
            return False, False
        if payload[1] == 0:
            return False, True
        return frame_type == _VIDEO_KEYFRAME and payload[1] == 1, False
    return frame_type == _VIDEO_KEYFRAME, False


def audio_is_config(payload: bytes) -> bool:
    if not payload:
        return False
    fmt = payload[0] >> 4
    if fmt == _AAC:
        return len(payload) > 1 and payload[1] == 0
    if fmt == _AUDIO_EX_HEADER:  # enhanced RTMP v2 audio: packet type 0 is SequenceStart
        return payload[0] & 0x0F == 0
    return False


def is_metadata(payload: bytes) -> bool:
    # AMF0 string "onMetaData": marker 0x02, length 10
    return payload.startswith(b"\x02\x00\x0aonMetaData")


def make_frame(kind: int, timestamp: int, payload: bytes, received_us: int | None = None) -> Frame:
    keyframe = sequence_header = False
    if kind == VIDEO:
        keyframe, sequence_header = video_flags(payload)
    elif kind == AUDIO:
        sequence_header = audio_is_config(payload)
    return Frame(
        kind=kind,  # type: ignore[arg-type]
        timestamp=timestamp & 0xFFFFFFFF,
        keyframe=keyframe,
        sequence_header=sequence_header,
        ingest_time_us=received_us if received_us is not None else time.time_ns() // 1000,
        payload=payload,
    )


def detached(batch: FrameBatch) -> FrameBatch:
    """A copy of `batch` with memory of its own. A message received over gRPC keeps all of itself alive
    while any part is referenced; a batch taken from a call that carries many streams would otherwise tie
    every stream's frames to the longest-lived GOP cache among them."""
    copy = FrameBatch()
    copy.CopyFrom(batch)
    return copy


def stream_key(app: str, name: str, vhost: str = "") -> StreamKey:
    return StreamKey(vhost=vhost or DEFAULT_VHOST, app=app, name=name)


def stream_path(key: StreamKey) -> str:
    """The one text form of a stream's identity: vhost/app/name."""
    return path_of(key.app, key.name, key.vhost)


def path_of(app: str, name: str, vhost: str = "") -> str:
    """stream_path(stream_key(app, name, vhost)) without making the key (for per-request lookups)."""
    return f"{vhost or DEFAULT_VHOST}/{app}/{name}"
