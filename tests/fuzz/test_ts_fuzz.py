"""MPEG-TS in, damaged (hypothesis): whatever arrives, the reader holds at most a partial packet, one PES
per track of at most MAX_PES, sections of at most MAX_SECTION and MAX_TRACKS tracks, and hands on
nothing but PES packets of the tracks its PMT named; TsFrames turns every damage into a count, never an
exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castmesh.media import mpegts
from castmesh.media.elementary import TsFrames
from castmesh.media.frames import AUDIO, audio_is_config
from castmesh.media.mpegts import MAX_SECTION, MAX_TRACKS, PACKET, TsReader, TsWriter
from tests.fuzz.damage import BASIC, damage
from tests.unit.test_hls_muxing import PPS, SPS


def clean_stream(opus: bool = False) -> bytes:
    """H.264 with AAC, or with Opus in ffmpeg's mapping (a control header before each packet)."""
    writer = TsWriter(has_video=True, has_audio=True, opus_channels=2 if opus else 0)
    out = [writer.tables()]
    for i in range(12):
        picture = (b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x00\x01" + PPS if i % 6 == 0 else b"") + \
            b"\x00\x00\x00\x01" + bytes((0x65 if i % 6 == 0 else 0x41,)) + bytes(range(256)) * (3 if i % 6 else 12)
        out.append(writer.video(picture, 3000 * i + 6000, 3000 * i, i % 6 == 0))
        audio = mpegts.opus_access_unit(b"\xfc" + bytes(300)) if opus else bytes.fromhex("fff15080021ffc") + bytes(9)
        out.append(writer.audio(audio, 3000 * i))
    return b"".join(out)


CLEAN = {False: clean_stream(), True: clean_stream(opus=True)}


@st.composite
def damaged(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = bytearray(CLEAN[draw(st.booleans())])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        damage(draw, data, draw(st.sampled_from(BASIC)), draw(st.integers(0, len(data) - 1)), max_insert=400)
    cuts = draw(st.lists(st.integers(1, 2000), min_size=1, max_size=30))
    return bytes(data), cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_damaged_transport_streams_stay_within_the_limits(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    frames = TsFrames()
    reader = frames.reader
    at, i = 0, 0
    while at < len(data):
        size = cuts[i % len(cuts)]
        frames.feed(data[at:at + size])
        at, i = at + size, i + 1
        assert len(reader.rest) < PACKET
        assert all(size <= mpegts.MAX_PES for size in reader.sizes.values())
        assert all(len(section) <= MAX_SECTION for section in reader.sections.values())
        assert len(reader.tracks) <= MAX_TRACKS and set(reader.building) <= set(reader.tracks)
        assert sum(kind in mpegts.AUDIO_KINDS for kind in reader.tracks.values()) <= 1


def test_both_clean_streams_read_whole() -> None:
    for opus, audio in ((False, "aac"), (True, "opus")):
        frames = TsFrames()
        packed = frames.feed(CLEAN[opus]) + frames.flush()
        assert frames.errors == 0 and audio in frames.reader.tracks.values()
        audio_frames = [payload for kind, _, payload in packed if kind == AUDIO and not audio_is_config(payload)]
        assert len(audio_frames) == 12, (audio, len(audio_frames))


def test_an_oversized_pes_is_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpegts, "MAX_PES", 20_000)
    writer = TsWriter(has_video=True, has_audio=False)
    big = writer.tables() + writer.video(b"\x00\x00\x00\x01\x65" + bytes(50_000), 0, 0, True)
    reader = TsReader()
    assert reader.feed(big) == [] and reader.errors == 1 and not reader.building
    small = writer.video(b"\x00\x00\x00\x01\x41" + bytes(100), 3000, 3000, False)
    assert len(reader.feed(small) + reader.flush()) == 1  # the next PES comes through
