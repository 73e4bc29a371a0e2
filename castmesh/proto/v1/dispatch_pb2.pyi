from castmesh.proto.v1 import media_pb2 as _media_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_ROLE_UNSPECIFIED: _ClassVar[NodeRole]
    NODE_ROLE_ORIGIN: _ClassVar[NodeRole]
    NODE_ROLE_EDGE: _ClassVar[NodeRole]
    NODE_ROLE_INGEST: _ClassVar[NodeRole]
    NODE_ROLE_PLAYBACK: _ClassVar[NodeRole]
    NODE_ROLE_DISPATCH: _ClassVar[NodeRole]
    NODE_ROLE_GATEWAY: _ClassVar[NodeRole]
NODE_ROLE_UNSPECIFIED: NodeRole
NODE_ROLE_ORIGIN: NodeRole
NODE_ROLE_EDGE: NodeRole
NODE_ROLE_INGEST: NodeRole
NODE_ROLE_PLAYBACK: NodeRole
NODE_ROLE_DISPATCH: NodeRole
NODE_ROLE_GATEWAY: NodeRole

class Node(_message.Message):
    __slots__ = ("id", "role", "address", "zone", "meta")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: NodeRole
    address: str
    zone: str
    meta: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., role: _Optional[_Union[NodeRole, str]] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., meta: _Optional[_Mapping[str, str]] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("streams", "subscribers", "cpu")
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    streams: int
    subscribers: int
    cpu: float
    def __init__(self, streams: _Optional[int] = ..., subscribers: _Optional[int] = ..., cpu: _Optional[float] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("hello", "load")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    hello: Node
    load: NodeLoad
    def __init__(self, hello: _Optional[_Union[Node, _Mapping]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("accepted", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("claim", "relocate")
    class Claim(_message.Message):
        __slots__ = ("stream", "holder", "client_addr", "origin_hint")
        STREAM_FIELD_NUMBER: _ClassVar[int]
        HOLDER_FIELD_NUMBER: _ClassVar[int]
        CLIENT_ADDR_FIELD_NUMBER: _ClassVar[int]
        ORIGIN_HINT_FIELD_NUMBER: _ClassVar[int]
        stream: _media_pb2.StreamKey
        holder: str
        client_addr: str
        origin_hint: str
        def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., holder: _Optional[str] = ..., client_addr: _Optional[str] = ..., origin_hint: _Optional[str] = ...) -> None: ...
    class Relocate(_message.Message):
        __slots__ = ("failed_origin",)
        FAILED_ORIGIN_FIELD_NUMBER: _ClassVar[int]
        failed_origin: str
        def __init__(self, failed_origin: _Optional[str] = ...) -> None: ...
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    RELOCATE_FIELD_NUMBER: _ClassVar[int]
    claim: LeaseRequest.Claim
    relocate: LeaseRequest.Relocate
    def __init__(self, claim: _Optional[_Union[LeaseRequest.Claim, _Mapping]] = ..., relocate: _Optional[_Union[LeaseRequest.Relocate, _Mapping]] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("granted", "rejected")
    class Granted(_message.Message):
        __slots__ = ("origin", "origin_id")
        ORIGIN_FIELD_NUMBER: _ClassVar[int]
        ORIGIN_ID_FIELD_NUMBER: _ClassVar[int]
        origin: str
        origin_id: str
        def __init__(self, origin: _Optional[str] = ..., origin_id: _Optional[str] = ...) -> None: ...
    class Rejected(_message.Message):
        __slots__ = ("detail", "holder")
        DETAIL_FIELD_NUMBER: _ClassVar[int]
        HOLDER_FIELD_NUMBER: _ClassVar[int]
        detail: str
        holder: str
        def __init__(self, detail: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    granted: LeaseReply.Granted
    rejected: LeaseReply.Rejected
    def __init__(self, granted: _Optional[_Union[LeaseReply.Granted, _Mapping]] = ..., rejected: _Optional[_Union[LeaseReply.Rejected, _Mapping]] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("stream", "zone", "avoid", "origin_only")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    AVOID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ONLY_FIELD_NUMBER: _ClassVar[int]
    stream: _media_pb2.StreamKey
    zone: str
    avoid: _containers.RepeatedScalarFieldContainer[str]
    origin_only: bool
    def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., zone: _Optional[str] = ..., avoid: _Optional[_Iterable[str]] = ..., origin_only: _Optional[bool] = ...) -> None: ...

class LocateReply(_message.Message):
    __slots__ = ("found", "origin", "edge", "holder")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    found: bool
    origin: str
    edge: str
    holder: str
    def __init__(self, found: _Optional[bool] = ..., origin: _Optional[str] = ..., edge: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class StreamInfo(_message.Message):
    __slots__ = ("stream", "origin", "holder", "client_addr", "since_us")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDR_FIELD_NUMBER: _ClassVar[int]
    SINCE_US_FIELD_NUMBER: _ClassVar[int]
    stream: _media_pb2.StreamKey
    origin: str
    holder: str
    client_addr: str
    since_us: int
    def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., origin: _Optional[str] = ..., holder: _Optional[str] = ..., client_addr: _Optional[str] = ..., since_us: _Optional[int] = ...) -> None: ...

class ListStreamsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStreamsReply(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[StreamInfo]
    def __init__(self, streams: _Optional[_Iterable[_Union[StreamInfo, _Mapping]]] = ...) -> None: ...

class StreamChange(_message.Message):
    __slots__ = ("kind", "stream")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[StreamChange.Kind]
        KIND_PUBLISHED: _ClassVar[StreamChange.Kind]
        KIND_UNPUBLISHED: _ClassVar[StreamChange.Kind]
        KIND_MOVED: _ClassVar[StreamChange.Kind]
    KIND_UNSPECIFIED: StreamChange.Kind
    KIND_PUBLISHED: StreamChange.Kind
    KIND_UNPUBLISHED: StreamChange.Kind
    KIND_MOVED: StreamChange.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    kind: StreamChange.Kind
    stream: StreamInfo
    def __init__(self, kind: _Optional[_Union[StreamChange.Kind, str]] = ..., stream: _Optional[_Union[StreamInfo, _Mapping]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    class Entry(_message.Message):
        __slots__ = ("node", "load")
        NODE_FIELD_NUMBER: _ClassVar[int]
        LOAD_FIELD_NUMBER: _ClassVar[int]
        node: Node
        load: NodeLoad
        def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[ListNodesReply.Entry]
    def __init__(self, nodes: _Optional[_Iterable[_Union[ListNodesReply.Entry, _Mapping]]] = ...) -> None: ...
