"""A stream's MediaInfo (codecs, picture size, frame rate, bitrate) from what a GopCache holds: the
sequence headers name the codecs (also as RFC 6381 strings, for HLS's CODECS), onMetaData gives the size,
a PictureRate the frame rate (onMetaData's until it can tell: a rendition whose pictures were thinned
keeps its source's framerate there), and a RateMeter the bitrate."""

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


def describe(cache: GopCache, bytes_per_second: float, measured_frame_rate: float = 0.0) -> MediaInfo:
    info = MediaInfo(bitrate_kbps=round(bytes_per_second * 8 / 1000))
    codecs: list[str] = []
    if cache.video_config is not None:
        try:
            config = read_video(cache.video_config.payload)
        except CodecError:
            config = None
        if isinstance(config, VideoConfig):
            info.video_codec = VIDEO_NAMES.get(config.codec, config.codec)
            codecs.append(video_rfc6381(config))
    if cache.audio_config is not None:
        try:
            audio = read_audio(cache.audio_config.payload)
        except CodecError:
            audio = None
        if isinstance(audio, AudioConfig):
            info.audio_codec, info.audio_sample_rate, info.audio_channels = "AAC", audio.sample_rate, audio.channels
            codecs.append(f"mp4a.40.{audio.object_type}")
        elif read_opus(cache.audio_config.payload) is OPUS_HEAD:  # enhanced RTMP's Opus
            info.audio_codec = "Opus"
            codecs.append("opus")
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
    if measured_frame_rate:
        info.frame_rate = measured_frame_rate
    info.codecs = ",".join(c for c in codecs if c)
    return info


class PictureRate:
    """Pictures per second by their timestamps (not by when they came: batches arrive in bursts), over the
    last `window` video frames."""

    def __init__(self, window: int = 90) -> None:
        self.times: deque[int] = deque(maxlen=window)

    def add(self, timestamp: int) -> None:
        if self.times and not 0 < timestamp - self.times[-1] < 10_000:
            self.times.clear()  # a new timeline (or a jump): measure it afresh
        self.times.append(timestamp)

    def rate(self) -> float:
        """The frame rate (frame_rate's choice of the measured one); 0 before there are 10 pictures."""
        times = self.times
        if len(times) < 10 or times[-1] == times[0]:
            return 0.0
        span = times[-1] - times[0]
        return frame_rate((len(times) - 1) * 1000 / span, ntsc=span >= NTSC_SPAN_MS)


COMMON_RATES = (10.0, 12.0, 12.5, 15.0, 20.0, 24.0, 25.0, 30.0, 48.0, 50.0, 60.0, 120.0)
NTSC_RATES = (23.976, 29.97, 59.94)
NTSC_SPAN_MS = 2000


def frame_rate(pictures_per_second: float, ntsc: bool = True) -> float:
    """A measured picture rate as a stream's frame rate: an NTSC rate when it is that close and `ntsc` (the
    measure spans NTSC_SPAN_MS: millisecond timestamps then tell 29.97 from 30, 0.1% apart, to within
    0.05%), else the common rate within 2% of it, else itself."""
    if pictures_per_second <= 0:
        return 0.0
    for rate in NTSC_RATES if ntsc else ():
        if abs(pictures_per_second - rate) <= 0.0003 * rate:
            return rate
    near = min(COMMON_RATES, key=lambda rate: abs(rate - pictures_per_second))
    return near if abs(near - pictures_per_second) <= 0.02 * near else round(pictures_per_second, 3)


def video_rfc6381(config: VideoConfig) -> str:
    """The codecs parameter of RFC 6381 (ISO 14496-15 annex E) for H.264 and HEVC; "" for others."""
    record = config.record
    if config.codec == "avc1" and len(record) >= 4:
        return f"avc1.{record[1]:02x}{record[2]:02x}{record[3]:02x}"
    if config.codec == "hvc1" and len(record) >= 13:
        space = "" if not record[1] >> 6 else "ABC"[(record[1] >> 6) - 1]
        compat = int.from_bytes(record[2:6], "big")
        reversed_compat = int(f"{compat:032b}"[::-1], 2)
        tier = "H" if record[1] & 0x20 else "L"
        constraints = record[6:12].rstrip(b"\x00")
        text = f"hvc1.{space}{record[1] & 0x1F}.{reversed_compat:x}.{tier}{record[12]}"
        return text + "".join(f".{b:x}" for b in constraints)
    return ""


def _number(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) else -1
