"""A link's call breaking while a write is in flight: the sender of that write must hear False, or an
ingest awaiting it never fails over (seen as a stream stuck on a killed origin)."""

import asyncio
from typing import Any

import grpc
import pytest

from castmesh.mesh.channels import Accepted, PublishClient
from castmesh.mesh.link import PublishLink
from castmesh.proto.v1.media_pb2 import FrameBatch
from castmesh.proto.v1.relay_pb2 import PublishAccepted, PublishOpen, PublishReply, PublishResponse


class BreakingCall:
    """A call whose peer accepts the first channel's open, then dies on `dead`: either the pending write
    raises, or it hangs and the read fails."""

    def __init__(self, write_raises: bool) -> None:
        self.write_raises = write_raises
        self.dead = asyncio.Event()
        self.opened = asyncio.Event()  # the first message (the open) is written
        self.writing = asyncio.Event()  # a later write is in flight
        self.answered = False
        self.cancelled = False

    def unavailable(self) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")

    async def write(self, message: Any) -> None:
        if not self.opened.is_set():
            self.opened.set()
            return
        self.writing.set()
        await self.dead.wait()
        if not self.write_raises:
            await asyncio.Event().wait()  # stuck, like a write waiting for flow control
        raise self.unavailable()

    def __aiter__(self) -> "BreakingCall":
        return self

    async def __anext__(self) -> Any:
        if not self.answered:
            await self.opened.wait()
            self.answered = True
            return PublishResponse(replies=[PublishReply(channel=1, accepted=PublishAccepted())])
        await self.dead.wait()
        if self.write_raises:
            await asyncio.Event().wait()  # the write fails first; reading never notices
        raise self.unavailable()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


@pytest.mark.parametrize("write_raises", [True, False], ids=["write-fails", "read-fails"])
def test_a_write_in_flight_when_the_call_breaks_is_reported_lost(write_raises: bool) -> None:
    async def run() -> tuple[bool, bool, str]:
        call = BreakingCall(write_raises)
        broken: list[str] = []
        link = PublishLink("127.0.0.1:1", call, PublishClient(), lambda lk: broken.append(lk.lost), "publish")
        channel = link.open(PublishOpen())
        assert isinstance(await channel.answer(2), Accepted)
        in_flight = channel.batch(FrameBatch(), 100)
        await call.writing.wait()
        queued = channel.batch(FrameBatch(), 100)  # behind the one in flight
        call.dead.set()
        results = await asyncio.wait_for(asyncio.gather(in_flight, queued), 2)
        return results[0], results[1], broken[0] if broken else ""

    in_flight, queued, lost = asyncio.run(run())
    assert (in_flight, queued) == (False, False)
    assert lost
