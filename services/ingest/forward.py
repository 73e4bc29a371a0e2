"""Forwarding one RTMP publish to a relay over Relay.Publish.

Frames are gathered for batch_ms and sent as one FrameBatch, so a stream costs tens of gRPC messages a
second. When the relay falls behind, the queue of batches grows past max_queued and the owner is told to
pause reading the publisher's socket: TCP then slows the publisher instead of ingest buffering without end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from castmesh.proto.v1.media_pb2 import Frame, FrameBatch, StreamKey
from castmesh.proto.v1.relay_pb2 import PublishOpen, PublishRequest, PublishResponse
from castmesh.proto.v1.relay_pb2_grpc import RelayStub

MAX_BATCH_BYTES = 1 << 20


class RelayPublish:
    def __init__(self, stub: RelayStub, key: StreamKey, session_id: str, client_addr: str,
                 batch_ms: float, on_pause: Callable[[bool], None], max_queued: int = 64) -> None:
        self.stub = stub
        self.key = key
        self.session_id = session_id
        self.client_addr = client_addr
        self.batch_delay = batch_ms / 1000
        self.on_pause = on_pause
        self.max_queued = max_queued
        self.pending: list[Frame] = []
        self.pending_bytes = 0
        self.flush_handle: asyncio.TimerHandle | None = None
        self.queue: asyncio.Queue[PublishRequest | None] = asyncio.Queue()
        self.paused = False
        self.call: grpc.aio.StreamStreamCall | None = None
        self.writer: asyncio.Task[None] | None = None
        self.closed = False

    async def open(self) -> PublishResponse:
        """Open the call and wait for the relay's verdict (accepted or rejected)."""
        self.call = self.stub.Publish()
        await self.call.write(PublishRequest(open=PublishOpen(
            stream=self.key, session_id=self.session_id, client_addr=self.client_addr)))
        answer = await self.call.read()
        if answer is grpc.aio.EOF:
            raise ConnectionError("relay closed the publish call without answering")
        if answer.HasField("accepted"):
            self.writer = asyncio.get_running_loop().create_task(self._write_loop())
        return answer

    async def wait_closed(self) -> str:
        """Wait until the relay ends the call; return why."""
        assert self.call is not None
        try:
            while (await self.call.read()) is not grpc.aio.EOF:
                pass
            return "relay ended the publish"
        except grpc.aio.AioRpcError as exc:
            return f"relay call failed: {exc.code().name} {exc.details() or ''}".strip()

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        self.pending.append(frame)
        self.pending_bytes += len(frame.payload)
        if self.pending_bytes >= MAX_BATCH_BYTES:
            self.flush()
        elif self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_later(self.batch_delay, self.flush)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if not self.pending:
            return
        self.queue.put_nowait(PublishRequest(batch=FrameBatch(frames=self.pending)))
        self.pending = []
        self.pending_bytes = 0
        if not self.paused and self.queue.qsize() > self.max_queued:
            self.paused = True
            self.on_pause(True)

    async def _write_loop(self) -> None:
        assert self.call is not None
        while True:
            request = await self.queue.get()
            if request is None:
                await self.call.done_writing()
                return
            await self.call.write(request)
            if self.paused and self.queue.qsize() <= self.max_queued // 2:
                self.paused = False
                self.on_pause(False)

    async def close(self) -> None:
        """Send what is pending, then end the call (the relay then ends the stream for its viewers)."""
        if self.closed:
            return
        self.closed = True
        self.flush()
        if self.writer is None:
            if self.call is not None:
                self.call.cancel()
            return
        self.queue.put_nowait(None)
        try:
            # Half-close, then let the relay finish reading before the call goes away.
            await asyncio.wait_for(self.writer, timeout=5)
            await asyncio.wait_for(self.wait_closed(), timeout=5)
        except (TimeoutError, grpc.aio.AioRpcError):
            pass
        finally:
            if self.call is not None:
                self.call.cancel()

    def abort(self) -> None:
        self.closed = True
        if self.flush_handle is not None:
            self.flush_handle.cancel()
        if self.writer is not None:
            self.writer.cancel()
        if self.call is not None:
            self.call.cancel()
