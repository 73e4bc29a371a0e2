import itertools

from hypothesis import given
from hypothesis import strategies as st

from castmesh.media.frames import AUDIO, VIDEO, make_frame
from castmesh.media.timeline import Continuity, Jitter

SEQ = iter(range(1, 1 << 30))


def v(ts: int, key: bool = False, seq: int | None = None):
    frame = make_frame(VIDEO, ts, b"\x17\x01k" if key else b"\x27\x01p")
    frame.sequence = seq if seq is not None else next(SEQ)
    return frame


def a(ts: int, seq: int | None = None):
    frame = make_frame(AUDIO, ts, b"\xaf\x01a")
    frame.sequence = seq if seq is not None else next(SEQ)
    return frame


def test_same_session_replay_continues_exactly_where_it_stopped():
    c = Continuity()
    c.on_header("s1", has_video=True)
    sent = [v(0, True, seq=1), a(10, seq=2), v(40, seq=3), a(33, seq=4), v(80, seq=5)]
    assert c.admit(sent) == sent
    # the new upstream replays its GOP from the keyframe at 0, then goes on
    assert not c.on_header("s1", has_video=True)
    replay = [v(0, True, seq=1), a(10, seq=2), v(40, seq=3), a(33, seq=4), v(80, seq=5), a(56, seq=6), v(120, seq=7)]
    assert [f.sequence for f in c.admit(replay)] == [6, 7]


def test_frames_with_equal_timestamps_are_not_taken_for_repeats():
    # ffmpeg sends an HEVC metadata packet (enhanced RTMP PacketType 4) and then the keyframe, both at 0.
    c = Continuity()
    c.on_header("s1", has_video=True)
    meta = make_frame(VIDEO, 0, b"\x94hvc1")
    meta.sequence = 1
    key = make_frame(VIDEO, 0, b"\x91hvc1\x00\x00\x00")
    key.sequence = 2
    assert c.admit([meta, key]) == [meta, key]


def test_new_session_waits_for_a_keyframe():
    c = Continuity()
    c.on_header("s1", has_video=True)
    c.admit([v(5000, True), v(5040)])
    assert c.on_header("s2", has_video=True)
    out = c.admit([a(0), v(0), v(40, True), a(50), v(80)])
    assert [(f.kind, f.timestamp) for f in out] == [(VIDEO, 40), (AUDIO, 50), (VIDEO, 80)]


def test_jitter_rebases_a_restarted_timeline_and_counts_it():
    j = Jitter(max_jump_ms=1000)
    frames = [v(9960), a(9970), v(10000), a(9993)]  # audio slightly behind video is normal interleaving
    frames += [v(0), a(5), v(40), a(28)]  # the publisher reconnected: its clock restarts at 0
    for f in frames:
        j.apply(f)
    video = [f.timestamp for f in frames if f.kind == VIDEO]
    audio = [f.timestamp for f in frames if f.kind == AUDIO]
    assert video == [9960, 10000, 10040, 10080]
    assert audio == [9970, 9993, 10016, 10039]
    assert j.corrections == 2


@given(st.lists(st.tuples(st.sampled_from([AUDIO, VIDEO]), st.integers(0, 2**32 - 1)), max_size=200))
def test_jitter_output_never_goes_backwards_or_jumps_per_track(raw):
    j = Jitter(max_jump_ms=1000)
    frames = [make_frame(kind, ts, b"\xaf\x01x" if kind == AUDIO else b"\x27\x01x") for kind, ts in raw]
    for f in frames:
        j.apply(f)
    for kind in (AUDIO, VIDEO):
        out = [f.timestamp for f in frames if f.kind == kind]
        assert all(0 <= (b - a) % (1 << 32) <= 1000 for a, b in itertools.pairwise(out))  # modulo the wrap
