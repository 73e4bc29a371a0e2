"""Jobs: ladders and rules as text, the ffmpeg command a ladder makes, and dispatch's job board (placement by
load and capacity, a worker's jobs moved when it leaves, failures retried elsewhere, a source's end)."""

from __future__ import annotations

import pytest

from castmesh.media.frames import stream_key
from castmesh.mesh.jobs import JobError, ladder_text, parse_ladder, parse_rules
from castmesh.proto.v1.dispatch_pb2 import Job, JobSpec, Rendition, StreamInfo
from services.dispatch.jobs import RETRY_FAILED, JobBoard
from services.worker.abr import Planned, ffmpeg_args, plan


def test_ladders_read_and_write_back() -> None:
    ladder = parse_ladder("360p:640x360:800k, 180p:x180:300:15")
    assert [(r.name, r.width, r.height, r.bitrate_kbps, r.frame_rate, r.codec) for r in ladder] == [
        ("360p", 640, 360, 800, 0.0, "h264"), ("180p", 0, 180, 300, 15.0, "h264")]
    assert ladder_text(ladder) == "360p:640x360:800k,180p:x180:300k:15"
    assert parse_ladder(ladder_text(ladder)) == ladder


@pytest.mark.parametrize(("text", "says"), [
    ("", "at least one rendition"),
    ("360p:640x360", "NAME:SIZE:BITRATE"),
    ("360p:640by360:800k", "WIDTHxHEIGHT"),
    ("360p:x360:fast", "kbit/s"),
    ("360p:x361:800k", "even sides"),
    ("360p:x360:800k:vp9", "codec 'vp9' is not one a worker encodes"),
    ("360p:x360:800k:500", "frame rate is 1 to 240"),
    ("a b:x360:800k", "rendition name"),
    ("360p:x360:800k,360p:x180:300k", "given twice"),
    ("8k:x8640:800k", "sides are 2 to 7680"),
    (",".join(f"r{i}:x180:100k" for i in range(9)), "at most 8"),
])
def test_a_ladder_that_cannot_be_met_says_why(text: str, says: str) -> None:
    with pytest.raises(JobError, match=says):
        parse_ladder(text)


def test_rules_first_match_wins() -> None:
    rules = parse_rules("sports*=720p:x720:2500k ; *=360p:x360:800k")
    assert [r.pattern for r in rules] == ["sports*", "*"]
    with pytest.raises(JobError, match="rule for 'live'"):
        parse_rules("live=360p:x360")
    with pytest.raises(JobError, match="APP_PATTERN=LADDER"):
        parse_rules("360p:x360:800k")


def test_renditions_follow_the_source_and_never_upscale() -> None:
    ladder = parse_ladder("1080p:x1080:5000k,360p:x360:800k,180p:320x180:300k")
    planned, skipped = plan(ladder, (1280, 720))
    assert [(p.rendition.name, p.width, p.height) for p in planned] == [("360p", 640, 360), ("180p", 320, 180)]
    assert skipped == ["1080p: 1080 lines is above the source's 1280x720"]
    planned, _ = plan(parse_ladder("90p:x90:100k"), (1440, 1080))  # 4:3: the width follows the aspect ratio
    assert (planned[0].width, planned[0].height) == (120, 90)


def test_the_ffmpeg_command_aligns_keyframes_and_copies_audio() -> None:
    planned = [Planned(r, 320, 180) for r in parse_ladder("a:x180:300k,b:x180:100k:15")]
    args = ffmpeg_args("ffmpeg", planned, True, [5, 6])
    graph = args[args.index("-filter_complex") + 1]
    assert graph.startswith("[0:v]split=2[s0][s1];[s0]scale=320:180")
    assert "select='eq(key\\,1)+gte(t-prev_selected_t\\,0.0600)'" in graph  # 15 fps, every keyframe kept
    assert args.count("-force_key_frames") == 2 and args.count("source") == 2 and "-copyts" in args
    assert args.count("copy") == 2 and "pipe:5" in args and "pipe:6" in args
    assert "-map" in args and "0:a?" not in ffmpeg_args("ffmpeg", planned, False, [5, 6])


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def published(board: JobBoard, app: str, name: str, holder: str = "ingest/rtmp-1") -> StreamInfo:
    info = StreamInfo(stream=stream_key(app, name), holder=holder, origin="127.0.0.1:1")
    board.published(info)
    return info


def orders(worker) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    while not worker.orders.empty():
        order = worker.orders.get_nowait()
        out.append(f"start {order.start.id}" if order.HasField("start") else f"stop {order.stop}")
    return out


