"""A peer that sends and never reads: the answers a relay call keeps for it are capped, and past the cap
its call is ended (the handler is cancelled), instead of growing for as long as the peer keeps sending."""

from __future__ import annotations

import asyncio

import pytest

from castmesh.media.frames import stream_key
from castmesh.mesh import channels
from castmesh.proto.v1.relay_pb2 import (
    PublishEnd,
    PublishItem,
    PublishRequest,
    SubscribeItem,
    SubscribeOpen,
    SubscribeRequest,
)
from services.relay.calls import PublishCall, SubscribeCall
from services.relay.service import RelayService


@pytest.mark.parametrize("kind", ["publish", "subscribe"])
def test_a_call_whose_peer_reads_no_answers_is_ended_at_the_cap(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "MAX_PENDING", 100)

    async def scenario() -> int:
        relay = RelayService()
        pending: list[int] = []

        async def handler() -> None:  # a call's handler, stuck writing to a peer that reads nothing
            call: PublishCall | SubscribeCall = PublishCall(relay) if kind == "publish" else SubscribeCall(relay)
            for channel in range(1, 1000):
                if isinstance(call, PublishCall):  # an end for a channel never opened: answered "ended"
                    call.received(PublishRequest(items=[PublishItem(channel=channel, end=PublishEnd())]))
                    pending.append(len(call.protocol.replies))
                else:  # an open for a stream nobody publishes: answered with an end
                    call.received(SubscribeRequest(items=[
                        SubscribeItem(channel=channel, open=SubscribeOpen(stream=stream_key("live", "x")))]))
                    pending.append(len(call.protocol.notes))
                await asyncio.sleep(0)
            await asyncio.sleep(30)

        task = asyncio.create_task(handler())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        return max(pending)

    assert asyncio.run(scenario()) == 100
