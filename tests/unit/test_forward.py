"""services/worker/forward.py without a network: target URLs read as ffmpeg and OBS split them (and bad ones
refused with a reason that never shows the key), masked() for logs and the API, the backoff sequence, and
what one target's connection is sent (a fake link in place of RTMP or SRT): a start at a keyframe with the
headers first and timestamps from 0, a skip to the next keyframe when it cannot keep up, a new publish
session upstream going on without a step back, a lost connection retried."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from castmesh.media import amf0
from castmesh.media.frames import AUDIO, DATA, VIDEO, make_frame, stream_key
from castmesh.mesh.targets import Destination, masked, parse_target
from castmesh.proto.v1.dispatch_pb2 import ForwardTarget, Job, JobSpec
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader
from castmesh.proto.v1.relay_pb2 import StreamEnd
from services.worker import forward
from services.worker.forward import GAP, MAX_BEHIND, Backoff, ForwardJob

KEY = "abcd-efgh-ijkl-mnop"

# URLs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("rtmp://a.rtmp.youtube.com/live2/" + KEY, Destination("rtmp", "a.rtmp.youtube.com", 1935, "live2", KEY)),
    ("rtmps://a.rtmps.youtube.com/live2/" + KEY, Destination("rtmps", "a.rtmps.youtube.com", 443, "live2", KEY)),
    ("RTMP://Example.COM:1936/live/cam", Destination("rtmp", "example.com", 1936, "live", "cam")),
    # the key is the last segment; the app is all before it (a nested app, an application instance)
    ("rtmp://127.0.0.1/app/instance/" + KEY, Destination("rtmp", "127.0.0.1", 1935, "app/instance", KEY)),
    ("rtmp://[::1]:1935/live/cam/", Destination("rtmp", "::1", 1935, "live", "cam")),
    # a query string stays on the key (Twitch's ?bandwidthtest=true, signed keys)
    ("rtmp://live.twitch.tv/app/live_1_x?bandwidthtest=true",
     Destination("rtmp", "live.twitch.tv", 1935, "app", "live_1_x?bandwidthtest=true")),
    ("rtmp://h/live/k?a=1&b=%2F#x", Destination("rtmp", "h", 1935, "live", "k?a=1&b=%2F#x")),
    # RTMPS: insecure=1 turns the certificate check off and is not sent; the rest of the query is the key's
    ("rtmps://h:4443/live/k?insecure=1", Destination("rtmps", "h", 4443, "live", "k", verify=False)),
    ("rtmps://h/live/k?sig=9&insecure=1", Destination("rtmps", "h", 443, "live", "k?sig=9", verify=False)),
    ("rtmps://h/live/k?insecure=0", Destination("rtmps", "h", 443, "live", "k", verify=True)),
    ("rtmp://h/live/k?insecure=1", Destination("rtmp", "h", 1935, "live", "k?insecure=1")),
])
def test_rtmp_urls_split_into_app_and_key(url: str, expected: Destination) -> None:
    assert parse_target(url) == expected


def test_srt_urls_give_stream_id_passphrase_and_latency() -> None:
    target = parse_target("srt://ingest.example.com:9000?streamid=%23%21%3A%3Ar%3Dlive%2Fcam%2Cm%3Dpublish"
                          "&passphrase=0123456789ab&latency=300&mode=caller")
    assert target == Destination("srt", "ingest.example.com", 9000, stream_id="#!::r=live/cam,m=publish",
                                 passphrase="0123456789ab", latency_ms=300)
    assert parse_target("srt://10.0.0.1:8890?streamid=publish:live/cam") == Destination(
        "srt", "10.0.0.1", 8890, stream_id="publish:live/cam")
    assert parse_target("srt://10.0.0.1:8890").latency_ms is None


@pytest.mark.parametrize(("url", "says"), [
    ("http://h/live/" + KEY, "unknown scheme http://: forward targets are rtmp://, rtmps:// or srt:// URLs"),
    (KEY, "unknown scheme (none)"),
    ("", "unknown scheme (none)"),
    ("rtmp:///live/" + KEY, "no host"),
    ("rtmp://h/" + KEY, "an rtmp URL names an application and a stream key: rtmp://host[:port]/app/key"),
    ("rtmps://h/live/", "an rtmps URL names an application and a stream key"),
    ("rtmp://h:99999/live/" + KEY, "not a URL: Port out of range"),
    ("rtmp://h:0/live/" + KEY, "port 0"),
    ("rtmp://user:" + KEY + "@h/live/cam", "user:password@ in the URL is not supported"),
    ("srt://h?streamid=" + KEY, "an srt URL needs a port"),
    ("srt://h:9000/live/" + KEY, "an srt URL has no path"),
    ("srt://h:9000?streamid=" + KEY + "&pbkeylen=16", "unknown SRT option 'pbkeylen'"),
    ("srt://h:9000?mode=listener&streamid=" + KEY, "a forward target is called: mode=caller, not 'listener'"),
    ("srt://h:9000?passphrase=short" + "&streamid=" + KEY, "an SRT passphrase is 10 to 79 characters"),
    ("srt://h:9000?latency=200000&streamid=" + KEY, "200000 looks like microseconds"),
    ("srt://h:9000?latency=fast", "latency is a number of milliseconds, not 'fast'"),
    ("srt://h:9000?streamid=" + "x" * 513, "the streamid is over SRT's 512 bytes"),
])
def test_bad_urls_are_refused_with_a_reason_and_without_the_key(url: str, says: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_target(url)
    assert says in str(refused.value)
    assert KEY not in str(refused.value) and "short" not in str(refused.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("rtmp://a.rtmp.youtube.com/live2/" + KEY, "rtmp://a.rtmp.youtube.com/live2/****"),
    ("rtmps://h:443/app/instance/" + KEY + "?sig=1&insecure=1", "rtmps://h:443/app/instance/****"),
    ("rtmp://user:pass@h/live/" + KEY, "rtmp://****@h/live/****"),
    ("srt://h:9000?streamid=" + KEY + "&passphrase=0123456789ab&latency=200&mode=caller",
     "srt://h:9000?streamid=****&passphrase=****&latency=200&mode=caller"),
    ("srt://h:9000", "srt://h:9000"),
    ("srt://h:9000/" + KEY + "?latency=20", "srt://h:9000/****?latency=20"),
    ("rtmp://h/live?" + KEY, "rtmp://h/****"),
    ("http://h/path/" + KEY, "http://h/path/****"),
    (KEY, "****"),  # a bare key pasted as a URL
    ("rtmp://[::1/live/" + KEY, "****"),  # not even a URL
])
def test_masked_hides_keys_and_passwords(url: str, shown: str) -> None:
    assert masked(url) == shown


def test_backoff_doubles_up_to_its_cap_and_starts_again_after_a_reset() -> None:
    backoff = Backoff(1.0, 30.0, rng=lambda: 0.0)  # (no jitter drawn: the waits themselves)
    assert [backoff.next() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    backoff.reset()
    assert [backoff.next() for _ in range(3)] == [1, 2, 4]
    short = Backoff(0.2, 0.5, rng=lambda: 0.0)
    assert [short.next() for _ in range(4)] == [0.2, 0.4, 0.5, 0.5]
    most = Backoff(1.0, 30.0, rng=lambda: 0.999)  # the most jitter takes off: a fifth, to the 10 ms
    assert [most.next() for _ in range(7)] == [0.8, 1.6, 3.2, 6.4, 12.8, 24.01, 24.01]


def test_backoff_jitter_spreads_the_retries_of_many_streams() -> None:
    """A hundred forwards to one server that restarted: their retries spread over the last fifth of each
    wait instead of landing together."""
    backoffs = [Backoff(1.0, 30.0) for _ in range(100)]
    for expected in (1, 2, 4, 8):
        waits = [b.next() for b in backoffs]
        assert all(0.8 * expected - 0.01 <= w <= expected for w in waits), waits
        assert len(set(waits)) > 10  # not one instant
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


# One target's connection ----------------------------------------------------------------------------------

METADATA = amf0.encode("onMetaData", {"width": 320.0, "height": 240.0})
VIDEO_CONFIG, AUDIO_CONFIG = b"\x17\x00\x00\x00\x00\x01avcC", b"\xaf\x00\x12\x10"


def video(ts: int, key: bool = False) -> Frame:
    return make_frame(VIDEO, ts, (b"\x17" if key else b"\x27") + b"\x01\x00\x00\x00picture")


def audio(ts: int) -> Frame:
    return make_frame(AUDIO, ts, b"\xaf\x01sound")


def header() -> StreamHeader:
    return StreamHeader(metadata=make_frame(DATA, 0, METADATA), video_config=make_frame(VIDEO, 0, VIDEO_CONFIG),
                        audio_config=make_frame(AUDIO, 0, AUDIO_CONFIG), has_audio=True, has_video=True)


class FakeLink:
    def __init__(self) -> None:
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.sent: list[tuple[int, int, bytes]] = []
        self.waiting = 0
        self.closed: bool | None = None

    def fail(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)

    def send(self, media: list[tuple[int, int, bytes]]) -> int:
        self.sent += media
        return sum(len(m[2]) for m in media)

    def backlog(self) -> int:
        return self.waiting

    def close(self, clean: bool) -> None:
        if self.closed is None:  # as the real links: the first close is the one that counts
            self.closed = clean


class Source:
    """A subscription the test drives: the job's callbacks, and a run() that ends when told."""

    def __init__(self) -> None:
        self.on_header: Callable[[StreamHeader, bool], None] = lambda h, n: None
        self.on_frames: Callable[[list[Frame]], None] = lambda f: None
        self.end = asyncio.Event()

    def __call__(self, key: Any, on_header: Any, on_frames: Any) -> Source:
        self.on_header, self.on_frames = on_header, on_frames
        return self

    async def run(self) -> StreamEnd:
        await self.end.wait()
        return StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED)