def test_jobs_go_to_the_least_loaded_worker_with_room_and_move_when_it_leaves() -> None:
    clock = Clock()
    board = JobBoard(parse_rules("live=180p:x180:300k"), clock=clock)
    busy = board.join("w-busy", 2, [])
    idle = board.join("w-idle", 1, [])
    busy.jobs.add("abr:other")  # one ladder already
    published(board, "live", "a")
    assert orders(idle) == ["start abr:__defaultVhost__/live/a"] and not orders(busy)
    published(board, "live", "b")  # the idle one is full now
    assert orders(busy) == ["start abr:__defaultVhost__/live/b"]
    published(board, "live", "c")
    (job_c,) = [j for j in board.all() if j.id.endswith("/c")]
    assert job_c.state == Job.STATE_PENDING and job_c.detail == "no worker has room"
    published(board, "live", "a_180p", holder="w-idle/abr-2")  # a rendition: no rule applies to it
    published(board, "other", "x")  # no rule for this app
    assert len(board.all()) == 3
    board.leave(idle)  # its job goes back to the board, and waits for room
    (job_a,) = [j for j in board.all() if j.id.endswith("/a")]
    assert job_a.worker == "" and job_a.state == Job.STATE_PENDING
    newcomer = board.join("w-new", 4, [])
    assert sorted(orders(newcomer)) == ["start abr:__defaultVhost__/live/a", "start abr:__defaultVhost__/live/c"]


def test_a_failed_job_is_tried_again_later_elsewhere_and_ends_with_its_source() -> None:
    clock = Clock()
    board = JobBoard(parse_rules("*=180p:x180:300k"), clock=clock)
    first = board.join("w1", 4, [])
    second = board.join("w2", 4, [])
    info = published(board, "live", "cam")
    (job,) = board.all()
    given = first if orders(first) else second
    other = second if given is first else first
    orders(other)
    failed = Job()
    failed.CopyFrom(job)
    failed.state, failed.detail = Job.STATE_FAILED, "cannot start ffmpeg"
    board.report(given, failed)
    assert job.state == Job.STATE_FAILED and not orders(other)  # not at once
    clock.now += RETRY_FAILED + 0.1
    board.place()
    assert orders(other) == [f"start {job.id}"] and job.worker == other.id
    board.unpublished(info)
    assert orders(other) == [f"stop {job.id}"] and board.all() == []


def test_a_restarted_dispatch_adopts_the_jobs_workers_still_run() -> None:
    board = JobBoard([])
    published(board, "live", "cam")
    spec = JobSpec(kind="abr", stream=stream_key("live", "cam"), renditions=[Rendition(name="r", height=90,
                                                                                       bitrate_kbps=100)])
    running = Job(id="abr:__defaultVhost__/live/cam", spec=spec, state=Job.STATE_RUNNING, outputs=["cam_r"])
    keeper = board.join("w1", 2, [running])
    duplicate = board.join("w2", 2, [running])
    assert not orders(keeper) and orders(duplicate) == [f"stop {running.id}"]
    (job,) = board.all()
    assert job.worker == "w1" and job.state == Job.STATE_RUNNING


def test_api_jobs_need_a_live_source() -> None:
    board = JobBoard([])
    spec = JobSpec(kind="abr", stream=stream_key("live", "cam"), renditions=parse_ladder("r:x90:100k"))
    ok, detail, _ = board.add(spec)
    assert not ok and "is not being published" in detail
    published(board, "live", "cam")
    assert board.add(spec)[0] and board.add(spec)[1] == "running already"
    assert board.remove("abr:__defaultVhost__/live/cam", "stopped") and board.all() == []


def test_frame_rates_measured_from_millisecond_timestamps() -> None:
    from castmesh.media.describe import PictureRate

    for fps, expected in ((30, 30.0), (30000 / 1001, 29.97), (15, 15.0), (25, 25.0), (7.3, 7.3)):
        for frames in (12, 90):  # a short window (a stream's first half second) and a full one
            meter = PictureRate()
            for i in range(frames):
                meter.add(round(1000 * i / fps))
            got = meter.rate()
            if fps == 7.3:  # no common rate: what was measured, to the timestamps' precision
                assert abs(got - expected) < 0.01, (fps, frames, got)
            else:  # a short window cannot tell 29.97 from 30
                assert got == expected or (frames == 12 and fps == 30000 / 1001 and got == 30.0), (fps, frames, got)


def test_after_a_dispatch_restart_a_worker_keeps_jobs_whose_source_comes_back_in_time() -> None:
    clock = Clock()
    board = JobBoard([], clock=clock)  # restarted: nothing listed yet
    spec = JobSpec(kind="abr", stream=stream_key("live", "cam"), renditions=parse_ladder("r:x90:100k"))
    gone = JobSpec(kind="abr", stream=stream_key("live", "gone"), renditions=parse_ladder("r:x90:100k"))
    running = [Job(id="abr:__defaultVhost__/live/cam", spec=spec, state=Job.STATE_RUNNING, outputs=["cam_r"]),
               Job(id="abr:__defaultVhost__/live/gone", spec=gone, state=Job.STATE_RUNNING, outputs=["gone_r"])]
    worker = board.join("w1", 4, running)
    assert not orders(worker) and {j.worker for j in board.all()} == {"w1"}  # kept, for now
    published(board, "live", "cam")  # its ingest claimed it again
    clock.now += 11
    board.place()
    assert orders(worker) == ["stop abr:__defaultVhost__/live/gone"]  # that source never came back
    assert [j.id for j in board.all()] == ["abr:__defaultVhost__/live/cam"]


