"""Bounded fuzzing of playback's HTTP/1.1 session: real requests (GETs, a blocking LL-HLS reload, a WHEP
POST, a WebSocket upgrade) damaged any way and cut into reads anywhere. The session never raises, every
byte it writes is a response (a status line first), and what it holds for a client stays within its
limits after every read: the head being read, what is queued behind a request in flight, what follows an
upgrade."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from services.playback.http import MAX_REQUEST_BODY, MAX_REQUEST_HEAD, MAX_WEBSOCKET_INPUT, HttpSession, Request
from tests.fuzz.damage import BASIC, damage
from tests.unit.test_http_session import Transport

SEEDS = [
    b"GET /live/a.m3u8?format=llhls&_HLS_msn=5&_HLS_part=2 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /live/a/hls/ll/part-12.m4s HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    b"POST /live/a/whep HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\nContent-Length: 9\r\n\r\n"
    b"v=0\r\no=-\r\n",
    b"GET /live/a.flv HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x85abcd",
    b"HEAD / HTTP/1.0\r\n\r\n",
]


@st.composite
def damaged_stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = bytearray(b"".join(SEEDS[draw(st.integers(0, len(SEEDS) - 1))] for _ in range(draw(st.integers(1, 6)))))
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        if not damage(draw, data, draw(st.sampled_from([*BASIC, "repeat"])), pos, max_insert=16):
            # a long header value or URL: the head limit
            data[pos:pos] = bytes((draw(st.sampled_from(b"aX:/ ")),)) * draw(st.integers(100, 3 * MAX_REQUEST_HEAD))
        if not data:
            data = bytearray(b"G")
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return bytes(data), cuts


@settings(max_examples=300, deadline=None)
@given(damaged_stream(), st.booleans(), st.booleans())
def test_damaged_requests_get_answers_and_the_session_holds_no_more_than_its_limits(
        stream: tuple[bytes, list[int]], answer_now: bool, paused: bool) -> None:
    data, cuts = stream

    async def scenario() -> None:
        def route(session: HttpSession, request: Request) -> None:
            if answer_now:
                session.respond(200, b"ok")  # else held, like a blocking reload

        session = HttpSession(route, lambda s: None)
        transport = Transport()
        session.connection_made(transport)  # type: ignore[arg-type]
        if paused:
            session.pause_writing()
        last = 0
        for cut in [*cuts, len(data)]:
            chunk = data[last:cut]
            last = cut
            if not chunk:
                continue
            session.data_received(chunk)
            assert session.queued <= MAX_REQUEST_HEAD + MAX_REQUEST_BODY + len(chunk)
            # what it holds of the head (the URL and headers passed on, the parser's unfinished line); its count
            # of the head, which it refuses by, is never below that (4 a header line, a terse one takes 2)
            held = len(session.url) + sum(len(k) + len(v) for k, v in session.header_list)
            assert held + session.partial <= MAX_REQUEST_HEAD + len(chunk)
            assert session.head_size >= held
            assert len(session.upgrade_data) <= MAX_WEBSOCKET_INPUT + len(chunk)
            if transport.closed:
                break
        if transport.data:
            assert transport.data.startswith(b"HTTP/1.1 ")
        session.connection_lost(None)

    asyncio.run(scenario())
