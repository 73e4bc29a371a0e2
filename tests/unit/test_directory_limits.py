"""Dispatch's directories keep bounded memory: a watcher that stops reading is cut off (its iterator ends,
in memory and with Consul alike), and the recent-release memory holds one affinity period of releases."""

from __future__ import annotations

import asyncio

import pytest

from castmesh.media.frames import stream_key, stream_path
from castmesh.proto.v1.dispatch_pb2 import StreamChange, StreamInfo
from services.dispatch.consul_directory import ConsulDirectory
from services.dispatch.directory import InMemoryDirectory


async def publish(directory: InMemoryDirectory | ConsulDirectory, name: str) -> None:
    key = stream_key("live", name)
    if isinstance(directory, InMemoryDirectory):
        await directory.claim(key, f"ingest/{name}", "")
        await directory.set_origin(key, f"ingest/{name}", "o:1")
    else:  # what the Consul watch reports, whoever wrote it
        directory._apply(stream_path(key), StreamInfo(stream=key, holder=f"ingest/{name}", origin="o:1"))


@pytest.mark.parametrize("which", ["memory", "consul"])
def test_a_watcher_that_stops_reading_is_cut_off(which: str) -> None:
    async def scenario() -> list[StreamChange]:
        directory = InMemoryDirectory() if which == "memory" else ConsulDirectory(None)
        directory.hub.limit = 3
        watch = directory.watch()
        first = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0)  # the watcher is registered, and then reads nothing
        for i in range(10):
            await publish(directory, f"s{i}")
        await first
        rest = await asyncio.wait_for(_drain(watch), 2)  # ends: it does not wait for ever
        assert not directory.hub.queues
        return rest

    rest = asyncio.run(scenario())
    assert len(rest) <= 3


async def _drain(watch) -> list[StreamChange]:  # type: ignore[no-untyped-def]
    return [change async for change in watch]


def test_the_recent_release_memory_forgets_releases_older_than_the_affinity() -> None:
    now = [1000.0]

    async def scenario() -> None:
        directory = InMemoryDirectory(affinity=10, clock=lambda: now[0])
        for i in range(1000):  # a release every second for 1000 s, each name once
            await directory.remember(stream_key("live", f"s{i}"), "o:1")
            now[0] += 1
            assert len(directory._recent) <= 11
        assert await directory.recent_origin(stream_key("live", "s999")) == "o:1"
        assert await directory.recent_origin(stream_key("live", "s980")) is None

    asyncio.run(scenario())
