"""WebSocket-FLV at /{app}/{stream}.flv with an Upgrade (as Node-Media-Server and ZLMediaKit serve it),
read by wsproto's client: a valid FLV stream in binary messages, and a clean close."""

from __future__ import annotations

import socket
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request

from castmesh.media.flv import FlvReader, Tag
from castmesh.media.frames import AUDIO, DATA, VIDEO
from tests.integration.harness import Up, publish, wait_live


def open_websocket(up: Up, path: str) -> tuple[socket.socket, WSConnection]:
    sock = socket.create_connection(("127.0.0.1", up.http_port), timeout=10)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=f"127.0.0.1:{up.http_port}", target=path)))
    return sock, ws


def test_websocket_flv_is_a_valid_flv_stream_and_closes_cleanly(suite: Up) -> None:
    publisher = publish(suite.rtmp("ws"), 20, gop=30)
    try:
        wait_live(suite.flv("ws"))
        sock, ws = open_websocket(suite, "/live/ws.flv")
        reader, tags, messages, accepted = FlvReader(), list[Tag](), 0, False
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            ws.receive_data(sock.recv(65536))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, BytesMessage):
                    messages += 1
                    tags += reader.feed(bytes(event.data))
        assert accepted and messages > 10
        assert reader.header is not None and reader.header[4] == 0x05  # audio and video
        assert tags[0].kind == DATA and b"onMetaData" in tags[0].payload
        video = [t for t in tags if t.kind == VIDEO]
        assert video[0].payload[:2] == b"\x17\x00" and video[1].payload[:2] == b"\x17\x01"  # config, keyframe
        assert any(t.kind == AUDIO for t in tags)
        stamps = [t.timestamp for t in video]
        assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 3000
        sock.sendall(ws.send(CloseConnection(code=1000)))
        closed = False
        while not closed:
            data = sock.recv(65536)
            if not data:
                break
            ws.receive_data(data)
            closed = any(isinstance(e, CloseConnection) for e in ws.events())
        assert closed  # the server answered the close
        sock.close()
    finally:
        publisher.kill()
        publisher.wait()


def test_websocket_upgrade_for_an_unknown_stream_is_refused(suite: Up) -> None:
    sock, ws = open_websocket(suite, "/live/nobody.flv")
    ws.receive_data(sock.recv(65536))
    events = list(ws.events())
    assert isinstance(events[0], RejectConnection) and events[0].status_code == 404
    sock.close()


def test_websocket_without_a_key_is_told_what_is_missing(suite: Up) -> None:
    sock = socket.create_connection(("127.0.0.1", suite.http_port), timeout=5)
    sock.sendall(b"GET /live/x.flv HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 426") and b"Sec-WebSocket-Key" in answer
    sock.close()
