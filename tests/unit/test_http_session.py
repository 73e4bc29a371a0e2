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

    def whole_in_one_read() -> None:  # complete, so h11's cap (for incomplete heads) does not see it
        http, transport, served = session()
        http.data_received(b"GET /live/a.flv HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 4000 + b"\r\n")
        assert transport.closed and b"431" in transport.data and served == []

    run(test)
    run(whole_in_one_read)


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
