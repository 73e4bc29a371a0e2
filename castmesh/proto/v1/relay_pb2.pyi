from castmesh.proto.v1 import media_pb2 as _media_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamStats(_message.Message):
    __slots__ = ("stream", "session_id", "publishing", "pulled", "subscribers", "frames_in", "skips", "media", "since_us")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHING_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    SKIPS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    SINCE_US_FIELD_NUMBER: _ClassVar[int]
    stream: _media_pb2.StreamKey
    session_id: str
    publishing: bool
    pulled: bool
    subscribers: _containers.RepeatedScalarFieldContainer[str]
    frames_in: int
    skips: int
    media: _media_pb2.MediaInfo
    since_us: int
    def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., publishing: _Optional[bool] = ..., pulled: _Optional[bool] = ..., subscribers: _Optional[_Iterable[str]] = ..., frames_in: _Optional[int] = ..., skips: _Optional[int] = ..., media: _Optional[_Union[_media_pb2.MediaInfo, _Mapping]] = ..., since_us: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("role", "streams")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    role: str
    streams: _containers.RepeatedCompositeFieldContainer[StreamStats]
    def __init__(self, role: _Optional[str] = ..., streams: _Optional[_Iterable[_Union[StreamStats, _Mapping]]] = ...) -> None: ...

class PublishOpen(_message.Message):
    __slots__ = ("stream", "session_id", "client_addr", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDR_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    stream: _media_pb2.StreamKey
    session_id: str
    client_addr: str
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., client_addr: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PublishEnd(_message.Message):
    __slots__ = ("clean",)
    CLEAN_FIELD_NUMBER: _ClassVar[int]
    clean: bool
    def __init__(self, clean: _Optional[bool] = ...) -> None: ...

class PublishItem(_message.Message):
    __slots__ = ("channel", "open", "batch", "end")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    channel: int
    open: PublishOpen
    batch: _media_pb2.FrameBatch
    end: PublishEnd
    def __init__(self, channel: _Optional[int] = ..., open: _Optional[_Union[PublishOpen, _Mapping]] = ..., batch: _Optional[_Union[_media_pb2.FrameBatch, _Mapping]] = ..., end: _Optional[_Union[PublishEnd, _Mapping]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PublishItem]
    def __init__(self, items: _Optional[_Iterable[_Union[PublishItem, _Mapping]]] = ...) -> None: ...

class PublishAccepted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishEnded(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishRejected(_message.Message):
    __slots__ = ("reason", "detail")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[PublishRejected.Reason]
        REASON_ALREADY_PUBLISHED: _ClassVar[PublishRejected.Reason]
        REASON_BAD_REQUEST: _ClassVar[PublishRejected.Reason]
    REASON_UNSPECIFIED: PublishRejected.Reason
    REASON_ALREADY_PUBLISHED: PublishRejected.Reason
    REASON_BAD_REQUEST: PublishRejected.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: PublishRejected.Reason
    detail: str
    def __init__(self, reason: _Optional[_Union[PublishRejected.Reason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ("channel", "accepted", "rejected", "ended")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    channel: int
    accepted: PublishAccepted
    rejected: PublishRejected
    ended: PublishEnded
    def __init__(self, channel: _Optional[int] = ..., accepted: _Optional[_Union[PublishAccepted, _Mapping]] = ..., rejected: _Optional[_Union[PublishRejected, _Mapping]] = ..., ended: _Optional[_Union[PublishEnded, _Mapping]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[PublishReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[PublishReply, _Mapping]]] = ...) -> None: ...

class SubscribeOpen(_message.Message):
    __slots__ = ("stream", "start", "subscriber_id", "trace_context")
    class Start(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        START_UNSPECIFIED: _ClassVar[SubscribeOpen.Start]
        START_GOP_CACHE: _ClassVar[SubscribeOpen.Start]
        START_LIVE: _ClassVar[SubscribeOpen.Start]
    START_UNSPECIFIED: SubscribeOpen.Start
    START_GOP_CACHE: SubscribeOpen.Start
    START_LIVE: SubscribeOpen.Start
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STREAM_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBER_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    stream: _media_pb2.StreamKey
    start: SubscribeOpen.Start
    subscriber_id: str
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., start: _Optional[_Union[SubscribeOpen.Start, str]] = ..., subscriber_id: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SubscribeClose(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubscribeItem(_message.Message):
    __slots__ = ("channel", "open", "close")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    channel: int
    open: SubscribeOpen
    close: SubscribeClose
    def __init__(self, channel: _Optional[int] = ..., open: _Optional[_Union[SubscribeOpen, _Mapping]] = ..., close: _Optional[_Union[SubscribeClose, _Mapping]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SubscribeItem]
    def __init__(self, items: _Optional[_Iterable[_Union[SubscribeItem, _Mapping]]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("reason", "detail")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[StreamEnd.Reason]
        REASON_NOT_FOUND: _ClassVar[StreamEnd.Reason]
        REASON_UNPUBLISHED: _ClassVar[StreamEnd.Reason]
        REASON_TOO_SLOW: _ClassVar[StreamEnd.Reason]
        REASON_SHUTDOWN: _ClassVar[StreamEnd.Reason]
        REASON_BAD_REQUEST: _ClassVar[StreamEnd.Reason]
        REASON_CLOSED: _ClassVar[StreamEnd.Reason]
        REASON_UPSTREAM_LOST: _ClassVar[StreamEnd.Reason]
    REASON_UNSPECIFIED: StreamEnd.Reason
    REASON_NOT_FOUND: StreamEnd.Reason
    REASON_UNPUBLISHED: StreamEnd.Reason
    REASON_TOO_SLOW: StreamEnd.Reason
    REASON_SHUTDOWN: StreamEnd.Reason
    REASON_BAD_REQUEST: StreamEnd.Reason
    REASON_CLOSED: StreamEnd.Reason
    REASON_UPSTREAM_LOST: StreamEnd.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: StreamEnd.Reason
    detail: str
    def __init__(self, reason: _Optional[_Union[StreamEnd.Reason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class SubscribeEvent(_message.Message):
    __slots__ = ("channel", "header", "batch", "end")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    channel: int
    header: _media_pb2.StreamHeader
    batch: _media_pb2.FrameBatch
    end: StreamEnd
    def __init__(self, channel: _Optional[int] = ..., header: _Optional[_Union[_media_pb2.StreamHeader, _Mapping]] = ..., batch: _Optional[_Union[_media_pb2.FrameBatch, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[SubscribeEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[SubscribeEvent, _Mapping]]] = ...) -> None: ...
