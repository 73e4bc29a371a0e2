"""Recording's parts without a cluster: the segmenter handing over parts as they are made, fragmented MP4
read back (whole fragments only, limits on what a file may claim), retention by age and by size, the disk
thread's bound and its errors."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.media import fmp4
from castmesh.media.frames import VIDEO, make_frame
from castmesh.media.hls import Segmenter
from services.worker.record import NAME_FORMAT, DiskWriter, Recordings, RecordSettings, file_start

SPS = bytes.fromhex("6764000aacd9434f8de1000003000100000300320f1c3258")
PPS = bytes.fromhex("68ebecb22c")


def video_frames(seconds: int, fps: int = 30, gop: int = 30) -> list:  # type: ignore[type-arg]
    """An AVC sequence header and `seconds` of frames (payloads are made up, the framing is real)."""
    record = bytes((1, 0x64, 0, 0x0A, 0xFF, 0xE1)) + struct.pack(">H", len(SPS)) + SPS + b"\x01" + \
        struct.pack(">H", len(PPS)) + PPS
    out = [make_frame(VIDEO, 0, b"\x17\x00\x00\x00\x00" + record)]
    for i in range(seconds * fps):
        key = i % gop == 0
        nal = struct.pack(">I", 20) + (b"\x65" if key else b"\x41") + bytes(19)
        out.append(make_frame(VIDEO, i * 1000 // fps, bytes((0x17 if key else 0x27, 1, 0, 0, 0)) + nal))
    return out


def recorded_file(seconds: int = 5) -> bytes:
    """A file as a recorder writes it: init, then each part as it is taken, then the rest at the end."""
    segmenter = Segmenter("fmp4", 60_000, window=1, keep=0, part_ms=1000, max_segment_bytes=1 << 40)
    segmenter.has_audio = False
    data = bytearray()
    for frame in video_frames(seconds):
        segmenter.push([frame])
        if segmenter.open is not None and not data:
            data += segmenter.inits[segmenter.open.init]
        for part in segmenter.take_parts():
            data += part
    last = segmenter.finish()
    assert last is not None
    return bytes(data + last.data)


def index_of(data: bytes) -> fmp4.Index:
    return fmp4.read_index(lambda at, n: data[at:at + n], len(data))


def test_a_recorded_file_reads_back_as_whole_fragments_covering_its_time() -> None:
    data = recorded_file(5)
    index = index_of(data)
    assert index.timescale == fmp4.VIDEO_TIMESCALE and index.complete == len(data)
    assert len(index.fragments) == 5 and all(f.independent for f in index.fragments)  # 1 s parts, 1 s GOPs
    assert abs(sum(f.duration for f in index.fragments) - 5 * 90_000) <= 90  # (ms timestamps: 33, 33, 34 ms)
    for before, after in zip(index.fragments, index.fragments[1:], strict=False):
        assert after.start == before.start + before.duration and after.offset == before.offset + before.size


def test_a_file_cut_mid_fragment_lists_only_its_whole_fragments() -> None:
    data = recorded_file(5)
    whole = index_of(data)
    cut = data[:whole.fragments[3].offset + 100]  # a writer killed while writing the fourth fragment
    index = index_of(cut)
    assert len(index.fragments) == 3 and index.complete == whole.fragments[3].offset


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000), st.integers(min_value=0, max_value=3000))
def test_garbage_and_damage_raise_mp4error_or_read_within_the_file(noise: bytes, at: int) -> None:
    data = bytearray(recorded_file(2))
    data[at:at + len(noise)] = noise
    try:
        index = index_of(bytes(data))
    except fmp4.Mp4Error:
        return
    assert index.complete <= len(data) and all(f.offset + f.size <= len(data) for f in index.fragments)


def test_limits_on_what_a_file_may_claim() -> None:
    data = recorded_file(2)
    init = index_of(data).init_size
    huge_moof = data[:init] + struct.pack(">I4s", fmp4.MAX_MOOF + 1, b"moof") + bytes(64)
    with pytest.raises(fmp4.Mp4Error, match="over"):
        index_of(huge_moof)
    with pytest.raises(fmp4.Mp4Error, match="no moov"):
        index_of(b"\x00\x00\x00\x10ftypiso6\x00\x00\x00\x00")
    with pytest.raises(fmp4.Mp4Error, match="size 0"):
        index_of(struct.pack(">I4s", 0, b"moov"))


def test_shift_times_moves_every_track_by_its_own_timescale() -> None:
    data = recorded_file(2)
    fragment = index_of(data).fragments[1]
    moof_size = struct.unpack_from(">I", data, fragment.offset)[0]
    moved = fmp4.shift_times(data[fragment.offset:fragment.offset + moof_size], {1: 9000})
    start = index_of(data[:fragment.offset] + moved + data[fragment.offset + moof_size:]).fragments[1].start
    assert start == fragment.start + 9000


def named(root: Path, age: float, size: int, now: float, stream: str = "cam") -> Path:
    path = root / "live" / stream / (time.strftime(NAME_FORMAT.replace("%f", "000000"), time.gmtime(now - age))
                                      + ".mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(size))
    return path


def test_retention_removes_what_is_past_its_age_then_the_oldest_over_the_size(tmp_path: Path) -> None:
    now = time.time()
    old = named(tmp_path, 7200, 100, now)
    older_elsewhere = named(tmp_path, 3000, 1000, now, "other")
    middle = named(tmp_path, 2000, 1000, now)
    young = named(tmp_path, 100, 1000, now)
    writing = named(tmp_path, 50, 5000, now)
    assert file_start(young) == pytest.approx(now - 100, abs=1)
    recordings = Recordings(RecordSettings(tmp_path, max_age=3600, max_bytes=7500), "w")
    recordings.writing.add(writing)
    removed = recordings.sweep(now)
    # the old one by age; then 8000 - 100 = 7900 bytes > 7500: the oldest that may go, the other stream's
    assert removed == [old, older_elsewhere]
    assert middle.exists() and young.exists() and writing.exists()
    recordings.settings = RecordSettings(tmp_path, max_bytes=1000)
    assert recordings.sweep(now) == [middle, young] and writing.exists()  # never a file being written
    assert not (tmp_path / "live" / "other").exists()  # an emptied stream's directory goes too


def test_the_disk_thread_is_bounded_and_says_which_file_failed(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, bool, list[tuple[Path, str]], list[str]]:
        failed: list[tuple[Path, str]] = []
        finished: list[str] = []
        writer = DiskWriter(lambda path, exc: failed.append((path, exc.strerror or "")), max_pending=1000)
        accepted = writer.write(tmp_path / "a" / "one.mp4", bytes(600))
        refused = writer.write(tmp_path / "a" / "two.mp4", bytes(600))  # (the first may not be written yet)
        (tmp_path / "blocked").write_bytes(b"")  # a file where a directory should be: the write fails
        writer.write(tmp_path / "blocked" / "three.mp4", b"x")
        writer.finish(tmp_path / "blocked" / "three.mp4", lambda path, why: finished.append(why))
        await asyncio.sleep(0.3)
        await writer.close()
        return accepted, refused, failed, finished

    accepted, refused, failed, finished = asyncio.run(scenario())
    assert accepted and (tmp_path / "a" / "one.mp4").stat().st_size == 600
    if not refused:  # refused while the first was waiting: nothing of it written
        assert not (tmp_path / "a" / "two.mp4").exists()
    assert failed and failed[0][0].name == "three.mp4" and finished and finished[0].startswith("EEXIST"), \
        (failed, finished)
    assert os.listdir(tmp_path / "a")[0] == "one.mp4"

