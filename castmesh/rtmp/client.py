"""The client side of one RTMP connection, sans-IO, the mirror of connection.py's ServerConnection: say
what to do (publish, play, send_media, stop), feed the server's bytes to receive_data() for events, and
send what data_to_send() returns. The same chunk, AMF0 and handshake code as the server.

The session it runs, as ffmpeg and OBS do: plain handshake (C0 C1, then C2 echoing S1), connect with the
app and tcUrl, createStream, then publish or play on the stream id the server gave. It keeps the
protocol going by itself: the server's chunk size, acknowledgements at the server's window, ping
responses. Media goes out on ffmpeg's chunk streams (audio 4, video 6, data 5) in chunks of OUT_CHUNK_SIZE.

Events: Connected, PublishStarted, PlayStarted, MediaReceived (playing), StreamEnded (the played stream
was unpublished), Refused (an error status or _error: the description names why). Every protocol
violation or limit breach raises an RtmpError, as on the server side.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from castmesh.media import amf0
from castmesh.rtmp import chunks
from castmesh.rtmp.chunks import ChunkReader, ChunkWriter, Message
from castmesh.rtmp.connection import (
    CSID_COMMAND,
    PING_REQUEST,
    PING_RESPONSE,
    STREAM_EOF,
    MediaReceived,
    RtmpLimits,
)
from castmesh.rtmp.errors import CommandError, HandshakeError
from castmesh.rtmp.handshake import HANDSHAKE_SIZE

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")

OUT_CHUNK_SIZE = 60_000  # what ffmpeg's publishers use in practice is 4096..65536; fewer chunk headers
MEDIA_CSID = {chunks.AUDIO: 4, chunks.VIDEO: 6, chunks.DATA_AMF0: 5}
_CONNECT, _CREATE_STREAM, _START = 1.0, 2.0, 3.0  # transaction ids


@dataclass(slots=True)
class Connected:
    properties: dict[str, Any]


@dataclass(slots=True)
class PublishStarted:
    stream_id: int


@dataclass(slots=True)
class PlayStarted:
    stream_id: int


@dataclass(slots=True)
class StreamEnded:
    """The stream being played was unpublished (Play.UnpublishNotify, Play.Stop or Stream EOF)."""

    stream_id: int
    code: str


@dataclass(slots=True)
class Refused:
    """The server said no: an error status (BadName, StreamNotFound, Unauthorized) or an _error result."""

    code: str
    description: str


ClientEvent = Connected | PublishStarted | PlayStarted | MediaReceived | StreamEnded | Refused


class ClientState(Enum):
    HANDSHAKE = auto()
    CONNECTING = auto()
    CREATING_STREAM = auto()
    STARTING = auto()  # publish or play sent
    PUBLISHING = auto()
    PLAYING = auto()
    ENDED = auto()


@dataclass
class ClientConnection:
    """One RTMP session as a client: `mode` is "publish" or "play" of `name` in `app`."""

    app: str
    name: str
    mode: str = "publish"
    tc_url: str = ""
    limits: RtmpLimits = field(default_factory=RtmpLimits)
    connect_properties: dict[str, Any] = field(default_factory=dict)  # flashVer, fourCcList, ...

    def __post_init__(self) -> None:
        if self.mode not in ("publish", "play"):
            raise ValueError(f"mode is publish or play, not {self.mode!r}")
        self.state = ClientState.HANDSHAKE
        self.reader = ChunkReader(self.limits.chunks)
        self.writer = ChunkWriter()
        self.stream_id = 0
        self._handshake = bytearray()
        self._out = bytearray(b"\x03" + bytes(8) + os.urandom(HANDSHAKE_SIZE - 8))  # C0 C1 (plain)
        self._received = 0
        self._acked = 0
        self._ack_window = 0

    # Bytes in, bytes out --------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        self._received += len(data)
        if self.state is ClientState.HANDSHAKE:
            self._handshake += data
            if len(self._handshake) < 1 + 2 * HANDSHAKE_SIZE:
                return []
            if self._handshake[0] != 3:
                raise HandshakeError(f"server answered RTMP version {self._handshake[0]}, not 3")
            s1 = bytes(self._handshake[1 : 1 + HANDSHAKE_SIZE])
            data = bytes(self._handshake[1 + 2 * HANDSHAKE_SIZE :])
            self._handshake.clear()
            self._out += s1  # C2 echoes S1
            self._out += self.writer.set_chunk_size(OUT_CHUNK_SIZE)
            tc_url = self.tc_url or f"rtmp://127.0.0.1/{self.app}"
            self._command(0, "connect", _CONNECT, {"app": self.app, "type": "nonprivate", "tcUrl": tc_url,
                                                   **self.connect_properties})
            self.state = ClientState.CONNECTING
            if not data:
                return []
        events: list[ClientEvent] = []
        for message in self.reader.feed(data):
            self._dispatch(message, events)
        self._acknowledge()
        return events

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def received_unparsed(self, size: int) -> None:
        """`size` bytes the owner read and chose not to parse (a load generator that only counts what it
        plays): acknowledged at the server's window like parsed ones. Nothing may be fed after this."""
        self._received += size
        self.reader = None  # type: ignore[assignment]  # a later receive_data fails loudly
        self._acknowledge()

    # What the owner does --------------------------------------------------------------------------------

    def send_media(self, kind: int, timestamp: int, payload: bytes) -> None:
        """Audio (8), video (9) or data (18) while publishing."""
        if self.state is not ClientState.PUBLISHING:
            raise CommandError(f"media sent while {self.state.name}, not PUBLISHING")
        self._out += self.writer.write(MEDIA_CSID.get(kind, 7), timestamp, kind, self.stream_id, payload)

    def stop(self) -> None:
        """Unpublish or stop playing (deleteStream), as ffmpeg does at the end."""
        if self.stream_id and self.state in (ClientState.PUBLISHING, ClientState.PLAYING, ClientState.STARTING):
            if self.state is ClientState.PUBLISHING:
                self._command(0, "FCUnpublish", 0.0, None, self.name)
            self._command(0, "deleteStream", 0.0, None, float(self.stream_id))
        self.state = ClientState.ENDED

    # Incoming messages ----------------------------------------------------------------------------------

    def _dispatch(self, message: Message, events: list[ClientEvent]) -> None:
        type_id = message.type_id
        if type_id in (chunks.AUDIO, chunks.VIDEO, chunks.DATA_AMF0):
            if self.state is ClientState.PLAYING and message.stream_id == self.stream_id:
                events.append(MediaReceived(message.stream_id, type_id, message.timestamp, message.payload))
        elif type_id == chunks.COMMAND_AMF0:
            try:
                values = amf0.decode(message.payload, self.limits.amf)
            except amf0.AmfError as exc:
                raise CommandError(f"bad AMF0 in a command from the server: {exc}") from exc
            self._command_in(values, events)
        elif type_id == chunks.WINDOW_ACK_SIZE and len(message.payload) >= 4:
            self._ack_window = _U32.unpack_from(message.payload)[0]
        elif type_id == chunks.USER_CONTROL:
            if len(message.payload) < 6:
                raise CommandError("User Control message shorter than 6 bytes")
            event, value = _U16.unpack_from(message.payload)[0], _U32.unpack_from(message.payload, 2)[0]
            if event == PING_REQUEST:
                self._control(chunks.USER_CONTROL, _U16.pack(PING_RESPONSE) + message.payload[2:6])
            elif event == STREAM_EOF and value == self.stream_id and self.state is ClientState.PLAYING:
                self.state = ClientState.ENDED
                events.append(StreamEnded(value, "StreamEOF"))
        # Set Chunk Size and Abort were applied by the reader; peer bandwidth needs no answer here.

    def _command_in(self, values: list[Any], events: list[ClientEvent]) -> None:
        if len(values) < 2 or not isinstance(values[0], str):
            raise CommandError(f"command from the server without a name: {values[:2]!r}")
        name, tid = values[0], values[1]
        if name == "_error":
            info = values[3] if len(values) > 3 and isinstance(values[3], dict) else {}
            self.state = ClientState.ENDED
            events.append(Refused(str(info.get("code", "_error")), str(info.get("description", ""))))
        elif name == "_result" and tid == _CONNECT and self.state is ClientState.CONNECTING:
            events.append(Connected(values[2] if len(values) > 2 and isinstance(values[2], dict) else {}))
            self.state = ClientState.CREATING_STREAM
            self._command(0, "createStream", _CREATE_STREAM, None)
        elif name == "_result" and tid == _CREATE_STREAM and self.state is ClientState.CREATING_STREAM:
            stream_id = values[3] if len(values) > 3 and isinstance(values[3], int | float) else 0
            if not stream_id:
                raise CommandError(f"createStream answered without a stream id: {values!r}")
            self.stream_id = int(stream_id)
            self.state = ClientState.STARTING
            if self.mode == "publish":
                self._command(self.stream_id, "publish", _START, None, self.name, "live")
            else:
                self._command(self.stream_id, "play", _START, None, self.name, -1000.0)
        elif name == "onStatus":
            info = values[3] if len(values) > 3 and isinstance(values[3], dict) else {}
            self._status(str(info.get("code", "")), str(info.get("level", "")), str(info.get("description", "")),
                         events)

    def _status(self, code: str, level: str, description: str, events: list[ClientEvent]) -> None:
        if level == "error":
            self.state = ClientState.ENDED
            events.append(Refused(code, description))
        elif code == "NetStream.Publish.Start" and self.state is ClientState.STARTING:
            self.state = ClientState.PUBLISHING
            events.append(PublishStarted(self.stream_id))
        elif code == "NetStream.Play.Start" and self.state is ClientState.STARTING:
            self.state = ClientState.PLAYING
            events.append(PlayStarted(self.stream_id))
        elif code in ("NetStream.Play.UnpublishNotify", "NetStream.Play.Stop") and self.state is ClientState.PLAYING:
            self.state = ClientState.ENDED
            events.append(StreamEnded(self.stream_id, code))

    # Outgoing helpers -----------------------------------------------------------------------------------

    def _acknowledge(self) -> None:
        """An Acknowledgement each time what came in since the last one reaches the server's window."""
        if self._ack_window and self._received - self._acked >= self._ack_window:
            self._acked = self._received
            self._control(chunks.ACKNOWLEDGEMENT, _U32.pack(self._received & 0xFFFFFFFF))

    def _command(self, stream_id: int, name: str, tid: float, *args: Any) -> None:
        self._out += self.writer.write(CSID_COMMAND if stream_id == 0 else 8, 0, chunks.COMMAND_AMF0, stream_id,
                                       amf0.encode(name, tid, *args))

    def _control(self, type_id: int, payload: bytes) -> None:
        self._out += self.writer.write(2, 0, type_id, 0, payload)
