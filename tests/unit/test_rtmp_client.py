"""castmesh's RTMP client state machine against its server state machine, in memory: publish, play,
refusals, the server's chunk size and acknowledgement window, and any split of the bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.rtmp import chunks
from castmesh.rtmp.client import ClientConnection, Connected, PlayStarted, PublishStarted, Refused, StreamEnded
from castmesh.rtmp.connection import (
    MediaReceived,
    PlayRequested,
    PublishFinished,
    PublishRequested,
    ServerConnection,
)

KEYFRAME = b"\x17\x01\x00\x00\x00" + b"k" * 5000  # bigger than a chunk either way


class Wire:
    """A client and a server connected in memory; `split` cuts every transfer into pieces that long."""

    def __init__(self, client: ClientConnection, split: int = 1 << 20) -> None:
        self.client, self.server = client, ServerConnection()
        self.split = split
        self.client_events: list[object] = []
        self.server_events: list[object] = []

    def pump(self) -> None:
        for _ in range(20):
            up, down = self.client.data_to_send(), b""
            for i in range(0, len(up), self.split):
                self.server_events += self.server.receive_data(up[i : i + self.split])
            down = self.server.data_to_send()
            for i in range(0, len(down), self.split):
                self.client_events += self.client.receive_data(down[i : i + self.split])
            if not up and not down:
                return


def publish_session(split: int = 1 << 20) -> Wire:
    wire = Wire(ClientConnection("live", "cam?token=t", tc_url="rtmp://127.0.0.1:1935/live"), split)
    wire.pump()
    (requested,) = [e for e in wire.server_events if isinstance(e, PublishRequested)]
    assert (requested.name, requested.query) == ("cam", {"token": "t"})
    assert wire.server.app == "live" and wire.server.tc_url == "rtmp://127.0.0.1:1935/live"
    wire.server.accept_publish(requested.stream_id)
    wire.pump()
    return wire


def test_publish_then_media_then_unpublish() -> None:
    wire = publish_session()
    assert [type(e) for e in wire.client_events] == [Connected, PublishStarted]
    wire.client.send_media(chunks.VIDEO, 40, KEYFRAME)
    wire.client.send_media(chunks.AUDIO, 41, b"\xaf\x01aac")
    wire.pump()
    media = [e for e in wire.server_events if isinstance(e, MediaReceived)]
    assert [(m.kind, m.timestamp, m.payload) for m in media] == [(9, 40, KEYFRAME), (8, 41, b"\xaf\x01aac")]
    wire.client.stop()
    wire.pump()
    assert isinstance(wire.server_events[-1], PublishFinished)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000))
def test_any_split_of_the_bytes_gives_the_same_session(split: int) -> None:
    wire = publish_session(split)
    wire.client.send_media(chunks.VIDEO, 0, KEYFRAME)
    wire.pump()
    assert [e.payload for e in wire.server_events if isinstance(e, MediaReceived)] == [KEYFRAME]


def test_play_receives_media_and_hears_the_end() -> None:
    wire = Wire(ClientConnection("live", "show", mode="play"))
    wire.pump()
    (requested,) = [e for e in wire.server_events if isinstance(e, PlayRequested)]
    wire.server.accept_play(requested.stream_id)
    for ts in (0, 33, 66):
        wire.server.send_message(6, ts, chunks.VIDEO, requested.stream_id, KEYFRAME)
    wire.server.end_play(requested.stream_id)
    wire.pump()
    events = wire.client_events
    assert isinstance(events[1], PlayStarted)
    assert [e.timestamp for e in events if isinstance(e, MediaReceived) and e.kind == 9] == [0, 33, 66]
    assert isinstance(events[-1], StreamEnded)


def test_a_refused_publish_says_why() -> None:
    wire = Wire(ClientConnection("live", "taken"))
    wire.pump()
    (requested,) = [e for e in wire.server_events if isinstance(e, PublishRequested)]
    wire.server.reject_publish(requested.stream_id, "live/taken: stream is already being published")
    wire.pump()
    assert wire.client_events[-1] == Refused("NetStream.Publish.BadName",
                                             "live/taken: stream is already being published")


def test_the_client_acknowledges_at_the_servers_window() -> None:
    wire = Wire(ClientConnection("live", "show", mode="play"))
    wire.pump()
    (requested,) = [e for e in wire.server_events if isinstance(e, PlayRequested)]
    wire.server.accept_play(requested.stream_id)
    wire.pump()
    for ts in range(600):  # 3 MB of video: past the server's 2.5 MB window
        wire.server.send_message(6, ts, chunks.VIDEO, requested.stream_id, KEYFRAME)
    down = wire.server.data_to_send()
    wire.client.receive_data(down)
    acks = [m for m in chunks.ChunkReader().feed(wire.client.data_to_send()) if m.type_id == chunks.ACKNOWLEDGEMENT]
    assert len(acks) == 1 and int.from_bytes(acks[0].payload, "big") == wire.client._received
