import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.media import amf0
from castmesh.rtmp import chunks
from castmesh.rtmp.connection import (
    Connected,
    MediaReceived,
    PlayRequested,
    PublishFinished,
    PublishRequested,
    ServerConnection,
)
from castmesh.rtmp.errors import CommandError, HandshakeError, LimitExceeded, RtmpError
from castmesh.rtmp.handshake import HANDSHAKE_SIZE
from tests.rtmp_bytes import DATA, ClientMessages, connected, decoded_commands, handshake, server_messages


def replies(conn: ServerConnection) -> bytes:
    out = conn.data_to_send()
    return out[1 + 2 * HANDSHAKE_SIZE :] if out[:1] == b"\x03" else out


def test_ffmpeg_capture_gives_the_publish_session_events():
    conn = ServerConnection()
    events = conn.receive_data((DATA / "ffmpeg-h264-aac.rtmp").read_bytes())
    assert conn.handshake.digest_used  # ffmpeg sends a digest C1
    assert isinstance(events[0], Connected) and events[0].app == "live"
    publish = next(e for e in events if isinstance(e, PublishRequested))
    assert (publish.name, publish.publish_type, publish.stream_id) == ("cap", "live", 1)
    media = [e for e in events if isinstance(e, MediaReceived)]
    assert [e.kind for e in media].count(9) == 52
    assert media[0].kind == chunks.DATA_AMF0
    # @setDataFrame is unwrapped: the payload is an FLV script tag body
    name, meta = amf0.decode(media[0].payload)
    assert name == "onMetaData" and meta["width"] == 160 and meta["videocodecid"] == 7
    assert isinstance(events[-1], PublishFinished)


def test_connect_is_answered_like_gortmplib_and_srs():
    conn = ServerConnection()
    events = conn.receive_data(handshake() + ClientMessages().connect("live"))
    assert events == [Connected("live", "rtmp://127.0.0.1/live", {
        "app": "live", "tcUrl": "rtmp://127.0.0.1/live", "type": "nonprivate"})]
    msgs = server_messages(replies(conn))
    assert [m.type_id for m in msgs] == [chunks.WINDOW_ACK_SIZE, chunks.SET_PEER_BANDWIDTH,
                                         chunks.SET_CHUNK_SIZE, chunks.COMMAND_AMF0]
    result = amf0.decode(msgs[-1].payload)
    assert result[0] == "_result" and result[1] == 1.0
    assert result[3]["code"] == "NetConnection.Connect.Success"


def test_publish_accept_and_reject_status_codes():
    client = ClientMessages()
    conn = ServerConnection()
    events = conn.receive_data(handshake() + client.publish_sequence("cam?token=abc"))
    publish = events[-1]
    assert isinstance(publish, PublishRequested)
    assert (publish.name, publish.query) == ("cam", {"token": "abc"})
    assert decoded_commands(replies(conn))[-1] == ["_result", 2.0, None, 1.0]
    conn.accept_publish(1)
    assert decoded_commands(replies(conn))[-1][3]["code"] == "NetStream.Publish.Start"

    other = ServerConnection()
    other.receive_data(handshake() + ClientMessages().publish_sequence("cam"))
    other.data_to_send()
    other.reject_publish(1, "already publishing")
    info = decoded_commands(other.data_to_send())[-1][3]
    assert (info["level"], info["code"]) == ("error", "NetStream.Publish.BadName")


def test_media_flows_only_for_a_publishing_stream_and_ends_on_delete():
    client = ClientMessages()
    conn = ServerConnection()
    conn.receive_data(handshake() + client.publish_sequence())
    conn.accept_publish(1)
    video = client.writer.write(6, 40, chunks.VIDEO, 1, b"\x17\x01\x00\x00\x00frame")
    stray = client.writer.write(6, 40, chunks.VIDEO, 7, b"\x17\x01\x00\x00\x00frame")
    events = conn.receive_data(video + stray + client.command("deleteStream", 4.0, None, 1.0))
    assert events == [MediaReceived(1, 9, 40, b"\x17\x01\x00\x00\x00frame"), PublishFinished(1)]


@pytest.mark.parametrize("wrap", [True, False])
@pytest.mark.parametrize("container", [dict, amf0.EcmaArray])
def test_metadata_as_object_or_ecma_array_with_or_without_set_data_frame(wrap, container):
    client = ClientMessages()
    conn = ServerConnection()
    conn.receive_data(handshake() + client.publish_sequence())
    conn.accept_publish(1)
    meta = amf0.encode("onMetaData", container({"width": 640.0}))
    body = (amf0.encode("@setDataFrame") if wrap else b"") + meta
    events = conn.receive_data(client.writer.write(4, 0, chunks.DATA_AMF0, 1, body))
    assert events == [MediaReceived(1, chunks.DATA_AMF0, 0, meta)]


