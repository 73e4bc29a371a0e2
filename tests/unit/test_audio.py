"""The once-per-stream audio transcoders (PyAV): AAC to Opus for WebRTC viewers, Opus to AAC for WHIP
publishers; their output's timing, and what they do with input that is not what it says."""

from __future__ import annotations

import itertools
import math
import struct

import av
import pytest

from castmesh.media.audio import aac_to_opus, opus_to_aac
from castmesh.media.codecs import CodecError, aac_config


def aac_tone(seconds: float, rate: int = 44100, start_ms: int = 0) -> tuple[bytes, list[tuple[bytes, int]]]:
    """A 440 Hz tone as raw AAC frames with their timestamps (ms), and the AudioSpecificConfig."""
    encoder = av.CodecContext.create("aac", "w")
    encoder.sample_rate, encoder.layout, encoder.format, encoder.bit_rate = rate, "stereo", "fltp", 128_000
    encoder.open()
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
    frames = []
    for i in range(int(seconds * rate / 1024)):
        pcm = b"".join(struct.pack("<hh", v, v) for v in (
            int(8000 * math.sin(2 * math.pi * 440 * (n + i * 1024) / rate)) for n in range(1024)))
        frame = av.AudioFrame(format="s16", layout="stereo", samples=1024)
        frame.planes[0].update(pcm)
        frame.sample_rate, frame.pts = rate, i * 1024
        for ready in resampler.resample(frame):
            frames += [(bytes(p), start_ms + max(0, p.pts) * 1000 // rate) for p in encoder.encode(ready)]
    return bytes(encoder.extradata), frames


def test_aac_becomes_20ms_opus_frames_on_the_inputs_clock() -> None:
    config, frames = aac_tone(2.0, start_ms=5000)
    transcoder = aac_to_opus(aac_config(config))
    out = [coded for data, ts in frames for coded in transcoder.push(data, ts)]
    steps = {b.presented_ms - a.presented_ms for a, b in itertools.pairwise(out)}
    assert steps == {20} and abs(out[0].presented_ms - 5000) <= 25
    assert len(out) >= 95  # about 2 s, less what the encoders hold back
    decoder = av.CodecContext.create("libopus", "r")
    samples = sum(f.samples for coded in out for f in decoder.decode(av.Packet(coded.data)))
    assert samples == len(out) * 960  # 20 ms at 48 kHz each: real Opus


def test_a_jump_in_the_input_re_anchors_the_output() -> None:
    config, frames = aac_tone(1.0)
    transcoder = aac_to_opus(aac_config(config))
    before = [c for data, ts in frames for c in transcoder.push(data, ts)]
    after = [c for data, ts in frames for c in transcoder.push(data, ts + 60_000)]  # a new session, a minute on
    drained = [c for c in after if c.presented_ms < 60_000]  # what the old encoder held: before the jump
    new = after[len(drained):]
    assert [c.presented_ms for c in drained] == [before[-1].presented_ms + 20 * (i + 1) for i in range(len(drained))]
    assert 60_000 <= new[0].presented_ms <= 60_050 and all(c.presented_ms >= 60_000 for c in new)
    assert {b.presented_ms - a.presented_ms for a, b in itertools.pairwise(new)} == {20}


def test_opus_becomes_aac_with_a_configuration_flv_can_carry() -> None:
    config, frames = aac_tone(1.5)
    to_opus = aac_to_opus(aac_config(config))
    opus = [c for data, ts in frames for c in to_opus.push(data, ts)]
    back = opus_to_aac()
    aac = [c for coded in opus for c in back.push(coded.data, coded.presented_ms)]
    parsed = aac_config(back.extradata)
    assert (parsed.sample_rate, parsed.channels, parsed.object_type) == (48000, 2, 2)
    assert len(aac) >= 60 and aac[0].presented_ms >= 0
    assert all(b.presented_ms > a.presented_ms for a, b in itertools.pairwise(aac))


def test_garbage_is_a_codec_error_and_the_transcoder_goes_on() -> None:
    config, frames = aac_tone(0.5)
    transcoder = aac_to_opus(aac_config(config))
    with pytest.raises(CodecError):
        for _ in range(20):  # a decoder may buffer one bad frame before it says so
            transcoder.push(b"\xff" * 300, 0)
    out = [c for data, ts in frames for c in transcoder.push(data, ts)]
    assert len(out) >= 15
