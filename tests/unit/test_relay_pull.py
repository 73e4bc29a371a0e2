import asyncio

from castmesh.media.frames import stream_key
from castmesh.proto.v1.media_pb2 import StreamKey
from castmesh.proto.v1.relay_pb2 import SubscribeOpen
from services.relay.service import RelayService


def test_an_ended_pull_does_not_unregister_a_newer_pull_of_the_same_stream() -> None:
    async def scenario() -> None:
        forever = asyncio.Event()
        calls = 0

        async def locate(key: StreamKey, avoid: set[str]) -> str | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                return None  # the first pull finds nothing and ends
            await forever.wait()  # the second keeps looking
            return None

        relay = RelayService(role="edge", locate=locate, node_id="edge")
        opening = SubscribeOpen(stream=stream_key("live", "x"))
        first = relay._pull(opening)
        relay._pull(opening)  # a newer pull of the same stream, before the first has finished
        newer = relay.pulls[first.path]
        for _ in range(5):
            await asyncio.sleep(0)
        assert relay.pulls.get(first.path) is newer  # still known, so it can be stopped when unused
        newer.task.cancel()
        await asyncio.gather(newer.task, return_exceptions=True)
        assert first.path not in relay.pulls

    asyncio.run(scenario())