def test_amf3_command_messages_are_accepted():
    conn = ServerConnection()
    body = b"\x00" + amf0.encode("connect", 1.0, {"app": "live", "objectEncoding": 3.0})
    events = conn.receive_data(handshake() + ClientMessages().writer.write(3, 0, chunks.COMMAND_AMF3, 0, body))
    assert isinstance(events[0], Connected)
    assert decoded_commands(replies(conn))[-1][3]["objectEncoding"] == 3.0


def test_play_is_answered_with_reset_and_start_or_not_found():
    client = ClientMessages()
    conn = ServerConnection()
    events = conn.receive_data(handshake() + client.connect() + client.command("createStream", 2.0, None)
                               + client.command("play", 3.0, None, "cam", -2000.0, stream_id=1))
    assert events[-1] == PlayRequested(1, "cam", {})
    conn.data_to_send()
    conn.accept_play(1)
    codes = [c[3]["code"] for c in decoded_commands(conn.data_to_send()) if c[0] == "onStatus"]
    assert codes == ["NetStream.Play.Reset", "NetStream.Play.Start"]

    other = connected()
    other.receive_data(client.command("createStream", 2.0, None) + client.command("play", 3.0, None, "x",
                                                                                    stream_id=1))
    other.data_to_send()
    other.reject_play(1, "no such stream")
    assert decoded_commands(other.data_to_send())[-1][3]["code"] == "NetStream.Play.StreamNotFound"


def test_ping_request_gets_a_ping_response():
    conn = connected()
    ping = ClientMessages().writer.write(2, 0, chunks.USER_CONTROL, 0, struct.pack(">HI", 6, 1234))
    conn.receive_data(ping)
    (reply,) = server_messages(conn.data_to_send())
    assert reply.type_id == chunks.USER_CONTROL and reply.payload == struct.pack(">HI", 7, 1234)


def test_acknowledgement_is_sent_when_the_peer_window_is_reached():
    client = ClientMessages()
    conn = connected()
    conn.receive_data(client.writer.write(2, 0, chunks.WINDOW_ACK_SIZE, 0, struct.pack(">I", 5000)))
    conn.data_to_send()
    conn.receive_data(client.writer.write(4, 0, chunks.AUDIO, 1, b"\xaf\x01" + b"x" * 6000))
    acks = [m for m in server_messages(conn.data_to_send()) if m.type_id == chunks.ACKNOWLEDGEMENT]
    assert len(acks) == 1 and struct.unpack(">I", acks[0].payload)[0] == conn._received


def test_a_second_publish_on_the_same_stream_id_is_a_protocol_error():
    client = ClientMessages()
    conn = ServerConnection()
    conn.receive_data(handshake() + client.publish_sequence())
    with pytest.raises(CommandError, match="already"):
        conn.receive_data(client.command("publish", 5.0, None, "x", "live", stream_id=1))


def test_malformed_inputs_raise_typed_errors():
    with pytest.raises(HandshakeError):
        ServerConnection().receive_data(b"\x06" + bytes(1536))
    conn = connected()
    bomb = b"\x02\x00\x07connect\x00" + bytes(8) + b"\x0a\x00\x00\x00\x01" * 5000
    with pytest.raises(CommandError, match="nesting"):
        ServerConnection().receive_data(handshake() + ClientMessages().writer.write(3, 0, 20, 0, bomb))
    with pytest.raises(LimitExceeded, match="Set Chunk Size 0"):
        conn.receive_data(ClientMessages().writer.write(2, 0, chunks.SET_CHUNK_SIZE, 0, struct.pack(">I", 0)))
    with pytest.raises(CommandError, match="before connect"):
        ServerConnection().receive_data(handshake() + ClientMessages().command("createStream", 2.0, None))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=3000))
def test_random_bytes_after_the_handshake_raise_only_rtmp_errors(garbage):
    conn = connected()
    try:
        conn.receive_data(garbage)
    except RtmpError:
        pass


def _aggregate(tags: int, body: bytes = b"") -> bytes:
    """An aggregate message body: `tags` video tags back to back, each with its back pointer."""
    one = bytes([chunks.VIDEO]) + len(body).to_bytes(3, "big") + b"\x00\x00\x00\x00" + b"\x00\x00\x00" + body
    return (one + (len(one)).to_bytes(4, "big")) * tags


def test_an_aggregate_message_may_carry_only_so_many_tags():
    """Twenty 1 MB aggregates of empty tags made 1.4 million frames: a cap on tags per aggregate."""
    client = ClientMessages()
    conn = ServerConnection()
    conn.receive_data(handshake() + client.publish_sequence())
    conn.accept_publish(1)
    limit = conn.limits.max_aggregate_tags
    events = conn.receive_data(client.writer.write(6, 0, chunks.AGGREGATE, 1, _aggregate(limit, b"\x17\x01")))
    assert len(events) == limit and all(isinstance(e, MediaReceived) for e in events)
    with pytest.raises(CommandError, match=f"more than {limit} tags"):
        conn.receive_data(client.writer.write(6, 0, chunks.AGGREGATE, 1, _aggregate(limit + 1)))
