"""Low-latency HLS without a network: parts never outlast PART-TARGET whatever the timing, a segment is
its parts, the program date time is ingest's, and a muxer holding a thousand blocking requests answers
them all with one rendering when the part they wait for completes, 503s the ones that wait too long with
one timer, and lets them go when the stream ends."""

from __future__ import annotations

import asyncio
import random

import pytest

from castmesh.media.hls import Segmenter
from castmesh.proto.v1.media_pb2 import Frame
from services.playback import hls as playback_hls
from services.playback.hls import HlsMuxer
from tests.unit.test_hls_muxing import audio, config_frames, stream, video


def irregular(seconds: float, seed: int) -> list[Frame]:
    """Video at 30-ish fps with jittery, sometimes long gaps, a keyframe every ~1 s, and audio between."""
    rng = random.Random(seed)
    frames, ts, last_key = [], 0, -1000
    while ts < seconds * 1000:
        key = ts - last_key >= 1000
        last_key = ts if key else last_key
        frames += [video(ts, key), audio(ts + 5)]
        ts += rng.choice([33, 34, 33, 34, 40, 20, 67, 100, 150])
    return frames


@pytest.mark.parametrize("seed", range(5))
def test_parts_never_outlast_the_part_target_and_a_segment_is_its_parts(seed: int) -> None:
    seg = Segmenter("fmp4", target_ms=1000, window=20, part_ms=200)
    done = seg.push(config_frames() + irregular(12, seed))
    assert len(done) >= 10
    for segment in done:
        durations = [part.duration for part in segment.parts]
        assert all(0 < d <= 0.2 for d in durations), durations
        assert abs(sum(durations) - segment.duration) < 0.002
        assert segment.parts[0].independent  # every segment starts on a keyframe, so does its first part
        assert b"".join(segment.part(i) or b"" for i in range(len(segment.parts))) == segment.data
    text = seg.playlist("")
    assert "#EXT-X-PART-INF:PART-TARGET=0.200" in text and "#EXT-X-PRELOAD-HINT:TYPE=PART" in text


def test_the_program_date_time_is_when_ingest_received_the_frames() -> None:
    seg = Segmenter("fmp4", target_ms=1000, part_ms=200)
    frames = config_frames() + stream(2.1)
    for frame in frames:
        frame.ingest_time_us = 1_700_000_000_000_000 + frame.timestamp * 1000
    seg.push(frames)
    text = seg.playlist("")
    assert "#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z" in text
    assert "#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:21.000Z" in text
    assert f"#EXT-X-MEDIA-SEQUENCE:{1_700_000_000}" in text  # numbered from ingest's clock, in target durations


async def started(**kwargs: object) -> HlsMuxer:
    muxer = HlsMuxer("live/a", "llhls", 1000, 6, 30, on_stop=lambda m: None, part_ms=200)
    muxer.write(config_frames() + stream(2.1, fps=25))
    return muxer


def test_a_thousand_blocked_reloads_are_answered_with_one_rendering() -> None:
    async def scenario() -> None:
        muxer = await started()
        msn, part = muxer.segmenter.latest()
        answers: list[tuple[int, bytes]] = []
        for client in range(1000):
            muxer.playlist("p/", f"10.0.0.{client % 250}:{client}", lambda s, b, r: answers.append((s, b)),
                           want=(msn, part + 1))
        assert answers == [] and muxer.blocked_count == 1000 and len(muxer.blocked) == 1
        handle = muxer.deadline_handle
        assert handle is not None
        muxer.write(stream(0.1, fps=25, start=2100))  # not enough for the next part yet
        assert answers == []
        muxer.write(stream(0.3, fps=25, start=2200))
        assert len(answers) == 1000 and {s for s, _ in answers} == {200}
        assert len({id(body) for _, body in answers}) == 1  # rendered once for all of them
        number = muxer.segmenter.open.parts[part + 1].number if muxer.segmenter.open else -1
        assert f"p/part-{number}.m4s".encode() in answers[0][1]
        assert muxer.blocked_count == 0 and muxer.deadline_handle is handle  # one timer, whatever the count
        muxer.stop("test over")

    asyncio.run(scenario())


def test_held_requests_time_out_with_503_and_go_when_the_stream_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(playback_hls, "HOLD_FOR", 0.05)

    async def scenario() -> None:
        muxer = await started()
        msn, part = muxer.segmenter.latest()
        timed_out: list[int] = []
        muxer.playlist("p/", "c1", lambda s, b, r: timed_out.append(s), want=(msn, part + 1))
        await asyncio.sleep(0.2)
        assert timed_out == [503] and muxer.blocked_count == 0 and muxer.deadline_handle is None
        far: list[int] = []
        muxer.playlist("p/", "c2", lambda s, b, r: far.append(s), want=(msn + 2, 0))
        muxer.playlist("p/", "c2", lambda s, b, r: far.append(s), want=(msn, part + 40))
        assert far == [400, 400]
        ended: list[int] = []
        muxer.playlist("p/", "c3", lambda s, b, r: ended.append(s), want=(msn, part + 1))
        muxer.fetch(f"part-{muxer.segmenter.next_part + 1}.m4s", lambda s, b, r: ended.append(s))
        muxer.end("publisher left", 0)
        assert ended == [404, 404] and muxer.blocked_count == 0

    asyncio.run(scenario())


