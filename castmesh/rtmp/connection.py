"""The server side of one RTMP connection, sans-IO, in the style of h11: feed bytes with receive_data(),
get events back, answer with methods (accept_publish, ...), and send what data_to_send() returns.

What it does by itself: the handshake; protocol control (chunk size, acknowledgements, pings); the
commands that need no decision (connect, createStream, releaseStream, FCPublish, ...). What it asks the
owner to decide: publish and play, through PublishRequested and PlayRequested.

Every protocol violation or limit breach raises an RtmpError whose message says what went wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any
from urllib.parse import parse_qsl

from castmesh.media import amf0
from castmesh.rtmp import chunks
from castmesh.rtmp.chunks import ChunkLimits, ChunkReader, ChunkWriter, Message
from castmesh.rtmp.errors import CommandError, LimitExceeded
from castmesh.rtmp.handshake import ServerHandshake

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")

# User Control event types
STREAM_BEGIN, STREAM_EOF, SET_BUFFER_LENGTH, PING_REQUEST, PING_RESPONSE = 0, 1, 3, 6, 7

CSID_COMMAND = 3
CSID_STREAM_COMMAND = 5
SERVER_WINDOW = 2_500_000
OUT_CHUNK_SIZE = 4096


@dataclass(frozen=True, slots=True)
class RtmpLimits:
    chunks: ChunkLimits = field(default_factory=ChunkLimits)
    amf: amf0.AmfLimits = field(default_factory=amf0.AmfLimits)
    max_message_streams: int = 16
    max_stream_name: int = 1024
    # FLV tags in one aggregate message: a server's aggregate carries a few hundred ms of media (tens of
    # tags); a message of empty tags would otherwise make tens of thousands of frames from one 1 MB message.
    max_aggregate_tags: int = 1024


# Events -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Connected:
    app: str
    tc_url: str
    properties: dict[str, Any]


@dataclass(slots=True)
class PublishRequested:
    stream_id: int
    name: str
    publish_type: str
    query: dict[str, str]


@dataclass(slots=True)
class PlayRequested:
    stream_id: int
    name: str
    query: dict[str, str]


@dataclass(slots=True)
class MediaReceived:
    """Audio (8), video (9) or data (18) for a publishing stream. For data, metadata sent as
    @setDataFrame is unwrapped so the payload is the FLV script tag body ("onMetaData", {...})."""

    stream_id: int
    kind: int
    timestamp: int
    payload: bytes


@dataclass(slots=True)
class PublishFinished:
    stream_id: int


@dataclass(slots=True)
class PlayFinished:
    stream_id: int


Event = Connected | PublishRequested | PlayRequested | MediaReceived | PublishFinished | PlayFinished


class StreamState(Enum):
    CREATED = auto()
    PUBLISH_PENDING = auto()
    PUBLISHING = auto()
    PLAY_PENDING = auto()
    PLAYING = auto()


@dataclass(slots=True)
class _MessageStream:
    state: StreamState = StreamState.CREATED
    name: str = ""


def split_name(raw: str) -> tuple[str, dict[str, str]]:
    """'key?token=x' -> ('key', {'token': 'x'}), as OBS and ffmpeg put auth parameters in the stream key."""
    name, _, query = raw.partition("?")
    return name, dict(parse_qsl(query, keep_blank_values=True))


def status(code: str, description: str, level: str = "status", **extra: Any) -> dict[str, Any]:
    return {"level": level, "code": code, "description": description, **extra}


class ServerConnection:
    def __init__(self, limits: RtmpLimits | None = None) -> None:
        self.limits = limits or RtmpLimits()
        self.handshake = ServerHandshake()
        self.reader = ChunkReader(self.limits.chunks)
        self.writer = ChunkWriter()
        self.app = ""
        self.tc_url = ""
        self.connected = False
        self.streams: dict[int, _MessageStream] = {}
        self._next_stream_id = 1
        self._out = bytearray()
        self._received = 0
        self._acked = 0
        self._ack_window = 0  # set by the peer's Window Acknowledgement Size; 0 means "never ack"

    # Bytes in, bytes out --------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        self._received += len(data)
        if not self.handshake.done:
            reply, data = self.handshake.receive(data)
            self._out += reply
            if not data:
                return []
        events: list[Event] = []
        for message in self.reader.feed(data):
            self._dispatch(message, events)
        if self._ack_window and self._received - self._acked >= self._ack_window:
            self._acked = self._received
            self._control(chunks.ACKNOWLEDGEMENT, _U32.pack(self._received & 0xFFFFFFFF))
        return events

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # Decisions from the owner ---------------------------------------------------------------------------

    def accept_publish(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        stream.state = StreamState.PUBLISHING
        self._user_control(STREAM_BEGIN, _U32.pack(stream_id))
        self._on_status(stream_id, status("NetStream.Publish.Start", f"Started publishing {stream.name}.",
                                          details=stream.name))

    def reject_publish(self, stream_id: int, description: str,
                       code: str = "NetStream.Publish.BadName") -> None:
        self.streams[stream_id].state = StreamState.CREATED
        self._on_status(stream_id, status(code, description, level="error"))

    def accept_play(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        stream.state = StreamState.PLAYING
        self._user_control(STREAM_BEGIN, _U32.pack(stream_id))
        self._on_status(stream_id, status("NetStream.Play.Reset", f"Playing and resetting {stream.name}.",
                                          details=stream.name))
        self._on_status(stream_id, status("NetStream.Play.Start", f"Started playing {stream.name}.",
                                          details=stream.name))
        self.send_message(CSID_STREAM_COMMAND, 0, chunks.DATA_AMF0, stream_id,
                          amf0.encode("|RtmpSampleAccess", True, True))

    def reject_play(self, stream_id: int, description: str) -> None:
        self.streams[stream_id].state = StreamState.CREATED
        self._on_status(stream_id, status("NetStream.Play.StreamNotFound", description, level="error"))

    def end_play(self, stream_id: int) -> None:
        """The stream being played has ended (its publisher left)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state is not StreamState.PLAYING:
            return
        self._user_control(STREAM_EOF, _U32.pack(stream_id))
        self._on_status(stream_id, status("NetStream.Play.UnpublishNotify", f"{stream.name} is now unpublished."))
        stream.state = StreamState.CREATED

    def send_message(self, csid: int, timestamp: int, type_id: int, stream_id: int, payload: bytes) -> None:
        self._out += self.writer.write(csid, timestamp, type_id, stream_id, payload)

    # Incoming messages ----------------------------------------------------------------------------------

    def _dispatch(self, message: Message, events: list[Event]) -> None:
        type_id = message.type_id
        if type_id in (chunks.AUDIO, chunks.VIDEO):
            self._media(message.stream_id, type_id, message.timestamp, message.payload, events)
        elif type_id in (chunks.DATA_AMF0, chunks.DATA_AMF3):
            payload = message.payload[1:] if type_id == chunks.DATA_AMF3 else message.payload
            self._data(message, payload, events)
        elif type_id in (chunks.COMMAND_AMF0, chunks.COMMAND_AMF3):
            payload = message.payload
            if type_id == chunks.COMMAND_AMF3:
                if not payload or payload[0] != 0:
                    raise CommandError("AMF3 command message does not start with the 0x00 format byte")
                payload = payload[1:]
            self._command(message.stream_id, self._decode(payload, "command"), events)
        elif type_id == chunks.WINDOW_ACK_SIZE:
            if len(message.payload) < 4:
                raise CommandError("Window Acknowledgement Size shorter than 4 bytes")
            self._ack_window = _U32.unpack_from(message.payload)[0]
        elif type_id == chunks.USER_CONTROL:
            self._user_control_in(message.payload)
        elif type_id == chunks.AGGREGATE:
            self._aggregate(message, events)
        # Set Chunk Size and Abort were applied by the reader; acknowledgements, peer bandwidth and
        # shared objects need no answer from a server that does not throttle.

    def _decode(self, payload: bytes, what: str) -> list[Any]:
        try:
            return amf0.decode(payload, self.limits.amf)
        except amf0.AmfError as exc:
            raise CommandError(f"bad AMF0 in {what} message: {exc}") from exc

    def _media(self, stream_id: int, kind: int, timestamp: int, payload: bytes, events: list[Event]) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.state in (StreamState.PUBLISHING, StreamState.PUBLISH_PENDING):
            events.append(MediaReceived(stream_id, kind, timestamp, payload))

    def _data(self, message: Message, payload: bytes, events: list[Event]) -> None:
        values = self._decode(payload, "data")
        if values and values[0] == "@setDataFrame":
            _, used = amf0.decode_one(payload, self.limits.amf)
            payload = payload[used:]
            values = values[1:]
        if not values or not isinstance(values[0], str):
            return
        self._media(message.stream_id, chunks.DATA_AMF0, message.timestamp, payload, events)

    def _aggregate(self, message: Message, events: list[Event]) -> None:
        """An aggregate message is FLV tags back to back; their timestamps are relative to the first."""
        data = message.payload
        pos = 0
        base: int | None = None
        tags = 0
        while pos + 11 <= len(data):
            tags += 1
            if tags > self.limits.max_aggregate_tags:
                raise CommandError(f"aggregate message carries more than {self.limits.max_aggregate_tags} tags")
            tag_type = data[pos] & 0x1F
            size = int.from_bytes(data[pos + 1 : pos + 4], "big")
            ts = int.from_bytes(data[pos + 4 : pos + 7], "big") | (data[pos + 7] << 24)
            body = data[pos + 11 : pos + 11 + size]
            if len(body) < size:
                raise CommandError("aggregate message truncated inside a tag")
            base = ts if base is None else base
            timestamp = (message.timestamp + ts - base) & 0xFFFFFFFF
            if tag_type in (chunks.AUDIO, chunks.VIDEO):
                self._media(message.stream_id, tag_type, timestamp, body, events)
            elif tag_type == chunks.DATA_AMF0:
                self._data(Message(message.csid, timestamp, tag_type, message.stream_id, body), body, events)
            pos += 11 + size + 4

    def _user_control_in(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise CommandError("User Control message shorter than 2 bytes")
        event = _U16.unpack_from(payload)[0]
        if event == PING_REQUEST:
            self._user_control(PING_RESPONSE, payload[2:6])

    # Commands -------------------------------------------------------------------------------------------

    def _command(self, stream_id: int, values: list[Any], events: list[Event]) -> None:
        if len(values) < 2 or not isinstance(values[0], str) or not isinstance(values[1], int | float):
            raise CommandError(f"command message without a name and transaction id: {values[:2]!r}")
        name, tid, args = values[0], values[1], values[2:]
        if name == "connect":
            self._connect(tid, args, events)
            return
        if not self.connected:
            raise CommandError(f"{name!r} before connect")
        if name == "createStream":
            if len(self.streams) >= self.limits.max_message_streams:
                raise LimitExceeded(f"more than {self.limits.max_message_streams} streams in one connection")
            new_id = self._next_stream_id
            self._next_stream_id += 1
            self.streams[new_id] = _MessageStream()
            self._result(tid, None, float(new_id))
        elif name in ("publish", "play"):
            self._publish_or_play(name, stream_id, args, events)
        elif name == "deleteStream":
            target = args[1] if len(args) > 1 and isinstance(args[1], int | float) else stream_id
            self._finish(int(target), events)
            self.streams.pop(int(target), None)
        elif name == "closeStream":
            self._finish(stream_id, events)
        elif name == "FCUnpublish":
            target_name = args[1] if len(args) > 1 and isinstance(args[1], str) else None
            for sid, stream in list(self.streams.items()):
                if stream.state is StreamState.PUBLISHING and split_name(target_name or "")[0] == stream.name:
                    self._finish(sid, events)
            self._result(tid, None)
        elif name in ("releaseStream", "FCPublish", "FCSubscribe", "getStreamLength"):
            self._result(tid, None)
        # Anything else (_checkbw, onBWDone, ...) needs no answer; SRS ignores them too.

    def _connect(self, tid: float, args: list[Any], events: list[Event]) -> None:
        if self.connected:
            raise CommandError("second connect on one connection")
        props = args[0] if args and isinstance(args[0], dict) else {}
        self.app = str(props.get("app", "")).strip("/")
        self.tc_url = str(props.get("tcUrl", ""))
        self.connected = True
        self._control(chunks.WINDOW_ACK_SIZE, _U32.pack(SERVER_WINDOW))
        self._control(chunks.SET_PEER_BANDWIDTH, _U32.pack(SERVER_WINDOW) + b"\x02")
        self._out += self.writer.set_chunk_size(OUT_CHUNK_SIZE)
        server: dict[str, Any] = {"fmsVer": "FMS/3,5,3,888", "capabilities": 127.0, "mode": 1.0}
        if "fourCcList" in props:
            server["fourCcList"] = props["fourCcList"]  # enhanced RTMP: every codec passes through
        encoding = props.get("objectEncoding", 0.0)
        info = status("NetConnection.Connect.Success", "Connection succeeded.",
                      objectEncoding=encoding if isinstance(encoding, int | float) else 0.0)
        self.send_message(CSID_COMMAND, 0, chunks.COMMAND_AMF0, 0, amf0.encode("_result", tid, server, info))
        events.append(Connected(self.app, self.tc_url, props))

    def _publish_or_play(self, command: str, stream_id: int, args: list[Any], events: list[Event]) -> None:
        if stream_id == 0:
            raise CommandError(f"{command} on message stream 0; createStream first")
        raw_name = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        if not raw_name or len(raw_name) > self.limits.max_stream_name:
            raise CommandError(f"{command} with a missing or over-long stream name")
        stream = self.streams.get(stream_id)
        if stream is None:
            # Some clients skip createStream's answer and pick their own id; allow it within the limit.
            if len(self.streams) >= self.limits.max_message_streams:
                raise LimitExceeded(f"more than {self.limits.max_message_streams} streams in one connection")
            stream = self.streams[stream_id] = _MessageStream()
        if stream.state is not StreamState.CREATED:
            raise CommandError(f"{command} on message stream {stream_id}, which is already {stream.state.name}")
        name, query = split_name(raw_name)
        stream.name = name
        if command == "publish":
            kind = args[2] if len(args) > 2 and isinstance(args[2], str) else "live"
            stream.state = StreamState.PUBLISH_PENDING
            events.append(PublishRequested(stream_id, name, kind, query))
        else:
            stream.state = StreamState.PLAY_PENDING
            events.append(PlayRequested(stream_id, name, query))

    def _finish(self, stream_id: int, events: list[Event]) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.state in (StreamState.PUBLISHING, StreamState.PUBLISH_PENDING):
            events.append(PublishFinished(stream_id))
        elif stream.state in (StreamState.PLAYING, StreamState.PLAY_PENDING):
            events.append(PlayFinished(stream_id))
        stream.state = StreamState.CREATED

    # Outgoing helpers -----------------------------------------------------------------------------------

    def _control(self, type_id: int, payload: bytes) -> None:
        self.send_message(2, 0, type_id, 0, payload)

    def _user_control(self, event: int, data: bytes) -> None:
        self._control(chunks.USER_CONTROL, _U16.pack(event) + data)

    def _result(self, tid: float, *values: Any) -> None:
        self.send_message(CSID_COMMAND, 0, chunks.COMMAND_AMF0, 0, amf0.encode("_result", tid, *values))

    def _on_status(self, stream_id: int, info: dict[str, Any]) -> None:
        self.send_message(CSID_STREAM_COMMAND, 0, chunks.COMMAND_AMF0, stream_id,
                          amf0.encode("onStatus", 0.0, None, info))
