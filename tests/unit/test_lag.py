"""The one lag policy, as a relay subscriber (it drops its backlog at a skip) and a playback viewer (its
socket keeps what it holds) see it."""

from __future__ import annotations

from castmesh.media.frames import VIDEO, make_frame
from castmesh.media.lag import LagPolicy, Verdict

DELTA = make_frame(VIDEO, 40, b"\x27\x01x")
KEY = make_frame(VIDEO, 80, b"\x17\x01x")


def test_a_relay_subscriber_skips_then_is_dropped_if_it_took_nothing_since() -> None:
    lag = LagPolicy(3.0)
    assert lag.check(10.0, 2.0, caught_up=True) is Verdict.GO and lag.resume_at([DELTA], True, True) == 0
    assert lag.check(11.0, 3.5, caught_up=True) is Verdict.SKIP and lag.skips == 1
    assert lag.resume_at([DELTA, KEY], True, caught_up=True) == 1  # from the keyframe on
    lag.progressed()  # it took something
    assert lag.check(20.0, 3.5, caught_up=True) is Verdict.SKIP and lag.skips == 2  # behind again: skips again
    assert lag.resume_at([DELTA], True, True) is None  # no resume point yet
    # Still waiting for a keyframe, and what it holds (a pending header) grew old untaken: it is dropped.
    assert lag.check(24.0, 3.5, caught_up=True) is Verdict.DROP


def test_a_viewer_waits_for_its_socket_to_drain_then_resumes_or_is_dropped() -> None:
    lag = LagPolicy(3.0)
    assert lag.check(10.0, 3.5, caught_up=False) is Verdict.SKIP
    assert lag.resume_at([KEY], True, caught_up=False) is None  # its socket still holds old bytes
    assert lag.check(12.0, 5.0, caught_up=False) is Verdict.GO  # within max_lag of the skip: it waits
    lag.progressed()  # drained
    assert lag.check(12.5, 0.0, caught_up=True) is Verdict.GO and lag.resume_at([DELTA, KEY], True, True) == 1
    assert lag.check(30.0, 3.5, caught_up=False) is Verdict.SKIP
    assert lag.check(33.5, 7.0, caught_up=False) is Verdict.DROP  # not drained within max_lag of the skip


def test_audio_only_resumes_at_any_frame() -> None:
    lag = LagPolicy(1.0)
    lag.check(5.0, 2.0, caught_up=True)
    assert lag.resume_at([make_frame(8, 0, b"\xaf\x01a")], has_video=False, caught_up=True) == 0
    assert not lag.skipping
