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

    run(test)


def test_hundreds_of_tiny_pipelined_requests_are_answered_without_recursion() -> None:
    def test() -> None:
        http, transport, served = session(b"ok")
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        http.data_received(request * (MAX_REQUEST_HEAD // len(request)))
        assert len(served) == MAX_REQUEST_HEAD // len(request) > 500 and not transport.closed

    run(test)
