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
MAX_DATE_DRIFT = 0.5  # seconds: past this between ingest's clock and the media's, segment dates re-anchor
NAL_CODECS = ("avc1", "hvc1")


class HlsError(ValueError):
    """A stream that the requested container cannot carry."""


@dataclass(slots=True)
class Part:
    """A partial segment (low-latency HLS): one moof + mdat of its segment."""

    index: int  # within its segment, from 0
    number: int  # across segments: its name (a preload hint names the next number before its segment is known)
    duration: float  # seconds
    data: bytes  # emptied once its segment is complete: then it is data[start:end] of the segment
    independent: bool  # starts with a keyframe (or carries no video)
    start: int = 0
    end: int = 0


@dataclass(slots=True)
class Segment:
    sequence: int
    duration: float  # seconds
    data: bytes
    discontinuity: bool
    init: int  # which initialization segment it needs (fMP4)
    started_at: float  # when ingest received its first frame (wall clock), for EXT-X-PROGRAM-DATE-TIME
    extension: str  # ts or m4s
    parts: list[Part] = field(default_factory=list)

    def part(self, index: int) -> bytes | None:
        if not 0 <= index < len(self.parts):
            return None
        part = self.parts[index]
        return part.data or self.data[part.start:part.end]


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
        self.video_samples: list[tuple[int, VideoSample]] = []  # gathered for the next fragment
        self.audio_frames: list[tuple[int, bytes]] = []

    def video(self, timestamp: int, sample: VideoSample) -> None:
        if self.nal_length_size:
            nal_units(sample.data, self.nal_length_size)  # a sample that does not parse goes no further
        self.video_samples.append((timestamp, sample))

    def audio(self, timestamp: int, frame: bytes) -> None:
        self.audio_frames.append((timestamp, frame))

    def last_timestamp(self) -> int | None:
        """The start of the newest gathered sample of the track that paces parts (video, else audio)."""
        if self.video_samples:
            return self.video_samples[-1][0]
        if self.audio_frames and self.video_config is None:
            return self.audio_frames[-1][0]
        return None

    def fragment(self, sequence: int, end_timestamp: int, everything: bool = True) -> tuple[bytes, bool]:
        """moof + mdat of the gathered samples that start before end_timestamp (all of them if
        `everything`), and whether it starts with a keyframe; the rest stay for the next fragment."""
        video, audio = self.video_samples, self.audio_frames
        if not everything:
            video = [v for v in video if v[0] < end_timestamp]
            audio = [a for a in audio if a[0] < end_timestamp]
        self.video_samples = self.video_samples[len(video):]
        self.audio_frames = self.audio_frames[len(audio):]
        runs = []
        if video:
            ends = [ts for ts, _ in video[1:]] + [max(end_timestamp, video[-1][0] + 1)]
            runs.append(fmp4.TrackRun(fmp4.VIDEO_TRACK, video[0][0] * 90, [
                fmp4.Sample(max(end - ts, 1) * 90, s.data, s.keyframe, s.composition_ms * 90)
                for (ts, s), end in zip(video, ends, strict=True)]))
        if audio and self.audio_config is not None:
            rate = self.audio_config.sample_rate
            runs.append(fmp4.TrackRun(fmp4.AUDIO_TRACK, audio[0][0] * rate // 1000,
                                      [fmp4.Sample(fmp4.AAC_FRAME_SAMPLES, f) for _, f in audio]))
        independent = video[0][1].keyframe if video else self.video_config is None
        return fmp4.media_segment(sequence, runs), independent

    def close(self, sequence: int, end_timestamp: int) -> bytes:
        return self.fragment(sequence, end_timestamp)[0]


