"""An on-demand pull's idle clock (services.worker.pull): it counts from the source's first media, not from
the job's start, so a source slower to start than the idle time does not end the pull before the viewer
that asked for it has subscribed; and an origin that cannot say who watches does not end it either."""

from __future__ import annotations

import asyncio
import time

import pytest

from castmesh.media.frames import stream_key
from castmesh.mesh.sessions import Publishes
from castmesh.proto.v1.dispatch_pb2 import Job, JobSpec
from castmesh.proto.v1.media_pb2 import StreamKey
from services.worker import pull
from services.worker.pull import PullJob, foreign_audio

IDLE = 1  # seconds (idle_seconds is whole seconds)


def on_demand(watchers: pull.Watchers) -> PullJob:
    spec = JobSpec(kind="pull", stream=stream_key("od", "cam"), url="rtmp://127.0.0.1/live/cam", on_demand=True,
                   idle_seconds=IDLE)
    return PullJob(Job(id="pull:od/cam", spec=spec), Publishes.__new__(Publishes), "ffmpeg", lambda job: None,
                   watchers)


def test_idle_counts_from_the_first_media_not_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "IDLE_CHECK", 0.05)
    subscribed_at: list[float] = []

    async def watchers(key: StreamKey) -> int:
        return 1 if subscribed_at and time.monotonic() < subscribed_at[0] + 0.5 else 0

    async def main() -> tuple[float, float]:
        job = on_demand(watchers)
        started = time.monotonic()
        idle = asyncio.get_running_loop().create_task(job._idle())
        await asyncio.sleep(2 * IDLE)  # the source takes longer than the idle time to give media
        assert not idle.done()
        job.connected = True
        connected = time.monotonic()
        await asyncio.sleep(0.4)  # the waiting viewer subscribes a little later, and leaves after 0.5 s
        assert not idle.done(), "ended before the viewer that started it could subscribe"
        subscribed_at.append(time.monotonic())
        await asyncio.wait_for(idle, 5)
        return connected - started, time.monotonic() - subscribed_at[0]

    before, after = asyncio.run(main())
    assert before >= 2 * IDLE
    assert 0.5 + IDLE - 0.1 <= after <= 0.5 + IDLE + 0.5  # its idle time after the last viewer left


def test_an_origin_that_cannot_say_who_watches_does_not_end_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "IDLE_CHECK", 0.05)

    async def unknown(key: StreamKey) -> int | None:
        return None

    async def main() -> bool:
        job = on_demand(unknown)
        job.connected = True
        idle = asyncio.get_running_loop().create_task(job._idle())
        await asyncio.sleep(IDLE + 0.5)
        done = idle.done()
        idle.cancel()
        return done

    assert not asyncio.run(main())


def test_audio_outputs_cannot_carry_is_named_by_its_flv_tag() -> None:
    assert foreign_audio(b"\xaf\x01aac") == ""  # AAC
    assert foreign_audio(b"\x90Opus" + bytes(19)) == "" and foreign_audio(b"\x91Opus\xfc") == ""  # enhanced Opus
    assert foreign_audio(b"\x82\x00") == "G.711 mu-law" and foreign_audio(b"\x72\x00") == "G.711 A-law"
    assert foreign_audio(b"\x2f\xff\xfb") == "MP3"
    assert foreign_audio(b"\x90fLaC") == "fLaC" and foreign_audio(b"\x91ac-3") == "ac-3"
    assert foreign_audio(b"\xd2") == "FLV sound format 13"