def test_record_forward_and_pull_rules_read_and_say_what_is_wrong() -> None:
    from castmesh.mesh.jobs import FORWARD, PULL, RECORD, JobError, spec_for

    (record,) = parse_rules("live*=300", RECORD)
    assert record.spec.segment_seconds == 300 and parse_rules("cams", RECORD)[0].spec.segment_seconds == 0
    (forward,) = parse_rules("live=rtmp://a.example/live/{name} srt://b:9000?streamid={app}/{name}", FORWARD)
    spec = spec_for(forward, stream_key("live", "cam"))
    assert list(spec.targets) == ["rtmp://a.example/live/cam", "srt://b:9000?streamid=live/cam"]
    always, on_demand = parse_rules("cams/door=rtsp://10.0.0.5/h264;cams/*=rtsp://nvr/{name} ondemand=30", PULL)
    assert not always.spec.on_demand and on_demand.spec.on_demand and on_demand.spec.idle_seconds == 30
    assert spec_for(on_demand, stream_key("cams", "gate")).url == "rtsp://nvr/gate"
    for text, kind, says in (("live=ftp://x/y", FORWARD, "rtmp://"), ("live=300s", RECORD, "whole seconds"),
                             ("live=100000", RECORD, "segments last 1 to 86400"),
                             ("cams/*=rtsp://nvr/{name}", PULL, "a pattern pulls on demand only"),
                             ("cams=rtsp://nvr/x", PULL, "names APP/STREAM"),
                             ("cams/x=ftp://nvr/x", PULL, "a pull's source is"),
                             ("cams/x=rtsp://nvr/x always", PULL, "after the URL comes ondemand"),
                             ("live=rtmp://a.example/key-only", FORWARD, "names an application and a stream key")):
        with pytest.raises(JobError, match=says):
            parse_rules(text, kind)


def test_pulls_start_always_or_on_demand_outlive_their_stream_and_end_when_done() -> None:
    from castmesh.mesh.jobs import PULL

    rules = parse_rules("cams/door=rtsp://cam/door;od/*=rtmp://far/live/{name} ondemand", PULL)
    board = JobBoard(rules)
    (door,) = board.all()  # an always-on pull is a job from the start, waiting for a worker
    assert door.id == "pull:__defaultVhost__/cams/door" and door.state == Job.STATE_PENDING
    worker = board.join("w", 4, [])
    assert orders(worker) == [f"start {door.id}"]
    info = published(board, "cams", "door", holder="w/pull")
    board.unpublished(info)  # its stream ending (the source dropped) does not end the pull
    assert [j.id for j in board.all()] == [door.id]
    assert not board.demand(stream_key("live", "nobody"))  # no rule: a 404 for the viewer
    assert board.demand(stream_key("od", "x"))  # a rule: started for the viewer
    assert orders(worker) == ["start pull:__defaultVhost__/od/x"]
    assert board.demand(stream_key("od", "x")) and not orders(worker)  # once
    (od,) = [j for j in board.all() if j.id.endswith("/od/x")]
    done = Job()
    done.CopyFrom(od)
    done.state, done.detail = Job.STATE_DONE, "nobody watched for 10 s"
    board.report(worker, done)
    assert [j.id for j in board.all()] == [door.id] and not orders(worker)  # forgotten, no stop order needed


def test_a_workers_capacity_counts_ladders_and_many_more_light_jobs() -> None:
    from castmesh.mesh.jobs import RECORD
    from services.dispatch.jobs import LIGHT_PER_SLOT

    board = JobBoard(parse_rules("live=180p:x180:300k") + parse_rules("live", RECORD))
    worker = board.join("w", 1, [])
    for name in ("a", "b"):
        published(board, "live", name)
    started = orders(worker)
    # one ladder (its capacity), and both recordings: a recording copies, it does not encode
    assert sorted(started) == ["start abr:__defaultVhost__/live/a", "start record:__defaultVhost__/live/a",
                               "start record:__defaultVhost__/live/b"], started
    (waiting,) = [j for j in board.all() if j.worker == ""]
    assert waiting.id == "abr:__defaultVhost__/live/b" and waiting.detail == "no worker has room"
    assert board._room(worker, RECORD) and worker.capacity * LIGHT_PER_SLOT == 50
    worker.jobs.update(f"record:x/{n}" for n in range(48))  # 50 light jobs: full for them too
    assert not board._room(worker, RECORD)
