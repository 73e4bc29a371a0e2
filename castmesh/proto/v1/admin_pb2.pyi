from castmesh.proto.v1 import media_pb2 as _media_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KickRequest(_message.Message):
    __slots__ = ("stream", "client_id", "reason")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    stream: _media_pb2.StreamKey
    client_id: str
    reason: str
    def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., client_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class KickReply(_message.Message):
    __slots__ = ("kicked",)
    KICKED_FIELD_NUMBER: _ClassVar[int]
    kicked: int
    def __init__(self, kicked: _Optional[int] = ...) -> None: ...
