"""An RTMP session over TCP as a client: a thin asyncio adapter around castmesh.rtmp.client (bytes between
the socket and the state machine, nothing else). Publishing: open(), then send_media() and close().
Playing: open(mode="play"), then iterate media() until the stream ends."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

from castmesh.rtmp.client import ClientConnection, ClientEvent, PlayStarted, PublishStarted, Refused, StreamEnded
from castmesh.rtmp.connection import MediaReceived
from castmesh.rtmp.errors import RtmpError

READ_SIZE = 1 << 16


class RtmpRefused(Exception):
    """The server refused the publish or play (BadName, StreamNotFound, Unauthorized, ...)."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code


class RtmpClient:
    def __init__(self, conn: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.pending: list[ClientEvent] = []  # events that came with the start, for media()
        self.listener: asyncio.Task[None] | None = None
        self.error: Exception | None = None  # why the listener stopped, raised at the next send

    @classmethod
    async def open(cls, host: str, port: int, app: str, name: str, mode: str = "publish", tc_url: str = "",
                   timeout: float = 10.0, tls: ssl.SSLContext | None = None,
                   local_address: tuple[str, int] | None = None) -> RtmpClient:
        """Connect and run the session up to publishing or playing; RtmpRefused if the server says no. With
        `tls`, RTMPS: the same session inside TLS (the certificate checked as `tls` says, for `host`)."""
        scheme = "rtmps" if tls is not None else "rtmp"
        conn = ClientConnection(app, name, mode=mode, tc_url=tc_url or f"{scheme}://{host}:{port}/{app}")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls is not None else None, local_addr=local_address),
            timeout)
        client = cls(conn, reader, writer)
        try:
            await asyncio.wait_for(client._start(), timeout)
        except BaseException:
            writer.close()
            raise
        if mode == "publish":  # the server's acks and pings still need reading and answering
            client.listener = asyncio.get_running_loop().create_task(client._listen())
        return client

    async def _start(self) -> None:
        while True:
            self._flush()
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("the server closed the connection before the session started")
            for i, ev in enumerate(events := self.conn.receive_data(data)):
                if isinstance(ev, Refused):
                    raise RtmpRefused(ev.code, ev.description)
                if isinstance(ev, PublishStarted | PlayStarted):
                    self.pending = events[i + 1 :]
                    self._flush()
                    return

    async def _listen(self) -> None:
        try:
            while data := await self.reader.read(READ_SIZE):
                self.conn.receive_data(data)
                self._flush()
            self.error = ConnectionError("the server closed the connection")
        except (ConnectionError, RtmpError) as exc:
            self.error = exc

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)

    def send_media(self, kind: int, timestamp: int, payload: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.conn.send_media(kind, timestamp, payload)
        self._flush()

    async def drain(self) -> None:
        await self.writer.drain()

    async def media(self) -> AsyncIterator[MediaReceived]:
        """What the played stream carries, until it ends or the connection closes; RtmpRefused if the
        server ends the play with an error."""
        events = self.pending
        self.pending = []
        while True:
            for ev in events:
                if isinstance(ev, MediaReceived):
                    yield ev
                elif isinstance(ev, StreamEnded):
                    return
                elif isinstance(ev, Refused):
                    raise RtmpRefused(ev.code, ev.description)
            data = await self.reader.read(READ_SIZE)
            if not data:
                return
            events = self.conn.receive_data(data)
            self._flush()

    async def close(self) -> None:
        """Unpublish or stop, and close the connection."""
        self.conn.stop()
        self._flush()
        if self.listener is not None:
            self.listener.cancel()
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
