from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_KIND_UNSPECIFIED: _ClassVar[FrameKind]
    FRAME_KIND_AUDIO: _ClassVar[FrameKind]
    FRAME_KIND_VIDEO: _ClassVar[FrameKind]
    FRAME_KIND_DATA: _ClassVar[FrameKind]
FRAME_KIND_UNSPECIFIED: FrameKind
FRAME_KIND_AUDIO: FrameKind
FRAME_KIND_VIDEO: FrameKind
FRAME_KIND_DATA: FrameKind

class StreamKey(_message.Message):
    __slots__ = ("vhost", "app", "name")
    VHOST_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    vhost: str
    app: str
    name: str
    def __init__(self, vhost: _Optional[str] = ..., app: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("kind", "timestamp", "keyframe", "sequence_header", "ingest_time_us", "payload", "sequence")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    KEYFRAME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_HEADER_FIELD_NUMBER: _ClassVar[int]
    INGEST_TIME_US_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    kind: FrameKind
    timestamp: int
    keyframe: bool
    sequence_header: bool
    ingest_time_us: int
    payload: bytes
    sequence: int
    def __init__(self, kind: _Optional[_Union[FrameKind, str]] = ..., timestamp: _Optional[int] = ..., keyframe: _Optional[bool] = ..., sequence_header: _Optional[bool] = ..., ingest_time_us: _Optional[int] = ..., payload: _Optional[bytes] = ..., sequence: _Optional[int] = ...) -> None: ...

class FrameBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("stream", "metadata", "video_config", "audio_config", "has_audio", "has_video", "session_id", "publisher_trace")
    class PublisherTraceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STREAM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VIDEO_CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONFIG_FIELD_NUMBER: _ClassVar[int]
    HAS_AUDIO_FIELD_NUMBER: _ClassVar[int]
    HAS_VIDEO_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_TRACE_FIELD_NUMBER: _ClassVar[int]
    stream: StreamKey
    metadata: Frame
    video_config: Frame
    audio_config: Frame
    has_audio: bool
    has_video: bool
    session_id: str
    publisher_trace: _containers.ScalarMap[str, str]
    def __init__(self, stream: _Optional[_Union[StreamKey, _Mapping]] = ..., metadata: _Optional[_Union[Frame, _Mapping]] = ..., video_config: _Optional[_Union[Frame, _Mapping]] = ..., audio_config: _Optional[_Union[Frame, _Mapping]] = ..., has_audio: _Optional[bool] = ..., has_video: _Optional[bool] = ..., session_id: _Optional[str] = ..., publisher_trace: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MediaInfo(_message.Message):
    __slots__ = ("video_codec", "audio_codec", "width", "height", "frame_rate", "bitrate_kbps", "audio_sample_rate", "audio_channels", "codecs")
    VIDEO_CODEC_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CODEC_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAME_RATE_FIELD_NUMBER: _ClassVar[int]
    BITRATE_KBPS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    video_codec: str
    audio_codec: str
    width: int
    height: int
    frame_rate: float
    bitrate_kbps: int
    audio_sample_rate: int
    audio_channels: int
    codecs: str
    def __init__(self, video_codec: _Optional[str] = ..., audio_codec: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frame_rate: _Optional[float] = ..., bitrate_kbps: _Optional[int] = ..., audio_sample_rate: _Optional[int] = ..., audio_channels: _Optional[int] = ..., codecs: _Optional[str] = ...) -> None: ...
