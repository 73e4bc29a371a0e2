"""Bounded fuzzing of the HLS segmenter: tag bodies damaged any way (real configuration records and
frames as seeds) are dropped or muxed, never an exception, and segments stay whole TS packets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.media.frames import AUDIO, VIDEO, make_frame
from castmesh.media.hls import Segmenter
from tests.fuzz.damage import BASIC, damage
from tests.unit.test_hls_muxing import config_frames, stream

SEEDS = [(f.kind, f.payload) for f in config_frames() + stream(1.0, gop_ms=200)]


@st.composite
def damaged_frames(draw: st.DrawFn) -> list[tuple[int, int, bytes]]:
    frames = []
    for index in range(draw(st.integers(1, 60))):
        kind, payload = SEEDS[draw(st.integers(0, len(SEEDS) - 1))]
        data = bytearray(payload)
        for _ in range(draw(st.integers(0, 3))):
            if not data:
                break
            pos = draw(st.integers(0, len(data) - 1))
            if not damage(draw, data, draw(st.sampled_from([*BASIC, "enhanced"])), pos):
                data[0:1] = bytes((0x80 | draw(st.integers(0, 0x7F)),)) + draw(st.sampled_from(
                    [b"hvc1", b"av01", b"avc1", b"vp09", b"xxxx"]))
        frames.append((kind, index * draw(st.integers(0, 400)), bytes(data)))
    return frames


@settings(max_examples=200, deadline=None)
@given(damaged_frames(), st.sampled_from(["auto", "fmp4"]), st.integers(100, 2000))
def test_damaged_frames_never_break_the_segmenter(frames: list[tuple[int, int, bytes]], container: str,
                                                   target_ms: int) -> None:
    seg = Segmenter(container, target_ms=target_ms, window=3, keep=1)
    for kind, ts, payload in frames:
        assert kind in (AUDIO, VIDEO)
        seg.push([make_frame(kind, ts, payload)])
    for segment in seg.segments:
        if segment.extension == "ts":
            assert len(segment.data) % 188 == 0
        assert segment.duration > 0
    seg.playlist("x/")
