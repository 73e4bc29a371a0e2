"""Keeping a viewer's timeline whole when what feeds it changes.

Continuity: a node that re-subscribes (its upstream relay died) gets the new upstream's GOP cache, which
repeats frames it already forwarded. Within one publish session, frames whose sequence number (given by
ingest) is not past the last one forwarded are dropped, so the output continues exactly where it stopped.
When the session changes (the publisher reconnected), the old timeline is over: output waits for a
keyframe of the new one.

Jitter: what viewers get must never go backwards or jump, as SRS's time_jitter guarantees. Per track, a
step that goes backwards or is larger than max_jump_ms is replaced with the track's usual step, and the
correction is counted. A new timeline after a reconnect is just such a jump, so it is rebased the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from castmesh.media.frames import AUDIO, VIDEO
from castmesh.proto.v1.media_pb2 import Frame

DEFAULT_STEP_MS = {VIDEO: 33, AUDIO: 23}


@dataclass(slots=True)
class Continuity:
    session_id: str = ""
    last_sequence: int = 0
    waiting_keyframe: bool = False
    has_video: bool = True
    dropped: int = 0

    def on_header(self, session_id: str, has_video: bool) -> bool:
        """A header from upstream. True if it starts a new timeline (a new publish session)."""
        self.has_video = has_video
        if session_id == self.session_id:
            return False
        new_timeline = bool(self.session_id)
        self.session_id = session_id
        if new_timeline:
            self.last_sequence = 0
            self.waiting_keyframe = has_video
        return new_timeline

    def admit(self, frames: list[Frame]) -> list[Frame]:
        out = []
        for frame in frames:
            kind = frame.kind
            if self.waiting_keyframe:
                if not (kind == VIDEO and frame.keyframe) and not frame.sequence_header:
                    self.dropped += 1
                    continue
                if kind == VIDEO and frame.keyframe:
                    self.waiting_keyframe = False
            if frame.sequence:
                if frame.sequence <= self.last_sequence:
                    self.dropped += 1
                    continue
                self.last_sequence = frame.sequence
            out.append(frame)
        return out


@dataclass(slots=True)
class _Track:
    last_in: int
    last_out: int
    step: int


class Jitter:
    """Rewrites timestamps in place so that each track only moves forward by plausible steps."""

    def __init__(self, max_jump_ms: int = 1000) -> None:
        self.max_jump_ms = max_jump_ms
        self.tracks: dict[int, _Track] = {}
        self.corrections = 0
        self.latest_out = 0

    def apply(self, frame: Frame) -> None:
        kind = frame.kind
        ts = frame.timestamp
        if kind not in (AUDIO, VIDEO):
            frame.timestamp = self.latest_out
            return
        track = self.tracks.get(kind)
        if track is None:
            # A track starting late (or after a reset) lines up with the others, not with its raw clock.
            out = ts if not self.tracks else self._aligned(ts)
            self.tracks[kind] = _Track(ts, out, DEFAULT_STEP_MS.get(kind, 20))
        else:
            delta = _signed(ts - track.last_in)
            if delta < 0 or delta > self.max_jump_ms:
                delta = track.step
                self.corrections += 1
            elif delta > 0:
                track.step = delta
            out = track.last_out + delta
            track.last_in, track.last_out = ts, out
        out &= 0xFFFFFFFF
        frame.timestamp = out
        self.latest_out = max(self.latest_out, out)

    def _aligned(self, ts: int) -> int:
        other = next(iter(self.tracks.values()))
        offset = _signed(ts - other.last_in)
        if abs(offset) > self.max_jump_ms:
            self.corrections += 1
            return other.last_out
        return (other.last_out + offset) & 0xFFFFFFFF


def _signed(delta: int) -> int:
    """A difference of 32-bit RTMP timestamps, which wrap after 49.7 days, as a signed number."""
    delta &= 0xFFFFFFFF
    return delta - (1 << 32) if delta >= 1 << 31 else delta