@dataclass(slots=True)
class _Open:
    sequence: int
    start: int  # ms
    container: _Container
    discontinuity: bool
    init: int
    started_at: float
    size: int = 0
    parts: list[Part] = field(default_factory=list)
    part_start: int = 0  # ms: where the part being gathered starts
    taken: int = 0  # parts handed over by take_parts()


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
    part_ms: int = 0  # low-latency HLS: partial segments of at most this long (fMP4 only); 0: none
    max_segment_bytes: int = MAX_SEGMENT_BYTES  # (a recorder that takes its parts as they come allows more)

    def __post_init__(self) -> None:
        if self.container not in CONTAINERS:
            raise HlsError(f"unknown HLS container {self.container!r}")
        self.video_config: VideoConfig | None = None
        self.audio_config: AudioConfig | None = None
        self.width = self.height = 0
        self.open: _Open | None = None
        self.next_sequence = -1  # set by the first segment
        self.next_part = -1  # likewise: the number the next part will have
        self.init_version = -1
        self.fragments = 0  # moof sequence numbers, for parts
        self.changes = 0  # parts and segments completed: what blocking requests wait on
        self.ingest_time = 0.0  # of the frame being taken (seconds since the epoch)
        self.date_anchor: tuple[float, int] | None = None  # (ingest time, media timestamp) segments are dated from
        self.intervals: deque[int] = deque(maxlen=8)  # recent gaps between frames of the pacing track
        self.last_clock = -1
        if self.part_ms and self.container == "ts":
            raise HlsError("partial segments are made in fMP4 here, not MPEG-TS")
        if self.part_ms:
            self.container = "fmp4"
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
        self.ingest_time = frame.ingest_time_us / 1e6 if frame.ingest_time_us else time.time()
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
            if self.part_ms and self.has_video:
                self._maybe_cut_part(ts)
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
                if self.part_ms:
                    self._maybe_cut_part(ts)
                self._maybe_cut(ts, done)
            if self.open is not None and self.open.container.audio_config is not None:
                self.open.container.audio(ts, audio)
                self._grew(len(audio))

    def _grew(self, size: int) -> None:
        assert self.open is not None
        self.open.size += size
        if self.open.size > self.max_segment_bytes:
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

    def _maybe_cut_part(self, ts: int) -> None:
        """Before a frame of the pacing track at ts is taken: end the part being gathered if it is full. A
        part never lasts longer than part_ms: it ends at ts when the next frame would not fit, or, when
        the timing was irregular and ts is already too late, at the frame before (which then starts the
        next part). Only a single frame longer than part_ms makes a longer part."""
        current = self.open
        if self.last_clock >= 0 and ts > self.last_clock:
            self.intervals.append(ts - self.last_clock)
        self.last_clock = ts
        if current is None or not isinstance(current.container, _Fmp4):
            return
        span = ts - current.part_start
        if span > self.part_ms:
            last = current.container.last_timestamp()
            if last is not None and last > current.part_start:
                self._cut_part(current, last, everything=False)
            if ts - current.part_start > self.part_ms:
                self._cut_part(current, ts)
        elif span > 0 and span + min(self.intervals, default=span) > self.part_ms:
            self._cut_part(current, ts)

    def _cut_part(self, current: _Open, end: int, everything: bool = True) -> None:
        assert isinstance(current.container, _Fmp4)
        self.fragments += 1
        data, independent = current.container.fragment(self.fragments, end, everything)
        current.parts.append(Part(len(current.parts), self.next_part, max(end - current.part_start, 1) / 1000, data,
                                  independent))
        self.next_part += 1
        current.part_start = end
        self.changes += 1

    def _close(self, current: _Open, end: int) -> Segment:
        duration = max(end - current.start, 1) / 1000
        self.target_duration = max(self.target_duration, math.ceil(duration))
        if self.part_ms and isinstance(current.container, _Fmp4):
            if end > current.part_start or not current.parts:
                self._cut_part(current, end)
            data, offset = b"".join(part.data for part in current.parts), 0
            for part in current.parts:  # from now on a part is a slice of its segment
                part.start, part.end, offset = offset, offset + len(part.data), offset + len(part.data)
                part.data = b""
        else:
            data = current.container.close(current.sequence, end)
        segment = Segment(current.sequence, duration, data, current.discontinuity, current.init,
                          current.started_at, current.container.extension, current.parts)
        self.changes += 1
        self.segments.append(segment)
        while len(self.segments) > self.window + self.keep:
            if self.segments.popleft().discontinuity:
                self.removed_discontinuities += 1
        self.open = None
        return segment

    def _start(self, ts: int) -> None:
        discontinuity = (self.discontinuity or self.config_changed) and self.next_sequence >= 0
        if self.next_sequence < 0:
            # Numbered from the time ingest received the first frame, in target durations: names never
            # repeat when a muxer stops and a new one starts, and nodes muxing one stream mostly agree.
            self.next_sequence = int(self.ingest_time * 1000) // self.target_ms if self.part_ms else 0
            self.next_part = int(self.ingest_time * 1000) // self.part_ms if self.part_ms else 0
        if self.config_changed or self.init_version < 0:
            self.init_version = self.next_sequence  # named after its first segment: never reused either
            self.ts_writer = None
        self.discontinuity = self.config_changed = False
        container = self._container()
        if container.init is not None:
            self.inits[self.init_version] = container.init
            for version in [v for v in self.inits if v < self.init_version and not self._needs(v)]:
                del self.inits[version]
        self.open = _Open(self.next_sequence, ts, container, discontinuity, self.init_version,
                          self._date(ts, discontinuity), part_start=ts)
        self.next_sequence += 1

    def _date(self, ts: int, discontinuity: bool) -> float:
        """When ingest received the frame at `ts`, on one line through the stream: anchored at the first
        segment (again after a discontinuity, or when ingest's clock and the media's part by more than
        MAX_DATE_DRIFT), so that consecutive segments' dates differ by their durations exactly. Dating each
        segment by its own first frame's arrival carried arrival jitter into the dates, and hls.js, which
        aligns playlist reloads by them, shifted its whole timeline by a millisecond or two at such reloads."""
        anchor = self.date_anchor
        if anchor is not None and not discontinuity:
            date = anchor[0] + (ts - anchor[1]) / 1000
            if abs(date - self.ingest_time) <= MAX_DATE_DRIFT:
                return date
        self.date_anchor = (self.ingest_time, ts)
        return self.ingest_time

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

    def take_parts(self) -> list[bytes]:
        """The open segment's parts made since the last call, handed over (a recorder writes them to its
        file as they come): from then on they are not kept here, and the segment, when it closes, holds
        only what was not taken."""
        current = self.open
        if current is None:
            return []
        taken = [part.data for part in current.parts[current.taken:]]
        for part in current.parts[current.taken:]:
            part.data = b""
        current.taken = len(current.parts)
        return taken

    def finish(self) -> Segment | None:
        """Close the open segment where its media end (the stream ended), one frame interval after its
        last frame of the pacing track."""
        current = self.open
        if current is None:
            return None
        end = self.last_clock + min(self.intervals, default=1) if self.last_clock >= 0 else current.start + 1
        return self._close(current, max(end, current.start + 1))

    # Output ---------------------------------------------------------------------------------------------

    def listed(self) -> list[Segment]:
        return list(self.segments)[-self.window:]

    def segment(self, sequence: int) -> Segment | None:
        first = self.segments[0].sequence if self.segments else 0
        index = sequence - first
        return self.segments[index] if 0 <= index < len(self.segments) else None

    def part(self, number: int) -> bytes | None:
        """A partial segment's bytes by its number, from the open segment or a complete one."""
        current = self.open
        if current is not None and current.parts and current.parts[0].number <= number:
            index = number - current.parts[0].number
            return current.parts[index].data if index < len(current.parts) else None
        for segment in reversed(self.segments):
            if segment.parts and segment.parts[0].number <= number:
                return segment.part(number - segment.parts[0].number)
        return None

    def latest(self) -> tuple[int, int]:
        """The newest (segment, part) there is: the open segment and its last complete part (-1: none yet),
        else the last segment, complete."""
        if self.open is not None:
            return self.open.sequence, len(self.open.parts) - 1
        if self.segments:
            return self.segments[-1].sequence + 1, -1
        return -1, -1

    @property
    def part_target(self) -> float:
        return self.part_ms / 1000

    def skip_until(self) -> float:
        """CAN-SKIP-UNTIL: delta updates may leave out segments older than this (six target durations)."""
        return 6.0 * self.target_duration

    def playlist(self, prefix: str, suffix: str = "", skip: bool = False) -> str:
        """The media playlist; segment URIs are `prefix` + name + `suffix` (relative to the playlist's URL;
        the suffix carries a signed URL's query). With parts (low-latency HLS) it lists the recent parts,
        the open segment's parts and a preload hint for the next one; `skip` asks for a delta update."""
        listed = self.listed()
        if not listed:
            return ""
        fmp4_segments = listed[-1].extension == "m4s"
        removed = self.removed_discontinuities + sum(
            1 for s in list(self.segments)[:-self.window] if s.discontinuity)
        low_latency = bool(self.part_ms)
        version = 9 if low_latency else 7 if fmp4_segments else 3
        lines = ["#EXTM3U", f"#EXT-X-VERSION:{version}", f"#EXT-X-TARGETDURATION:{self.target_duration}"]
        if low_latency:
            lines.append(f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={3 * self.part_target:.3f},"
                         f"CAN-SKIP-UNTIL={self.skip_until():.1f}")
            lines.append(f"#EXT-X-PART-INF:PART-TARGET={self.part_target:.3f}")
        lines += [f"#EXT-X-MEDIA-SEQUENCE:{listed[0].sequence}", f"#EXT-X-DISCONTINUITY-SEQUENCE:{removed}"]
        if self.has_video:
            lines.append("#EXT-X-INDEPENDENT-SEGMENTS")
        skipped = 0
        if skip and low_latency:
            total = sum(segment.duration for segment in listed)
            for segment in listed[:-1]:  # those that start more than CAN-SKIP-UNTIL before the end
                if total <= self.skip_until():
                    break
                total -= segment.duration
                skipped += 1
            if skipped:
                lines.append(f"#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}")
        with_parts = 0.0  # parts are listed for the last three target durations
        parts_from = len(listed)
        for i in range(len(listed) - 1, -1, -1):
            with_parts += listed[i].duration
            if with_parts > 3 * self.target_duration:
                break
            parts_from = i
        init = -1
        for i, segment in enumerate(listed):
            if i < skipped:
                continue
            if segment.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            if fmp4_segments and segment.init != init:
                init = segment.init
                lines.append(f'#EXT-X-MAP:URI="{prefix}init-{init}.mp4{suffix}"')
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date_time(segment.started_at)}")
            if low_latency and i >= parts_from:
                lines += [_part_line(prefix, suffix, part) for part in segment.parts]
            lines.append(f"#EXTINF:{segment.duration:.3f},")
            lines.append(f"{prefix}{segment.sequence}.{segment.extension}{suffix}")
        current = self.open
        if low_latency and current is not None:
            if current.parts:
                if current.discontinuity:
                    lines.append("#EXT-X-DISCONTINUITY")
                if current.init != init:
                    lines.append(f'#EXT-X-MAP:URI="{prefix}init-{current.init}.mp4{suffix}"')
                lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date_time(current.started_at)}")
            lines += [_part_line(prefix, suffix, part) for part in current.parts]
            lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{prefix}part-{self.next_part}.m4s{suffix}"')
        return "\n".join(lines) + "\n"