async def started(urls: list[str], monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[ForwardJob, Source, list[FakeLink], list[list[int]], asyncio.Task[StreamEnd]]:
    links: list[FakeLink] = []

    async def open_link(to: Destination) -> FakeLink:
        link = FakeLink()
        links.append(link)
        return link

    monkeypatch.setattr(forward, "open_link", open_link)
    source, reports = Source(), []
    job = ForwardJob(Job(id="forward:v/live/cam", spec=JobSpec(kind="forward", stream=stream_key("live", "cam"),
                                                               targets=urls)),
                     source, lambda j: reports.append([t.state for t in j.targets]), backoff=0.01, max_backoff=0.02)
    task = asyncio.get_running_loop().create_task(job.run())
    reachable = sum(1 for t in job.targets if t.to is not None)
    for _ in range(1000):  # until every target holds its link (connects counts it in the same step)
        await asyncio.sleep(0.001)
        if sum(t.connects for t in job.job.targets) == reachable:
            break
    return job, source, links, reports, task


def test_a_target_starts_at_a_keyframe_with_the_headers_and_timestamps_from_0(monkeypatch: pytest.MonkeyPatch) -> None:
    def targets_by_state() -> list[float]:
        return [REGISTRY.get_sample_value("castmesh_forward_targets", {"state": state}) or 0.0
                for state in ("connecting", "forwarding", "retrying")]

    async def scenario() -> None:
        gauges = targets_by_state()
        job, source, [link], reports, task = await started(["rtmp://h/live/" + KEY], monkeypatch)
        source.on_header(header(), True)
        source.on_frames([video(960), audio(970)])  # no keyframe yet: nothing goes out
        assert link.sent == [] and job.job.targets[0].state == ForwardTarget.STATE_CONNECTING
        source.on_frames([video(980), audio(995), video(1000, key=True), audio(990), video(1040)])
        assert link.sent == [(DATA, 0, METADATA), (VIDEO, 0, VIDEO_CONFIG), (AUDIO, 0, AUDIO_CONFIG),
                             (VIDEO, 0, video(0, key=True).payload), (AUDIO, 0, audio(0).payload),
                             (VIDEO, 40, video(0).payload)]
        for ts in range(1080, 3000, 40):  # many batches: no report for any of them
            source.on_frames([video(ts), audio(ts + 5)])
        status = job.job.targets[0]
        assert status.state == ForwardTarget.STATE_FORWARDING and status.connects == 1
        assert status.bytes == sum(len(m[2]) for m in link.sent)
        assert reports[-1] == [ForwardTarget.STATE_FORWARDING] and len(reports) <= 3
        assert job.job.detail == "forwarding to 1 of 1 targets"
        assert targets_by_state() == [gauges[0], gauges[1] + 1, gauges[2]]
        source.end.set()
        assert (await task).reason == StreamEnd.REASON_UNPUBLISHED
        job.close(True, "unpublished")
        await asyncio.sleep(0)
        assert link.closed is True and not link.lost.cancelled()  # its connection ends as the job says, cleanly
        assert targets_by_state() == gauges

    asyncio.run(scenario())


def test_a_target_that_falls_behind_skips_to_the_next_keyframe(monkeypatch: pytest.MonkeyPatch) -> None:
    def skips() -> float:
        return REGISTRY.get_sample_value("castmesh_forward_skips_total") or 0.0

    async def scenario() -> None:
        job, source, [link], _, task = await started(["rtmp://h/live/cam"], monkeypatch)
        source.on_header(header(), True)
        source.on_frames([video(0, key=True), video(40)])
        before = skips()
        link.waiting = MAX_BEHIND + 1
        link.sent.clear()
        new_config = make_frame(VIDEO, 80, VIDEO_CONFIG + b"2")
        source.on_frames([video(80), new_config, audio(90), video(1000, key=True), video(1040)])
        assert link.sent == [(VIDEO, 80, new_config.payload)]  # configurations still go; pictures wait
        link.waiting = 0
        source.on_frames([video(1080), audio(1090), video(2000, key=True), audio(2010)])
        assert [m[1] for m in link.sent[1:]] == [2000, 2010]
        assert skips() == before + 1
        source.end.set()
        await task
        job.close(True, "")

    asyncio.run(scenario())


def test_a_new_session_upstream_restarts_at_its_keyframe_without_going_back(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        job, source, [link], _, task = await started(["rtmp://h/live/cam"], monkeypatch)
        source.on_header(header(), True)
        source.on_frames([video(5000, key=True), video(5040)])
        link.sent.clear()
        source.on_header(header(), True)  # the publisher came back: its timestamps start again
        source.on_frames([video(0), video(33, key=True), video(66)])
        assert [(m[0], m[1]) for m in link.sent] == [(DATA, 40 + GAP), (VIDEO, 40 + GAP), (AUDIO, 40 + GAP),
                                                     (VIDEO, 40 + GAP), (VIDEO, 40 + GAP + 33)]
        source.end.set()
        await task
        job.close(False, "")

    asyncio.run(scenario())


def test_a_lost_connection_is_retried_and_starts_again_with_the_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        job, source, links, reports, task = await started(["rtmp://h/live/" + KEY, "rtmps://bad/" + KEY,
                                                           "rtmp://other/live/cam"], monkeypatch)
        assert len(links) == 2  # the bad URL is never tried; the others run
        bad = job.job.targets[1]
        assert bad.state == ForwardTarget.STATE_UNSPECIFIED and "names an application and a stream key" in bad.detail
        source.on_header(header(), True)
        source.on_frames([video(0, key=True)])
        links[0].fail(f"the server said {KEY}")
        status = job.job.targets[0]
        for _ in range(100):
            await asyncio.sleep(0)
            if status.state != ForwardTarget.STATE_FORWARDING:
                break
        assert status.state == ForwardTarget.STATE_RETRYING
        assert status.detail == "h:1935: the server said ****"  # a key quoted back is masked
        assert job.job.targets[2].state == ForwardTarget.STATE_FORWARDING  # the other target is untouched
        for _ in range(1000):
            await asyncio.sleep(0.001)
            if status.connects == 2:
                break
        source.on_frames([video(40), video(1000, key=True)])
        assert [m[1] for m in links[2].sent][:4] == [0, 0, 0, 0] and links[2].sent[0][0] == DATA
        assert status.state == ForwardTarget.STATE_FORWARDING and status.connects == 2
        assert links[0].closed is False
        assert ForwardTarget.STATE_RETRYING in [r[0] for r in reports]
        source.end.set()
        await task
        job.close(True, "")

    asyncio.run(scenario())
