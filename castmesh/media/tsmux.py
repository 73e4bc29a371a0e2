"""A stream's frames as one continuous MPEG-TS, as live transport-stream players (SRT viewers) take it:
H.264 or HEVC, and AAC or Opus (enhanced RTMP's, in the mapping ffmpeg reads), PAT and PMT before every
keyframe (and about every second of an audio-only stream), PTS and DTS at 90 kHz from the frames'
milliseconds, PCR on the video PID. No IO.

`push` returns the bytes and where each frame's packets begin: every TS packet belongs to one frame's
PES, so a viewer resuming at frames[i] after a skip is sent a suffix of the same bytes, and the
continuity counters then run on into the next push for it as for everyone else. Tracks that change (a
republish with another codec, audio that starts late) bring new tables of the next PMT version.

HLS's TS segments (castmesh.media.hls) are cut from the same writer (castmesh.media.mpegts.TsWriter).
"""

from __future__ import annotations

from castmesh.media.codecs import (
    OPUS_HEAD,
    AudioConfig,
    CodecError,
    VideoConfig,
    adts_header,
    annex_b,
    read_audio,
    read_opus,
    read_video,
)
from castmesh.media.frames import AUDIO, VIDEO
from castmesh.media.mpegts import STREAM_TYPE_H264, STREAM_TYPE_HEVC, TsWriter, opus_access_unit
from castmesh.proto.v1.media_pb2 import Frame

VIDEO_TYPES = {"avc1": STREAM_TYPE_H264, "hvc1": STREAM_TYPE_HEVC}
AUDIO_TABLES_EVERY = 45  # AAC frames (about a second) between tables when there is no video


class TsMuxer:
    def __init__(self) -> None:
        self.video: VideoConfig | None = None
        self.audio: AudioConfig | int | None = None  # AAC's configuration, or Opus's channel count
        self.writer: TsWriter | None = None
        self.version = 0
        self.announced = False  # whether tables of this version went out: a change after that needs the next
        self.counters: dict[int, int] = {}  # each PID's next continuity counter, across writers
        self.since_tables = 0
        self.dropped = 0  # frames that could not be read, or that TS here cannot carry

    def configure(self, frames: list[Frame]) -> None:
        """Take the tracks' configurations from these frames (sequence headers) and write nothing."""
        for frame in frames:
            self._frame(frame)

    def push(self, frames: list[Frame]) -> tuple[bytes, list[int]]:
        """These frames as TS; the offset in it where each frame's packets begin."""
        parts: list[bytes] = []
        offsets: list[int] = []
        size = 0
        for frame in frames:
            offsets.append(size)
            data = self._frame(frame)
            if data:
                parts.append(data)
                size += len(data)
        return b"".join(parts), offsets

    def _frame(self, frame: Frame) -> bytes:
        try:
            if frame.kind == VIDEO:
                return self._video(frame)
            if frame.kind == AUDIO:
                return self._audio(frame)
        except CodecError:
            self.dropped += 1
        return b""

    def _video(self, frame: Frame) -> bytes:
        item = read_video(frame.payload)
        if isinstance(item, VideoConfig):
            config = item if item.codec in VIDEO_TYPES else None
            if config is None:
                self.dropped += 1
            if config != self.video:
                self.video = config
                self._new_writer()
            return b""
        if item is None or self.video is None or self.writer is None:
            return b""
        dts = frame.timestamp * 90
        data = self.writer.video(annex_b(item, self.video), dts + item.composition_ms * 90, dts, item.keyframe)
        return self._tables() + data if item.keyframe else data

    def _audio(self, frame: Frame) -> bytes:
        item = read_audio(frame.payload)
        if item is None:
            return self._opus(frame)
        if isinstance(item, AudioConfig):
            if item != self.audio:
                self.audio = item
                self._new_writer()
            return b""
        if not isinstance(self.audio, AudioConfig) or self.writer is None or not self.writer.has_audio:
            return b""
        return self._audio_pes(adts_header(self.audio, len(item)) + item, frame.timestamp)

    def _opus(self, frame: Frame) -> bytes:
        item = read_opus(frame.payload)
        if item is OPUS_HEAD:
            head = frame.payload[5:]
            channels = head[9] if len(head) > 9 and head[9] in (1, 2) else 2  # past "OpusHead" and the version
            if self.audio != channels:
                self.audio = channels
                self._new_writer()
            return b""
        if not isinstance(item, bytes) or not isinstance(self.audio, int) or self.writer is None:
            return b""
        return self._audio_pes(opus_access_unit(item), frame.timestamp)

    def _audio_pes(self, data: bytes, timestamp: int) -> bytes:
        assert self.writer is not None
        data = self.writer.audio(data, timestamp * 90)
        if self.video is None:
            self.since_tables += 1
            if self.since_tables >= AUDIO_TABLES_EVERY:
                self.since_tables = 0
                return self._tables() + data
        return data

    def _tables(self) -> bytes:
        assert self.writer is not None
        self.announced = True
        return self.writer.tables()

    def _new_writer(self) -> None:
        if self.video is None and self.audio is None:
            self.writer = None
            return
        if self.announced:
            self.version += 1
            self.announced = False
        video_type = VIDEO_TYPES[self.video.codec] if self.video is not None else STREAM_TYPE_H264
        opus = self.audio if isinstance(self.audio, int) else 0
        self.writer = TsWriter(self.video is not None, self.audio is not None, video_type, self.version,
                               self.counters, opus)
        self.since_tables = AUDIO_TABLES_EVERY  # audio only: tables with the next frame