def _date_time(at: float) -> str:
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(at))}.{int(at * 1000) % 1000:03d}Z"


def _part_line(prefix: str, suffix: str, part: Part) -> str:
    independent = ",INDEPENDENT=YES" if part.independent else ""
    return f'#EXT-X-PART:DURATION={part.duration:.3f},URI="{prefix}part-{part.number}.m4s{suffix}"{independent}'


@dataclass(frozen=True, slots=True)
class Variant:
    """One rendition of a stream, as a multivariant playlist lists it."""

    uri: str  # its media playlist, relative to the multivariant playlist's URL
    bandwidth: int  # peak bits per second
    width: int = 0
    height: int = 0
    frame_rate: float = 0.0
    codecs: str = ""  # RFC 6381, comma-separated


def multivariant(variants: list[Variant]) -> str:
    """A multivariant playlist (RFC 8216bis 4.4.6.2): each rendition's EXT-X-STREAM-INF, highest bandwidth
    first (players start with the first listed unless they measure; hls.js starts by its estimate)."""
    lines = ["#EXTM3U", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for v in sorted(variants, key=lambda v: -v.bandwidth):
        attributes = [f"BANDWIDTH={max(1, v.bandwidth)}"]
        if v.width and v.height:
            attributes.append(f"RESOLUTION={v.width}x{v.height}")
        if v.frame_rate:
            attributes.append(f"FRAME-RATE={v.frame_rate:.3f}")
        if v.codecs:
            attributes.append(f'CODECS="{v.codecs}"')
        lines += [f"#EXT-X-STREAM-INF:{','.join(attributes)}", v.uri]
    return "\n".join(lines) + "\n"


def rendition_report(uri: str, latest: tuple[int, int]) -> str:
    """An LL-HLS media playlist's EXT-X-RENDITION-REPORT for another rendition: its newest segment and part."""
    msn, part = latest
    return f'#EXT-X-RENDITION-REPORT:URI="{uri}",LAST-MSN={msn},LAST-PART={part}'
