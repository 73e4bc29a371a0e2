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
    NODE_ROLE_WORKER: _ClassVar[NodeRole]
NODE_ROLE_UNSPECIFIED: NodeRole
NODE_ROLE_ORIGIN: NodeRole
NODE_ROLE_EDGE: NodeRole
NODE_ROLE_INGEST: NodeRole
NODE_ROLE_PLAYBACK: NodeRole
NODE_ROLE_DISPATCH: NodeRole
NODE_ROLE_GATEWAY: NodeRole
NODE_ROLE_WORKER: NodeRole

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
        __slots__ = ("stream", "holder", "client_addr", "origin_hint", "job")
        STREAM_FIELD_NUMBER: _ClassVar[int]
        HOLDER_FIELD_NUMBER: _ClassVar[int]
        CLIENT_ADDR_FIELD_NUMBER: _ClassVar[int]
        ORIGIN_HINT_FIELD_NUMBER: _ClassVar[int]
        JOB_FIELD_NUMBER: _ClassVar[int]
        stream: _media_pb2.StreamKey
        holder: str
        client_addr: str
        origin_hint: str
        job: str
        def __init__(self, stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., holder: _Optional[str] = ..., client_addr: _Optional[str] = ..., origin_hint: _Optional[str] = ..., job: _Optional[str] = ...) -> None: ...
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
    __slots__ = ("found", "origin", "edge", "holder", "pending")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    found: bool
    origin: str
    edge: str
    holder: str
    pending: bool
    def __init__(self, found: _Optional[bool] = ..., origin: _Optional[str] = ..., edge: _Optional[str] = ..., holder: _Optional[str] = ..., pending: _Optional[bool] = ...) -> None: ...

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

class Rendition(_message.Message):
    __slots__ = ("name", "width", "height", "bitrate_kbps", "frame_rate", "codec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BITRATE_KBPS_FIELD_NUMBER: _ClassVar[int]
    FRAME_RATE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    width: int
    height: int
    bitrate_kbps: int
    frame_rate: float
    codec: str
    def __init__(self, name: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., bitrate_kbps: _Optional[int] = ..., frame_rate: _Optional[float] = ..., codec: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("kind", "stream", "renditions", "source", "segment_seconds", "targets", "url", "on_demand", "idle_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    RENDITIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    stream: _media_pb2.StreamKey
    renditions: _containers.RepeatedCompositeFieldContainer[Rendition]
    source: str
    segment_seconds: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    url: str
    on_demand: bool
    idle_seconds: int
    def __init__(self, kind: _Optional[str] = ..., stream: _Optional[_Union[_media_pb2.StreamKey, _Mapping]] = ..., renditions: _Optional[_Iterable[_Union[Rendition, _Mapping]]] = ..., source: _Optional[str] = ..., segment_seconds: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., url: _Optional[str] = ..., on_demand: _Optional[bool] = ..., idle_seconds: _Optional[int] = ...) -> None: ...

class ForwardTarget(_message.Message):
    __slots__ = ("url", "state", "detail", "bytes", "connects", "since_us")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ForwardTarget.State]
        STATE_CONNECTING: _ClassVar[ForwardTarget.State]
        STATE_FORWARDING: _ClassVar[ForwardTarget.State]
        STATE_RETRYING: _ClassVar[ForwardTarget.State]
    STATE_UNSPECIFIED: ForwardTarget.State
    STATE_CONNECTING: ForwardTarget.State
    STATE_FORWARDING: ForwardTarget.State
    STATE_RETRYING: ForwardTarget.State
    URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CONNECTS_FIELD_NUMBER: _ClassVar[int]
    SINCE_US_FIELD_NUMBER: _ClassVar[int]
    url: str
    state: ForwardTarget.State
    detail: str
    bytes: int
    connects: int
    since_us: int
    def __init__(self, url: _Optional[str] = ..., state: _Optional[_Union[ForwardTarget.State, str]] = ..., detail: _Optional[str] = ..., bytes: _Optional[int] = ..., connects: _Optional[int] = ..., since_us: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "worker", "state", "detail", "outputs", "since_us", "targets")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        STATE_PENDING: _ClassVar[Job.State]
        STATE_STARTING: _ClassVar[Job.State]
        STATE_RUNNING: _ClassVar[Job.State]
        STATE_FAILED: _ClassVar[Job.State]
        STATE_WAITING: _ClassVar[Job.State]
        STATE_DONE: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    STATE_PENDING: Job.State
    STATE_STARTING: Job.State
    STATE_RUNNING: Job.State
    STATE_FAILED: Job.State
    STATE_WAITING: Job.State
    STATE_DONE: Job.State
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SINCE_US_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    worker: str
    state: Job.State
    detail: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    since_us: int
    targets: _containers.RepeatedCompositeFieldContainer[ForwardTarget]
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., worker: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., detail: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., since_us: _Optional[int] = ..., targets: _Optional[_Iterable[_Union[ForwardTarget, _Mapping]]] = ...) -> None: ...

class WorkReport(_message.Message):
    __slots__ = ("hello", "state", "load")
    class Hello(_message.Message):
        __slots__ = ("node", "capacity", "running")
        NODE_FIELD_NUMBER: _ClassVar[int]
        CAPACITY_FIELD_NUMBER: _ClassVar[int]
        RUNNING_FIELD_NUMBER: _ClassVar[int]
        node: Node
        capacity: int
        running: _containers.RepeatedCompositeFieldContainer[Job]
        def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., capacity: _Optional[int] = ..., running: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    hello: WorkReport.Hello
    state: Job
    load: NodeLoad
    def __init__(self, hello: _Optional[_Union[WorkReport.Hello, _Mapping]] = ..., state: _Optional[_Union[Job, _Mapping]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class WorkOrder(_message.Message):
    __slots__ = ("start", "stop", "refused")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    start: Job
    stop: str
    refused: str
    def __init__(self, start: _Optional[_Union[Job, _Mapping]] = ..., stop: _Optional[str] = ..., refused: _Optional[str] = ...) -> None: ...

class JobReply(_message.Message):
    __slots__ = ("ok", "detail", "job")
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    detail: str
    job: Job
    def __init__(self, ok: _Optional[bool] = ..., detail: _Optional[str] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...
