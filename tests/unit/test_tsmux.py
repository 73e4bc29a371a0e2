"""A stream's MPEG-TS for SRT viewers (services.playback.formats.MpegTs over castmesh.media.tsmux): frames
of real streams (ffmpeg's H.264 with B-frames + AAC, HEVC + AAC, read back by TsFrames) made TS once per
flush, as a feed makes them, decode in ffmpeg without an error for a viewer there from the start, one
that joins mid-stream and one that skips ahead; their continuity counters never skip except where a
viewer skipped; tracks that change bring tables of a new version."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from castmesh.media.elementary import TsFrames
from castmesh.media.frames import AUDIO, VIDEO, make_frame
from castmesh.media.gop import GopCache
from castmesh.media.mpegts import AUDIO_PID, PACKET, VIDEO_PID, TsReader, TsWriter, lead_into
from castmesh.proto.v1.media_pb2 import Frame, StreamKey
from services.playback.formats import MpegTs
from tests.integration.harness import FFMPEG
from tests.unit.test_ts_frames import make_ts

FLUSH = 4  # frames per flush


def frames_of(tmp: Path, codec: str, seconds: int = 4) -> list[Frame]:
    reader = TsFrames()
    packed = reader.feed(make_ts(tmp, codec, seconds)) + reader.flush()
    return [make_frame(kind, ms, payload) for kind, ms, payload in packed]


def decode(tmp: Path, data: bytes) -> tuple[dict[int, int], str]:
    path = tmp / "viewer.ts"
    path.write_bytes(data)
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "framecrc", "-"],
                            capture_output=True, timeout=60, check=False)
    counts: dict[int, int] = {}
    for line in result.stdout.decode().splitlines():
        if line and not line.startswith("#"):
            index = int(line.split(",", 1)[0])
            counts[index] = counts.get(index, 0) + 1
    return counts, result.stderr.decode(errors="replace").strip()


def read(data: bytes) -> TsReader:
    assert data and len(data) % PACKET == 0
    reader = TsReader()
    reader.feed(data)
    reader.flush()
    return reader


def is_keyframe(frame: Frame) -> bool:
    return frame.kind == VIDEO and frame.keyframe and not frame.sequence_header


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_viewers_from_the_start_joining_and_skipping_decode_with_unbroken_counters(tmp_path: Path,
                                                                                    codec: str) -> None:
    frames = frames_of(tmp_path, codec)
    batches = [frames[i:i + FLUSH] for i in range(0, len(frames), FLUSH)]
    keyframe_batches = [n for n, batch in enumerate(batches) if any(is_keyframe(f) for f in batch)]
    join_after = keyframe_batches[1] + 2  # the late viewer's cache starts at the second keyframe
    skip_from, resume_at = keyframe_batches[1], keyframe_batches[2]  # the skipping viewer misses these
    fmt = MpegTs()
    cache = GopCache(StreamKey(app="live", name="x"))
    cache.add_all(batches[0])
    first = fmt.head(cache)
    late = skipping = b""
    skipping = first
    for n, batch in enumerate(batches[1:], start=1):
        cache.add_all(batch)  # as StreamFeed.flush: the cache first, then each format's bytes
        body = fmt.body(batch)
        first += body
        if late:
            late += body
        if n < skip_from or n > resume_at:
            skipping += body
        elif n == resume_at:
            start = next(i for i, f in enumerate(batch) if is_keyframe(f))
            rest = fmt.body(batch, start)
            assert rest and body.endswith(rest) and len(rest) < len(body)  # the same bytes, made once
            skipping += rest
        if n == join_after:
            late = fmt.head(cache)  # joins between flushes: the cache, then the next flush
    # x265's keyframes here are open-GOP CRAs, whose leading pictures refer to the GOP before: a decoder
    # that starts at one drops them, one that skips to it mid-stream (any protocol's skip) cannot decode them
    viewers = ((first, 110), (late, 45), (skipping, 70)) if codec == "h264" else ((first, 110), (late, 45))
    for viewer, least_video in viewers:
        counts, errors = decode(tmp_path, viewer)
        assert errors == "" and counts.get(0, 0) >= least_video and counts.get(1, 0) >= 80, (counts, errors)
    assert read(first).errors == 0 and read(late).errors == 0
    assert read(skipping).errors == 0  # its one jump is where a PES starts, as after any skip


def test_tracks_that_change_bring_tables_of_a_new_version(tmp_path: Path) -> None:
    h264, hevc = frames_of(tmp_path, "h264", 1), frames_of(tmp_path, "hevc", 1)
    fmt = MpegTs()
    cache = GopCache(StreamKey(app="live", name="x"))
    cache.add_all(h264[:2])
    data = fmt.head(cache) + fmt.body(h264[2:])
    assert fmt.muxer.version == 0
    data += fmt.body(hevc)  # a republish with another codec: its sequence headers come first
    assert fmt.muxer.version >= 1
    reader = TsReader()
    pes = reader.feed(data) + reader.flush()
    assert reader.tracks == {VIDEO_PID: "hevc", AUDIO_PID: "aac"} and reader.errors == 0
    assert {p.kind for p in pes} == {"h264", "hevc", "aac"}


def test_lead_into_renumbers_each_pid_to_end_right_before_the_next_counter() -> None:
    writer = TsWriter(True, True)
    data = writer.tables() + writer.video(b"\x00" * 1000, 0, 0, True) + writer.audio(b"\x01" * 300, 0)
    counters = {VIDEO_PID: 3, AUDIO_PID: 0}
    out = lead_into(data, counters)
    last: dict[int, int] = {}
    for at in range(0, len(out), PACKET):
        pid = ((out[at + 1] & 0x1F) << 8) | out[at + 2]
        cc = out[at + 3] & 0x0F
        if pid in last:
            assert cc == (last[pid] + 1) & 0x0F
        last[pid] = cc
        assert out[at:at + 3] == data[at:at + 3] and out[at + 4:at + PACKET] == data[at + 4:at + PACKET]
    assert last[VIDEO_PID] == 2 and last[AUDIO_PID] == 15 and last[0] == 15


def test_opus_in_ts_is_read_as_enhanced_rtmp_opus_and_written_back_for_players(tmp_path: Path) -> None:
    """SRT callers may send Opus (ffmpeg's mapping: private data registered as 'Opus', a control header
    before each packet): TsFrames makes enhanced RTMP's Opus frames of it, 20 ms apart, and an SRT viewer's
    TS carries them back in the same mapping, which ffmpeg decodes with the video, without an error."""
    source = tmp_path / "opus.ts"
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=160x120:rate=30:duration=3", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=48000:duration=3", "-c:v", "libx264", "-preset", "veryfast",
                    "-g", "30", "-pix_fmt", "yuv420p", "-c:a", "libopus", "-b:a", "64k", "-ac", "2", "-f", "mpegts",
                    str(source)], check=True, timeout=60)
    reader = TsFrames()
    packed = reader.feed(source.read_bytes()) + reader.flush()
    opus = [(ms, payload) for kind, ms, payload in packed if kind == AUDIO]
    assert opus[0][1].startswith(b"\x90OpusOpusHead\x01\x02") and reader.errors == 0
    steps = {b[0] - a[0] for a, b in itertools.pairwise(opus[1:])}
    assert len(opus) >= 140 and steps <= {19, 20, 21}, (len(opus), steps)
    frames = [make_frame(kind, ms, payload) for kind, ms, payload in packed]
    fmt = MpegTs()
    cache = GopCache(StreamKey(app="live", name="x"))
    cache.add_all(frames[:FLUSH])
    data = fmt.head(cache) + b"".join(fmt.body(frames[i:i + FLUSH]) for i in range(FLUSH, len(frames), FLUSH))
    assert read(data).tracks == {VIDEO_PID: "h264", AUDIO_PID: "opus"} and read(data).errors == 0
    counts, errors = decode(tmp_path, data)
    assert errors == "" and counts.get(0, 0) >= 85 and counts.get(1, 0) >= 140, (counts, errors)
