"""What a newcomer to a live stream needs, kept per stream by every node that fans out (relay, playback):
the latest metadata and sequence headers, and the frames since the latest keyframe (the GOP cache).

A viewer that joins mid-stream gets metadata, sequence headers, then frames starting at a keyframe, so it
shows a picture at once instead of waiting for the next keyframe. For audio-only streams, where every frame
is a starting point, the cache keeps the last second of audio. The cache is bounded in frames and bytes;
past that it empties and late joiners wait for the next keyframe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from castmesh.media import amf0
from castmesh.media.frames import AUDIO, DATA, VIDEO, is_metadata
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader, StreamKey

AUDIO_ONLY_WINDOW_MS = 1000


def is_resume_point(frame: Frame, has_video: bool) -> bool:
    """Where a viewer may start (or resume after skipping): a video keyframe, or any audio frame when the
    stream has no video."""
    if has_video:
        return frame.kind == VIDEO and frame.keyframe
    return frame.kind == AUDIO and not frame.sequence_header


def metadata_values(payload: bytes) -> dict[str, Any] | None:
    """The properties of an onMetaData frame, or None if it has none that can be read."""
    try:
        values = amf0.decode(payload)
    except amf0.AmfError:
        return None
    if len(values) < 2 or not isinstance(values[1], dict):
        return None
    return values[1]


def metadata_tracks(payload: bytes) -> tuple[bool, bool] | None:
    """(has_audio, has_video) as onMetaData declares them, or None if it does not say."""
    meta = metadata_values(payload)
    if meta is None:
        return None
    has_video = "videocodecid" in meta or "width" in meta
    has_audio = "audiocodecid" in meta or "audiosamplerate" in meta
    return (has_audio, has_video) if has_audio or has_video else None


class GopCache:
    def __init__(self, key: StreamKey, max_frames: int = 4096, max_bytes: int = 32 << 20) -> None:
        self.key = key
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.metadata: Frame | None = None
        self.video_config: Frame | None = None
        self.audio_config: Frame | None = None
        self.frames: list[Frame] = []
        self.size = 0
        self.declared: tuple[bool, bool] | None = None
        self.seen_audio = False
        self.seen_video = False
        self.last_timestamp = 0

    @property
    def has_video(self) -> bool:
        return self.declared[1] if self.declared else self.seen_video

    @property
    def has_audio(self) -> bool:
        return self.declared[0] if self.declared else self.seen_audio

    def add_all(self, frames: Iterable[Frame]) -> None:
        for frame in frames:
            self.add(frame)

    def add(self, frame: Frame) -> None:
        kind = frame.kind
        self.last_timestamp = frame.timestamp
        if kind == DATA:
            if is_metadata(frame.payload):
                self.metadata = frame
                self.declared = metadata_tracks(frame.payload)
            return
        if kind == VIDEO:
            self.seen_video = True
            if frame.sequence_header:
                self.video_config = frame
                return
            if frame.keyframe:
                self._reset()
            elif not self.frames:
                return  # no keyframe yet: nothing a newcomer could decode
        elif kind == AUDIO:
            self.seen_audio = True
            if frame.sequence_header:
                self.audio_config = frame
                return
            if not self.has_video:
                while self.frames and frame.timestamp - self.frames[0].timestamp > AUDIO_ONLY_WINDOW_MS:
                    self.size -= len(self.frames.pop(0).payload)
            elif not self.frames:
                return
        else:
            return
        self.frames.append(frame)
        self.size += len(frame.payload)
        if len(self.frames) > self.max_frames or self.size > self.max_bytes:
            self._reset()

    def _reset(self) -> None:
        self.frames = []
        self.size = 0

    def header(self) -> StreamHeader:
        return StreamHeader(
            stream=self.key,
            metadata=self.metadata,
            video_config=self.video_config,
            audio_config=self.audio_config,
            has_audio=self.has_audio,
            has_video=self.has_video,
        )

    def apply_header(self, header: StreamHeader) -> None:
        """Adopt an upstream node's header (a playback node or an edge starting a subscription)."""
        for field, frame in (("metadata", header.metadata), ("video_config", header.video_config),
                             ("audio_config", header.audio_config)):
            if header.HasField(field):
                self.add(frame)
        if not header.HasField("metadata") and (header.has_audio or header.has_video):
            self.declared = (header.has_audio, header.has_video)


def header_frames(header: StreamHeader) -> list[Frame]:
    return [getattr(header, f) for f in ("metadata", "video_config", "audio_config") if header.HasField(f)]