def test_a_preload_hinted_part_is_answered_once_it_exists() -> None:
    async def scenario() -> None:
        muxer = await started()
        hinted = muxer.segmenter.next_part  # the preload hint's part, whichever segment it turns out in
        assert f"part-{hinted}.m4s" in muxer.segmenter.playlist("p/")
        got: list[tuple[int, bytes, str]] = []
        muxer.fetch(f"part-{hinted}.m4s", lambda s, b, r: got.append((s, b, r)))
        assert got == []
        muxer.write(stream(0.4, fps=25, start=2100))
        assert len(got) == 1 and got[0][0] == 200 and got[0][1][4:8] == b"moof" and got[0][2] == "video/mp4"
        missing: list[int] = []
        muxer.fetch(f"part-{hinted - 400}.m4s", lambda s, b, r: missing.append(s))  # long gone: 404 at once
        muxer.fetch(f"part-{hinted + 100}.m4s", lambda s, b, r: missing.append(s))  # too far ahead: 404 at once
        assert missing == [404, 404]
        muxer.stop("test over")

    asyncio.run(scenario())


def test_a_playlist_asked_for_before_the_first_segment_waits_for_it() -> None:
    async def scenario() -> list[tuple[int, bytes]]:
        got: list[tuple[int, bytes]] = []
        for container in ("ts", "llhls"):
            muxer = HlsMuxer("live/a", container, 1000, 6, 30, on_stop=lambda m: None)
            muxer.write(config_frames() + stream(0.52, fps=25))
            muxer.playlist("p/", "c", lambda s, b, r: got.append((s, b)))
            assert len(got) == (container == "llhls") and len(muxer.waiters) == 1  # waiting, not answered
            muxer.write(stream(0.6, fps=25, gop_ms=480, start=520))  # a keyframe at 1 s: the first segment
            muxer.stop("test over")
        return got

    got = asyncio.run(scenario())
    assert [status for status, _ in got] == [200, 200] and all(b"#EXTINF" in body for _, body in got)


def test_the_hinted_part_exists_even_when_a_keyframe_starts_a_new_segment_with_it() -> None:
    seg = Segmenter("fmp4", target_ms=1000, part_ms=200)
    seg.push(config_frames() + stream(1.0, fps=25))  # the open segment's last part waits for the keyframe
    hinted, msn = seg.next_part, seg.latest()[0]
    seg.push(stream(0.3, fps=25, start=1000))  # the keyframe at 1 s starts the next segment
    assert seg.latest()[0] == msn + 1
    assert seg.part(hinted) is not None  # the hint named a part that was made, in whichever segment


def test_a_reload_for_the_next_segments_first_parts_is_held_not_refused() -> None:
    async def scenario() -> list[int]:
        muxer = await started()
        msn, _ = muxer.segmenter.latest()
        got: list[int] = []
        for part in (0, 1, 14):  # within the Advance Part Limit (15 parts of 200 ms) past the last part
            muxer.playlist("p/", "c", lambda s, b, r: got.append(s), want=(msn + 1, part))
        assert got == [] and muxer.blocked_count == 3
        muxer.write(stream(1.6, fps=25, start=2100))  # the keyframe at 3.1 s starts segment msn + 1
        muxer.stop("test over")
        return got

    assert asyncio.run(scenario())[:2] == [200, 200]


def test_segment_dates_follow_the_media_not_each_arrival() -> None:
    """EXT-X-PROGRAM-DATE-TIME: consecutive segments differ by their durations exactly, whatever jitter
    the frames arrived with; a jump of ingest's clock past MAX_DATE_DRIFT re-anchors the dates."""
    import random
    import re
    from itertools import pairwise

    from castmesh.media.hls import MAX_DATE_DRIFT

    rng = random.Random(3)
    seg = Segmenter("fmp4", target_ms=1000, window=20, part_ms=200)
    frames = config_frames() + stream(6.0)
    for frame in frames:  # arrivals jitter by up to 40 ms around the media's clock
        frame.ingest_time_us = 1_700_000_000_000_000 + frame.timestamp * 1000 + rng.randrange(0, 40_000)
    seg.push(frames)
    dated = [(s.started_at, s.duration) for s in seg.segments]
    assert len(dated) >= 4
    for (start, duration), (following, _) in pairwise(dated):
        assert abs(following - (start + duration)) < 1e-6
    text = seg.playlist("")
    assert len(re.findall("PROGRAM-DATE-TIME", text)) >= 4

    later = stream(2.0, start=6000)
    for frame in later:  # ingest's clock jumps a second ahead of the media's
        frame.ingest_time_us = 1_700_000_000_000_000 + (frame.timestamp + 1000) * 1000
    seg.push(later)
    last = seg.segments[-1]
    assert abs(last.started_at - (1_700_000_000 + 1.0 + last_start_ms(seg) / 1000)) < MAX_DATE_DRIFT


def last_start_ms(seg: Segmenter) -> int:
    """The media timestamp (ms) the last complete segment starts at."""
    total = sum(s.duration for s in list(seg.segments)[:-1])
    return round(total * 1000)
