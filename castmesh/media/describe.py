"""A stream's MediaInfo (codecs, picture size, frame rate, bitrate) from what a GopCache holds: the
sequence headers name the codecs, onMetaData gives size and frame rate, and a RateMeter the bitrate."""

from __future__ import annotations

import time
from collections import deque

from castmesh.media.codecs import OPUS_HEAD, AudioConfig, CodecError, VideoConfig, read_audio, read_opus, read_video
from castmesh.media.gop import GopCache, metadata_values
from castmesh.proto.v1.media_pb2 import MediaInfo

VIDEO_NAMES = {"avc1": "H.264", "hvc1": "HEVC", "av01": "AV1", "vp09": "VP9"}
_FLV_VIDEO_CODECS = {2: "Sorenson H.263", 4: "VP6", 7: "H.264", 12: "HEVC"}
_FLV_AUDIO_CODECS = {2: "MP3", 10: "AAC", 11: "Speex", 7: "G.711 A-law", 8: "G.711 mu-law"}


class RateMeter:
    """Bytes per second over about the last `window` seconds, from one sample a second at most."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.total = 0
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])

    def add(self, size: int) -> None:
        self.total += size
        now = time.monotonic()
        if now - self.samples[-1][0] >= 1.0:
            self.samples.append((now, self.total))
            while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
                self.samples.popleft()

    def rate(self) -> float:
        start, base = self.samples[0]
        elapsed = time.monotonic() - start
        return (self.total - base) / elapsed if elapsed > 0.5 else 0.0


def describe(cache: GopCache, bytes_per_second: float) -> MediaInfo:
    info = MediaInfo(bitrate_kbps=round(bytes_per_second * 8 / 1000))
    if cache.video_config is not None:
        try:
            config = read_video(cache.video_config.payload)
        except CodecError:
            config = None
        if isinstance(config, VideoConfig):
            info.video_codec = VIDEO_NAMES.get(config.codec, config.codec)
    if cache.audio_config is not None:
        try:
            audio = read_audio(cache.audio_config.payload)
        except CodecError:
            audio = None
        if isinstance(audio, AudioConfig):
            info.audio_codec, info.audio_sample_rate, info.audio_channels = "AAC", audio.sample_rate, audio.channels
        elif read_opus(cache.audio_config.payload) is OPUS_HEAD:  # enhanced RTMP's Opus
            info.audio_codec = "Opus"
    meta = metadata_values(cache.metadata.payload) if cache.metadata is not None else None
    if meta:
        for field, key in (("width", "width"), ("height", "height")):
            value = meta.get(key)
            if isinstance(value, (int, float)) and 0 < value < 1 << 16:
                setattr(info, field, int(value))
        rate = meta.get("framerate")
        if isinstance(rate, (int, float)) and 0 < rate < 1000:
            info.frame_rate = float(rate)
        if not info.video_codec and cache.has_video:
            info.video_codec = _FLV_VIDEO_CODECS.get(_number(meta.get("videocodecid")), "")
        if not info.audio_codec and cache.has_audio:
            info.audio_codec = _FLV_AUDIO_CODECS.get(_number(meta.get("audiocodecid")), "")
    return info


def _number(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) else -1
