"""What an RTMP publisher can make ingest hold: media sent before its publish is answered is capped in
bytes (not only in messages), and freed as soon as the connection closes, not when the publish's lease or
hook finally answers; media waiting for the origin pauses reading past a byte cap."""

from __future__ import annotations

import asyncio

from castmesh.media.frames import stream_key
from castmesh.mesh.rtmp_server import RtmpServerSession
from castmesh.proto.v1.media_pb2 import Frame
from castmesh.rtmp import chunks
from services.ingest import session as ingest_session
from services.ingest.forward import RelayPublish
from services.ingest.lease import FixedLease, LeaseRefused
from services.ingest.session import Ingest, PublishSession
from tests.rtmp_bytes import ClientMessages, handshake


class Transport:
    def __init__(self) -> None:
        self.paused = False
        self.closing = False

    def get_extra_info(self, name: str) -> object:
        return ("10.0.0.9", 5000) if name == "peername" else None

    def write(self, data: bytes) -> None: ...
    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class StuckLease(FixedLease):
    """A lease that is never answered (a slow dispatch, or a slow on_publish hook before it)."""

    async def acquire(self) -> str:
        await asyncio.Event().wait()
        return self.relay


def test_media_before_the_publish_is_answered_is_capped_and_freed_on_close() -> None:
    async def scenario() -> tuple[int, int, int]:
        ingest = Ingest(lambda key, holder, peer: StuckLease("127.0.0.1:1"))
        session = RtmpServerSession(ingest.rtmp())
        session.connection_made(Transport())  # type: ignore[arg-type]
        client = ClientMessages()
        session.data_received(handshake() + client.publish_sequence("flood"))
        await asyncio.sleep(0)  # the publish is now waiting for its lease
        big = b"\x17\x01\x00\x00\x00" + b"x" * (1 << 20)
        for i in range(40):  # 40 MiB of video before the publish is answered
            session.data_received(client.writer.write(6, i * 40, chunks.VIDEO, 1, big))
        publish = session.publish
        assert isinstance(publish, PublishSession)
        held = (len(publish.early), sum(len(e.payload) for e in publish.early))
        session.connection_lost(None)
        freed = len(publish.early)
        for task in (*session.tasks, *publish.tasks):
            task.cancel()
        return held[0], held[1], freed

    messages, held, freed = asyncio.run(scenario())
    assert held <= ingest_session.MAX_EARLY_BYTES and messages <= ingest_session.MAX_EARLY_FRAMES
    assert messages == 3  # as many 1 MiB messages as fit in 4 MiB
    assert freed == 0


def test_media_waiting_for_the_origin_pauses_reading_past_a_byte_cap() -> None:
    async def scenario() -> tuple[bool, int]:
        pauses: list[bool] = []
        publish = RelayPublish(None, FixedLease("r:1"), stream_key("live", "x"), "s", "", batch_ms=10,  # type: ignore[arg-type]
                               on_pause=pauses.append, on_lost=lambda reason: None, max_queued=64,
                               max_queued_bytes=4 << 20)
        for i in range(6):  # no writer runs: the origin takes nothing
            publish.push(Frame(kind=9, timestamp=i, payload=b"x" * (1 << 20)))
        return pauses == [True], publish.queued_bytes

    paused, queued = asyncio.run(scenario())
    assert paused  # six 1 MiB batches is far below 64 batches, but past 4 MiB
    assert queued == 6 << 20


class RefusedLater(FixedLease):
    """A lease that answers no, once told to."""

    def __init__(self, relay: str) -> None:
        super().__init__(relay)
        self.go = asyncio.Event()

    async def acquire(self) -> str:
        await self.go.wait()
        raise LeaseRefused("taken")


def test_a_publisher_that_deletes_its_stream_before_the_answer_gets_none_and_harms_nothing() -> None:
    async def scenario() -> tuple[list[bytes], bool, bool]:
        lease = RefusedLater("127.0.0.1:1")
        ingest = Ingest(lambda key, holder, peer: lease)
        session = RtmpServerSession(ingest.rtmp())
        transport = Transport()
        written: list[bytes] = []
        transport.write = written.append  # type: ignore[method-assign]
        session.connection_made(transport)  # type: ignore[arg-type]
        client = ClientMessages()
        session.data_received(handshake() + client.publish_sequence("gone"))
        await asyncio.sleep(0)
        publish = session.publish
        assert isinstance(publish, PublishSession)
        before = len(written)
        session.data_received(client.command("deleteStream", 4.0, None, 1.0))  # gives up waiting
        lease.go.set()
        for task in list(session.tasks):
            await task  # no KeyError for a stream the connection no longer has
        return written[before:], publish.ended, transport.closing

    after, ended, closed = asyncio.run(scenario())
    assert ended and not closed  # the publish is over; the connection may go on
    assert not any(b"NetStream.Publish" in data for data in after)  # no answer to a publish it withdrew
