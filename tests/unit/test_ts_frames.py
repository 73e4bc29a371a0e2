"""MPEG-TS in (castmesh.media.mpegts.TsReader, castmesh.media.elementary.TsFrames): transport streams
made by ffmpeg (H.264 with B-frames + AAC, HEVC + AAC) fed in pieces of every size become the frames an
RTMP publisher would send, which ffmpeg decodes as FLV without an error; the 33-bit clock is unwrapped;
lost packets and garbage cost only the PES they hit."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from castmesh.media import flv
from castmesh.media.codecs import aac_config, adts_header
from castmesh.media.elementary import TsFrames, nal_units
from castmesh.media.frames import AUDIO, DATA, VIDEO, make_frame
from castmesh.media.mpegts import PACKET, TS_WRAP, TsReader, TsWriter
from tests.integration.harness import FFMPEG


def make_ts(tmp: Path, codec: str, seconds: int = 2) -> bytes:
    out = tmp / f"{codec}.ts"
    video = (["-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-g", "30"] if codec == "h264" else
             ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error:keyint=30"])
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=160x120:rate=30:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=frequency=440:sample_rate=48000:duration={seconds}", *video, "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-b:a", "64k", "-f", "mpegts", str(out)], check=True, timeout=60)
    return out.read_bytes()


def decode_flv(tmp: Path, packed: list[tuple[int, int, bytes]]) -> tuple[int, int, str]:
    """(video frames, audio frames, ffmpeg's complaints) of the frames written as an FLV file."""
    path = tmp / "out.flv"
    frames = [make_frame(kind, ms, payload) for kind, ms, payload in packed]
    path.write_bytes(flv.file_header(True, True) + flv.tags(frames))
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "framecrc", "-"],
                            capture_output=True, timeout=60, check=False)
    lines = result.stdout.decode().splitlines()
    return (sum(line.startswith("0,") for line in lines), sum(line.startswith("1,") for line in lines),
            result.stderr.decode(errors="replace"))


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_ffmpeg_transport_streams_become_frames_ffmpeg_decodes(codec: str, tmp_path: Path) -> None:
    ts = make_ts(tmp_path, codec)
    frames = TsFrames()
    packed: list[tuple[int, int, bytes]] = []
    rng, at = random.Random(7), 0
    while at < len(ts):  # pieces of every size, as a network delivers them
        size = rng.choice((1, 187, 188, 1316, 5000))
        packed += frames.feed(ts[at:at + size])
        at += size
    packed += frames.flush()
    assert frames.errors == 0 and frames.reader.resyncs == 0
    kinds = [kind for kind, _, _ in packed]
    assert (kinds[0] == DATA and kinds.index(VIDEO) < kinds.index(AUDIO)) or kinds[0] == AUDIO
    pictures = [(ms, payload) for kind, ms, payload in packed if kind == VIDEO]
    config = pictures[0][1]
    assert config[:5] == (b"\x17\x00\x00\x00\x00" if codec == "h264" else b"\x90hvc1")
    times = [ms for ms, _ in pictures[1:]]
    assert times == sorted(times) and times[0] == 0 and 1900 <= times[-1] <= 2000
    video, audio, complaints = decode_flv(tmp_path, packed)
    assert complaints == "" and video == 60 and audio >= 90, (video, audio, complaints)


def test_the_33_bit_clock_is_unwrapped() -> None:
    writer = TsWriter(has_video=False, has_audio=True)
    frames = TsFrames()
    raw = b"\x21\x10\x04"  # what the bytes are does not matter here, only where they go
    adts = adts_header(aac_config(bytes((0x11, 0x90))), len(raw)) + raw  # AAC-LC, 48 kHz, stereo
    start = TS_WRAP - 90 * 50  # 50 ms before the wrap
    seen: list[int] = []
    for i in range(6):
        data = (writer.tables() if i == 0 else b"") + writer.audio(adts, (start + i * 90 * 21) % TS_WRAP)
        seen += [ms for kind, ms, payload in frames.feed(data) if kind == AUDIO and payload[1] == 1]
    seen += [ms for kind, ms, payload in frames.flush() if kind == AUDIO and payload[1] == 1]
    assert seen == [0, 21, 42, 63, 84, 105], seen


def test_loss_and_garbage_cost_only_what_they_hit(tmp_path: Path) -> None:
    ts = make_ts(tmp_path, "h264")
    packets = [ts[i:i + PACKET] for i in range(0, len(ts), PACKET)]
    rng = random.Random(3)
    damaged = bytearray()
    for i, packet in enumerate(packets):
        if i > 50 and rng.random() < 0.01:
            continue  # a lost packet
        if i > 50 and rng.random() < 0.01:
            damaged += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))  # garbage between packets
        damaged += packet
    reader = TsReader()
    pes = reader.feed(bytes(damaged)) + reader.flush()
    clean = TsReader()
    whole = clean.feed(ts) + clean.flush()
    assert reader.errors > 0 and reader.resyncs > 0
    assert len(whole) - len(pes) <= 2 * reader.errors + 5  # each loss or garbage run costs a PES or so
    assert all(nal_units(p.data) for p in pes if p.kind == "h264")
    assert len(reader.rest) < PACKET
