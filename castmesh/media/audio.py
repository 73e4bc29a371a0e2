"""Audio transcoding, once per stream: AAC (what RTMP publishers send) to Opus (what WebRTC carries), and
Opus to AAC (WHIP publishers, so the stream plays over FLV, HLS and RTMP too). PyAV (FFmpeg's decoders,
its AAC encoder and libopus) does the work; this module keeps the time: output timestamps follow the
input's milliseconds, counted in samples so they never drift, and re-anchored when the input jumps
(a new publish session or a gap).

Each call takes one coded frame and returns what the encoder has ready, with presentation times in ms.
The codecs keep only a frame or two of state, so a transcoder's memory does not grow with its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import av.error
from av.audio.codeccontext import AudioCodecContext

from castmesh.media.codecs import AudioConfig, CodecError

OPUS_RATE = 48_000
OPUS_BITRATE = 96_000  # stereo music at WebRTC's usual rate
AAC_BITRATE = 128_000
RESYNC_MS = 200  # an input timestamp this far from the samples' count re-anchors the output


@dataclass(slots=True, frozen=True)
class Coded:
    data: bytes
    presented_ms: int


class Transcoder:
    """One stream's audio from one codec to another."""

    def __init__(self, decoder: str, encoder: str, rate: int, bitrate: int, extradata: bytes | None = None,
                 options: dict[str, str] | None = None) -> None:
        self.decoder = cast(AudioCodecContext, av.CodecContext.create(decoder, "r"))
        if extradata:
            self.decoder.extradata = extradata
        self.encoder_name, self.rate, self.bitrate, self.options = encoder, rate, bitrate, options or {}
        self._open()
        self.anchor_ms: int | None = None  # the input time of sample 0
        self.frames = 0

    def _open(self) -> None:
        """A fresh encoder and resampler: at the start, and after a jump (the old ones are drained first)."""
        self.encoder = cast(AudioCodecContext, av.CodecContext.create(self.encoder_name, "w"))
        self.encoder.sample_rate = self.rate
        self.encoder.layout = "stereo"
        self.encoder.format = (self.encoder.codec.audio_formats or [av.AudioFormat("s16")])[0].name
        self.encoder.bit_rate = self.bitrate
        self.encoder.time_base = Fraction(1, self.rate)
        self.encoder.options = dict(self.options)
        self.encoder.open()
        self.resampler = av.AudioResampler(format=self.encoder.format.name, layout="stereo", rate=self.rate,
                                           frame_size=self.encoder.frame_size or None)
        self.samples = 0  # given to the encoder since the anchor
        self.priming: int | None = None  # samples the encoder's output starts before its input

    @property
    def extradata(self) -> bytes:
        """The encoder's configuration (AAC: the AudioSpecificConfig for an FLV sequence header)."""
        return bytes(self.encoder.extradata or b"")

    def push(self, data: bytes, timestamp_ms: int) -> list[Coded]:
        """One coded input frame at `timestamp_ms`; the output frames it completes."""
        try:
            decoded = self.decoder.decode(av.Packet(data))
        except (av.error.FFmpegError, ValueError) as exc:
            raise CodecError(f"{self.decoder.name} frame does not decode: {exc}") from exc
        out: list[Coded] = []
        expected = None if self.anchor_ms is None else self.anchor_ms + self.samples * 1000 // self.rate
        if expected is None or abs(timestamp_ms - expected) > RESYNC_MS:
            if self.anchor_ms is not None:  # what the old encoder holds belongs before the jump
                out += self._encode(self.resampler.resample(None))
                out += self._packets(None)
                self._open()
            self.anchor_ms = timestamp_ms
        for frame in decoded:
            out += self._encode(self.resampler.resample(frame))
        self.frames += len(out)
        return out

    def _encode(self, frames: list[av.AudioFrame]) -> list[Coded]:
        out: list[Coded] = []
        for frame in frames:
            frame.pts = self.samples
            self.samples += frame.samples
            out += self._packets(frame)
        return out

    def _packets(self, frame: av.AudioFrame | None) -> list[Coded]:
        out = []
        for packet in self.encoder.encode(frame):
            if self.priming is None:  # an encoder's first packets may start before 0 (AAC: 1024 samples)
                self.priming = -min(packet.pts or 0, 0)
            pts = (packet.pts or 0) + self.priming
            out.append(Coded(bytes(packet), (self.anchor_ms or 0) + pts * 1000 // self.rate))
        return out


def aac_to_opus(config: AudioConfig) -> Transcoder:
    """For WebRTC viewers of an RTMP publisher: 20 ms Opus frames, low delay."""
    return Transcoder("aac", "libopus", OPUS_RATE, OPUS_BITRATE, extradata=config.record,
                      options={"application": "lowdelay", "frame_duration": "20"})


def opus_to_aac() -> Transcoder:
    """For FLV, HLS and RTMP viewers of a WHIP publisher: AAC-LC at 48 kHz."""
    return Transcoder("libopus", "aac", OPUS_RATE, AAC_BITRATE)
