"""HLS segmenting: frames in, a sliding window of in-memory segments and the media playlist out. No IO.

Segments are cut on video keyframes once the open segment has lasted the target duration (audio-only
streams: on any audio frame), so every segment starts with something a decoder can start from. A
discontinuity (a republish, an upstream failover, a change of codec configuration) closes the open
segment at the next starting point and tags the new one EXT-X-DISCONTINUITY; a configuration change also
starts a new initialization segment for fMP4.

Containers: MPEG-TS for H.264 and AAC, fMP4 for those and for HEVC, AV1 and VP9. "auto" picks TS when it
can carry the stream's video, as SRS and nginx-rtmp serve it, and fMP4 otherwise.

Limits: the window holds `window` segments in the playlist and `keep` more for clients that fetched an
older playlist; an open segment that grows past MAX_SEGMENT_BYTES (its next keyframe never came) is
dropped, and the next one starts at the next keyframe with a discontinuity.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from castmesh.media import fmp4, mpegts
from castmesh.media.codecs import (
    AudioConfig,
    CodecError,
    VideoConfig,
    VideoSample,
    adts_header,
    annex_b,
    nal_units,
    read_audio,
    read_video,
)
from castmesh.media.frames import AUDIO, DATA, VIDEO, is_metadata
from castmesh.media.gop import metadata_values
from castmesh.proto.v1.media_pb2 import Frame

CONTAINERS = ("auto", "ts", "fmp4")
MAX_SEGMENT_BYTES = 64 << 20
NAL_CODECS = ("avc1", "hvc1")


class HlsError(ValueError):
    """A stream that the requested container cannot carry."""


@dataclass(slots=True)
class Segment:
    sequence: int
    duration: float  # seconds
    data: bytes
    discontinuity: bool
    init: int  # which initialization segment it needs (fMP4)
    started_at: float  # wall clock, for EXT-X-PROGRAM-DATE-TIME
    extension: str  # ts or m4s


class _Container(Protocol):
    extension: str
    video_config: VideoConfig | None  # the tracks it carries
    audio_config: AudioConfig | None

    @property
    def init(self) -> bytes | None: ...

    def video(self, timestamp: int, sample: VideoSample) -> None: ...
    def audio(self, timestamp: int, frame: bytes) -> None: ...
    def close(self, sequence: int, end_timestamp: int) -> bytes: ...


class _Ts:
    extension = "ts"
    init = None

    def __init__(self, video: VideoConfig | None, audio: AudioConfig | None, writer: mpegts.TsWriter) -> None:
        self.video_config = video
        self.audio_config = audio
        self.writer = writer
        self.parts = [writer.tables()]

    def video(self, timestamp: int, sample: VideoSample) -> None:
        assert self.video_config is not None
        dts = timestamp * 90
        self.parts.append(self.writer.video(annex_b(sample, self.video_config), dts + sample.composition_ms * 90,
                                            dts, sample.keyframe))

    def audio(self, timestamp: int, frame: bytes) -> None:
        assert self.audio_config is not None
        self.parts.append(self.writer.audio(adts_header(self.audio_config, len(frame)) + frame, timestamp * 90))

    def close(self, sequence: int, end_timestamp: int) -> bytes:
        return b"".join(self.parts)


class _Fmp4:
    extension = "m4s"

    def __init__(self, video: VideoConfig | None, audio: AudioConfig | None, init: bytes) -> None:
        self.video_config = video
        self.audio_config = audio
        self.init = init
        self.nal_length_size = video.nal_length_size if video is not None and video.codec in NAL_CODECS else 0
        self.video_samples: list[tuple[int, VideoSample]] = []
        self.audio_frames: list[bytes] = []
        self.audio_start = 0

    def video(self, timestamp: int, sample: VideoSample) -> None:
        if self.nal_length_size:
            nal_units(sample.data, self.nal_length_size)  # a sample that does not parse goes no further
        self.video_samples.append((timestamp, sample))

    def audio(self, timestamp: int, frame: bytes) -> None:
        if not self.audio_frames:
            self.audio_start = timestamp
        self.audio_frames.append(frame)

    def close(self, sequence: int, end_timestamp: int) -> bytes:
        runs = []
        if self.video_samples:
            samples = self.video_samples
            ends = [ts for ts, _ in samples[1:]] + [max(end_timestamp, samples[-1][0] + 1)]
            runs.append(fmp4.TrackRun(fmp4.VIDEO_TRACK, samples[0][0] * 90, [
                fmp4.Sample(max(end - ts, 1) * 90, s.data, s.keyframe, s.composition_ms * 90)
                for (ts, s), end in zip(samples, ends, strict=True)]))
        if self.audio_frames and self.audio_config is not None:
            rate = self.audio_config.sample_rate
            runs.append(fmp4.TrackRun(fmp4.AUDIO_TRACK, self.audio_start * rate // 1000,
                                      [fmp4.Sample(fmp4.AAC_FRAME_SAMPLES, f) for f in self.audio_frames]))
        return fmp4.media_segment(sequence, runs)


@dataclass(slots=True)
class _Open:
    sequence: int
    start: int  # ms
    container: _Container
    discontinuity: bool
    init: int
    started_at: float
    size: int = 0


@dataclass
class Segmenter:
    container: str = "auto"
    target_ms: int = 2000
    window: int = 6
    keep: int = 3
    has_video: bool = True
    has_audio: bool = True
    segments: deque[Segment] = field(default_factory=deque)
    inits: dict[int, bytes] = field(default_factory=dict)
    target_duration: int = 0
    dropped_frames: int = 0
    removed_discontinuities: int = 0

    def __post_init__(self) -> None:
        if self.container not in CONTAINERS:
            raise HlsError(f"unknown HLS container {self.container!r}")
        self.video_config: VideoConfig | None = None
        self.audio_config: AudioConfig | None = None
        self.width = self.height = 0
        self.open: _Open | None = None
        self.next_sequence = 0
        self.init_version = 0
        self.config_changed = False
        self.discontinuity = False
        self.ts_writer: mpegts.TsWriter | None = None
        self.target_duration = max(1, math.ceil(self.target_ms / 1000))

    # Input ----------------------------------------------------------------------------------------------

    def mark_discontinuity(self) -> None:
        """What follows does not continue what came before (a republish or a new upstream)."""
        self.discontinuity = True

    def push(self, frames: list[Frame]) -> list[Segment]:
        """Take frames; the segments that they completed."""
        done: list[Segment] = []
        for frame in frames:
            try:
                self._push(frame, done)
            except CodecError:
                self.dropped_frames += 1
        return done

    def _push(self, frame: Frame, done: list[Segment]) -> None:
        kind, ts = frame.kind, frame.timestamp
        if kind == DATA:
            if is_metadata(frame.payload):
                meta = metadata_values(frame.payload) or {}
                width, height = meta.get("width"), meta.get("height")
                if isinstance(width, (int, float)) and isinstance(height, (int, float)):
                    self.width, self.height = int(width) & 0xFFFF, int(height) & 0xFFFF
            return
        if kind == VIDEO:
            item = read_video(frame.payload)
            if isinstance(item, VideoConfig):
                if item != self.video_config:
                    self.config_changed = self.video_config is not None or self.open is not None
                    self.video_config = item
                return
            if item is None or self.video_config is None:
                return
            if item.keyframe:
                self._maybe_cut(ts, done)
            if self.open is not None and self.open.container.video_config is not None:
                self.open.container.video(ts, item)
                self._grew(len(item.data))
            return
        if kind == AUDIO:
            audio = read_audio(frame.payload)
            if isinstance(audio, AudioConfig):
                if audio != self.audio_config:
                    # a new track (audio that started late) also needs new tables or a new init segment
                    self.config_changed = self.audio_config is not None or self.open is not None
                    self.audio_config = audio
                return
            if audio is None or self.audio_config is None:
                return
            if not self.has_video:
                self._maybe_cut(ts, done)
            if self.open is not None and self.open.container.audio_config is not None:
                self.open.container.audio(ts, audio)
                self._grew(len(audio))

    def _grew(self, size: int) -> None:
        assert self.open is not None
        self.open.size += size
        if self.open.size > MAX_SEGMENT_BYTES:
            self.open = None
            self.discontinuity = True

    def _maybe_cut(self, ts: int, done: list[Segment]) -> None:
        """At a point a segment may start: close the open one if it is long enough, or must end."""
        current = self.open
        if current is not None:
            if not (ts - current.start >= self.target_ms or self.discontinuity or self.config_changed):
                return
            done.append(self._close(current, ts))
        self._start(ts)

    def _close(self, current: _Open, end: int) -> Segment:
        duration = max(end - current.start, 1) / 1000
        self.target_duration = max(self.target_duration, math.ceil(duration))
        segment = Segment(current.sequence, duration, current.container.close(current.sequence, end),
                          current.discontinuity, current.init, current.started_at, current.container.extension)
        self.segments.append(segment)
        while len(self.segments) > self.window + self.keep:
            if self.segments.popleft().discontinuity:
                self.removed_discontinuities += 1
        self.open = None
        return segment

    def _start(self, ts: int) -> None:
        discontinuity = (self.discontinuity or self.config_changed) and self.next_sequence > 0
        if self.config_changed or self.init_version == 0:
            self.init_version += 1
            self.ts_writer = None
        self.discontinuity = self.config_changed = False
        container = self._container()
        if container.init is not None:
            self.inits[self.init_version] = container.init
            for version in [v for v in self.inits if v < self.init_version and not self._needs(v)]:
                del self.inits[version]
        self.open = _Open(self.next_sequence, ts, container, discontinuity, self.init_version, time.time())
        self.next_sequence += 1

    def _needs(self, version: int) -> bool:
        return any(s.init == version for s in self.segments)

    def _container(self) -> _Container:
        video = self.video_config if self.has_video else None
        audio = self.audio_config if self.has_audio else None
        if self.resolved() == "ts":
            if self.ts_writer is None:
                self.ts_writer = mpegts.TsWriter(video is not None, audio is not None)
            return _Ts(video, audio, self.ts_writer)
        return _Fmp4(video, audio, fmp4.init_segment(video, audio, self.width, self.height))

    def resolved(self) -> str:
        """The container in use: "auto" becomes TS for H.264 (or no video), fMP4 otherwise."""
        codec = self.video_config.codec if self.video_config is not None and self.has_video else None
        if self.container == "ts" and codec not in (None, "avc1"):
            raise HlsError(f"MPEG-TS segments carry H.264 here, not {codec}: ask for fMP4 (?format=fmp4)")
        if self.container == "auto":
            return "ts" if codec in (None, "avc1") else "fmp4"
        return self.container

    # Output ---------------------------------------------------------------------------------------------

    def listed(self) -> list[Segment]:
        return list(self.segments)[-self.window:]

    def segment(self, sequence: int) -> Segment | None:
        first = self.segments[0].sequence if self.segments else 0
        index = sequence - first
        return self.segments[index] if 0 <= index < len(self.segments) else None

    def playlist(self, prefix: str, suffix: str = "") -> str:
        """The media playlist; segment URIs are `prefix` + name + `suffix` (relative to the playlist's URL;
        the suffix carries a signed URL's query)."""
        listed = self.listed()
        if not listed:
            return ""
        fmp4_segments = listed[-1].extension == "m4s"
        removed = self.removed_discontinuities + sum(
            1 for s in list(self.segments)[:-self.window] if s.discontinuity)
        lines = ["#EXTM3U", f"#EXT-X-VERSION:{7 if fmp4_segments else 3}",
                 f"#EXT-X-TARGETDURATION:{self.target_duration}",
                 f"#EXT-X-MEDIA-SEQUENCE:{listed[0].sequence}",
                 f"#EXT-X-DISCONTINUITY-SEQUENCE:{removed}"]
        if self.has_video:
            lines.append("#EXT-X-INDEPENDENT-SEGMENTS")
        init = 0
        for segment in listed:
            if segment.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            if fmp4_segments and segment.init != init:
                init = segment.init
                lines.append(f'#EXT-X-MAP:URI="{prefix}init-{init}.mp4{suffix}"')
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(segment.started_at))
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{stamp}.{int(segment.started_at * 1000) % 1000:03d}Z")
            lines.append(f"#EXTINF:{segment.duration:.3f},")
            lines.append(f"{prefix}{segment.sequence}.{segment.extension}{suffix}")
        return "\n".join(lines) + "\n"
