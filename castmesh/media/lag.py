"""How far one consumer of a stream may fall behind: the one lag policy of relay subscribers and playback
viewers, sans-IO (the caller says how far behind its consumer is and what it offers; the policy says what
to do).

Rules, for a consumer whose backlog (the age of the oldest thing it has not taken yet) is measured by its
owner at each offer:
- flowing, backlog older than max_lag: it skips (counted). The owner drops what backlog it can (a relay its
  queue; a playback node cannot take back bytes a socket holds), and the consumer resumes at the next
  resume point (a keyframe; any frame of an audio-only stream) once it has caught up.
- flowing, backlog older than max_lag again with no progress since its last skip (a relay subscriber that
  took nothing; a socket that never drained): it is dropped.
- skipping and not caught up max_lag after the skip began: it is dropped. (One that dropped its backlog is
  caught up: what it holds while it waits for a resume point, a pending header, is judged as above.)
So a stuck consumer holds about max_lag of data at most, and costs the others nothing.
The common case (flowing, backlog within max_lag: go) is tested inline by the owners' per-frame loops
(`not lag.skipping and behind <= lag.max_lag`), a call saved per consumer per batch; all else comes here.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from castmesh.media.gop import is_resume_point
from castmesh.proto.v1.media_pb2 import Frame


class Verdict(Enum):
    GO = "go"  # offer what resume_at() allows
    SKIP = "skip"  # it is too far behind: drop its backlog if you can, then offer what resume_at() allows
    DROP = "drop"  # it stayed behind: end it


class LagPolicy:
    __slots__ = ("max_lag", "progress", "skipped_at", "skipping", "skips")

    def __init__(self, max_lag: float) -> None:
        self.max_lag = max_lag
        self.skipping = False  # sending nothing until it has caught up and a resume point comes
        self.skipped_at = 0.0
        self.progress = True  # it took something since its last skip
        self.skips = 0

    def progressed(self) -> None:
        """The consumer took something (a relay subscriber's take; a socket that drained)."""
        self.progress = True

    def check(self, now: float, behind: float, caught_up: bool) -> Verdict:
        """Before an offer: `behind` is the age of its oldest untaken item (0 if none), `caught_up` whether
        it holds no backlog that must drain first."""
        if self.skipping and not caught_up:
            return Verdict.DROP if now - self.skipped_at > self.max_lag else Verdict.GO
        if behind <= self.max_lag:
            return Verdict.GO
        if not self.progress:
            return Verdict.DROP
        self.skipping = True
        self.skipped_at = now
        self.progress = False
        self.skips += 1
        return Verdict.SKIP

    def resume_at(self, frames: Sequence[Frame], has_video: bool, caught_up: bool) -> int | None:
        """Where in `frames` the consumer's share starts (0: all of them), or None: none of them."""
        if not self.skipping:
            return 0
        if not caught_up:
            return None
        start = next((i for i, frame in enumerate(frames) if is_resume_point(frame, has_video)), None)
        if start is not None:
            self.skipping = False
        return start
