"""The playback HTTP session with a fake transport: keep-alive, pipelining bounded by the client's
reading, and the limits on what a client may send."""

from __future__ import annotations

import asyncio

from services.playback.http import MAX_REQUEST_HEAD, HttpSession, Request


class Transport:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 4242) if name == "peername" else None


def session(body: bytes = b"x" * 1000) -> tuple[HttpSession, Transport, list[str]]:
    served: list[str] = []

    def route(s: HttpSession, request: Request) -> None:
        served.append(request.path)
        s.respond(200, body)

    http = HttpSession(route, lambda s: None)
    transport = Transport()
    http.connection_made(transport)  # type: ignore[arg-type]
    return http, transport, served


def run(test: object) -> None:
    async def main() -> None:
        test()  # type: ignore[operator]

    asyncio.run(main())


def test_kept_alive_connection_serves_pipelined_requests_in_order() -> None:
    def test() -> None:
        http, transport, served = session()
        http.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert served == ["/a", "/b"] and transport.data.count(b"HTTP/1.1 200") == 2 and not transport.closed
        http.data_received(b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert served == ["/a", "/b", "/c"] and transport.closed

    run(test)


def test_a_client_that_does_not_read_gets_no_more_answers_until_it_does() -> None:
    def test() -> None:
        http, _transport, served = session(b"s" * 500_000)
        http.pause_writing()  # the transport's buffer is over its high-water mark
        http.data_received(b"GET /1.ts HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        assert served == []  # nothing is answered into a full buffer
        http.resume_writing()
        assert served == ["/1.ts"] * 50

    def pausing() -> None:
        http, _transport, served = session(b"s" * 500_000)
        http.data_received(b"GET /1.ts HTTP/1.1\r\nHost: x\r\n\r\n")
        http.pause_writing()
        http.data_received(b"GET /2.ts HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        assert served == ["/1.ts"]
        http.resume_writing()
        assert len(served) == 11

    run(test)
    run(pausing)


def test_request_heads_are_bounded_even_when_pipelined() -> None:
    def test() -> None:
        http, transport, _served = session()
        http.pause_writing()
        http.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * (MAX_REQUEST_HEAD // 20))
        assert transport.closed and b"431" in transport.data

    def whole_in_one_read() -> None:  # complete: its size is known only once it is whole
        http, transport, served = session()
        http.data_received(b"GET /live/a.flv HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 4000 + b"\r\n")
        assert transport.closed and b"431" in transport.data and served == []

    def in_pieces() -> None:  # a header that never ends, a little at a time: stopped at the cap
        http, transport, served = session()
        http.data_received(b"GET /live/a.flv HTTP/1.1\r\nHost: x\r\nX: ")
        sent = 0
        while not transport.closed and sent < 10 * MAX_REQUEST_HEAD:
            http.data_received(b"y" * 1000)
            sent += 1000
        assert transport.closed and b"431" in transport.data and served == []
        assert MAX_REQUEST_HEAD < sent <= MAX_REQUEST_HEAD + 1000

    def long_but_within() -> None:  # a 12 KiB URL and a 3 KiB header, in reads cut anywhere: served
        request = (b"GET /live/a.m3u8?x=" + b"u" * 12_000 + b" HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 3000 + b"\r\n\r\n")
        for step in (700, 5000, 9000):
            http, transport, served = session()
            for at in range(0, len(request), step):
                http.data_received(request[at:at + step])
            assert served == ["/live/a.m3u8"] and not transport.closed, step

    run(test)
    run(whole_in_one_read)
    run(in_pieces)
    run(long_but_within)


def test_malformed_requests_get_400_after_the_good_ones_before_them() -> None:
    def test() -> None:
        for bad in (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
                    b"GET / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"):
            http, transport, served = session(b"ok")
            http.data_received(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n" + bad)
            answers = transport.data.split(b"HTTP/1.1 ")[1:]
            assert served == ["/first"] and answers[0].startswith(b"200") and answers[1].startswith(b"400")
            assert transport.closed and len(answers) == 2

    run(test)


def test_an_upgrade_other_than_websocket_is_answered_then_closed() -> None:
    def test() -> None:
        http, transport, served = session(b"ok")
        http.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nPRI * x")
        assert served == ["/a"] and transport.data.startswith(b"HTTP/1.1 200") and transport.closed

    run(test)


def test_response_heads_refuse_a_value_that_would_split_them() -> None:
    import pytest

    from services.playback.http import header_lines, response_head

    assert header_lines([("Location", "/live/a/whep/1")]) == b"Location: /live/a/whep/1\r\n"
    head = response_head(200, [("Content-Type", "video/mp4")], 5, close=False)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n") and b"text/plain" not in head
    assert b"Content-Length: 5\r\n" in head and b"Connection" not in head
    for bad in ("a\r\nSet-Cookie: x", "a\nb", "a\rb"):
        with pytest.raises(ValueError):
            header_lines([("Location", bad)])


def test_hundreds_of_tiny_pipelined_requests_are_answered_without_recursion() -> None:
    def test() -> None:
        http, transport, served = session(b"ok")
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        http.data_received(request * (MAX_REQUEST_HEAD // len(request)))
        assert len(served) == MAX_REQUEST_HEAD // len(request) > 500 and not transport.closed

    run(test)


def test_a_post_body_is_read_whole_and_bounded() -> None:
    """A WHEP offer arrives as a POST body: the route sees it whole, in whatever pieces it came; a body
    that does not say its length, says too much, or sends more than it said is refused, and a request
    after it on the same connection is still answered."""
    from services.playback.http import MAX_REQUEST_BODY

    bodies: list[bytes] = []

    def session_seeing_bodies() -> tuple[HttpSession, Transport]:
        def route(s: HttpSession, request: Request) -> None:
            bodies.append(request.body)
            s.respond(201, b"answer")

        http = HttpSession(route, lambda s: None)
        transport = Transport()
        http.connection_made(transport)  # type: ignore[arg-type]
        return http, transport

    def test() -> None:
        offer = b"v=0\r\n" + b"a=x\r\n" * 6000  # 30 KiB: over the head's cap, within the body's
        http, transport = session_seeing_bodies()
        head = b"POST /live/a/whep HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\nContent-Length: %d\r\n\r\n"
        request = head % len(offer) + offer
        http.data_received(request[:100])
        http.data_received(request[100:20_000])
        assert bodies == []  # not routed before the body is whole
        http.data_received(request[20_000:] + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert bodies == [offer, b""] and transport.data.count(b"HTTP/1.1 201") == 2 and not transport.closed

        http, transport = session_seeing_bodies()  # in one read, with the head
        http.data_received(request)
        assert bodies[-1] == offer and not transport.closed

        http, transport = session_seeing_bodies()
        http.data_received(b"POST /live/a/whep HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert b"HTTP/1.1 411" in transport.data and transport.closed

        http, transport = session_seeing_bodies()
        http.data_received(head % (MAX_REQUEST_BODY + 1))
        assert b"HTTP/1.1 413" in transport.data and transport.closed

        http, transport = session_seeing_bodies()  # says little, sends a lot: the rest is a bad next request
        http.data_received(head % 10 + b"x" * (MAX_REQUEST_BODY + MAX_REQUEST_HEAD))
        assert bodies[-1] == b"x" * 10 and transport.closed and b"HTTP/1.1 4" in transport.data.split(b"answer")[-1]

    run(test)


def test_a_body_that_stops_arriving_times_out() -> None:
    async def main() -> bytes:
        http = HttpSession(lambda s, r: s.respond(201, b""), lambda s: None, request_timeout=0.05)
        transport = Transport()
        http.connection_made(transport)  # type: ignore[arg-type]
        http.data_received(b"POST /live/a/whep HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nv=0")
        await asyncio.sleep(0.2)
        return transport.data

    assert b"HTTP/1.1 408" in asyncio.run(main())


def test_queries_read_as_parse_qsl_reads_them() -> None:
    """parse_query splits a plain query itself (the LL-HLS hot path) and must agree with parse_qsl."""
    import random
    from urllib.parse import parse_qsl

    from services.playback.http import parse_query

    rng = random.Random(7)
    for _ in range(3000):
        query = "".join(rng.choice("ab=&%2+_x") for _ in range(rng.randrange(0, 12)))
        try:
            expected = dict(parse_qsl(query))
        except ValueError:
            continue
        assert parse_query(query) == expected, query
