import pytest
from hypothesis import given
from hypothesis import strategies as st

from castmesh.media import amf0, flv
from castmesh.media.codecs import CodecError
from castmesh.media.frames import AUDIO, DATA, VIDEO, audio_is_config, make_frame, stream_key, video_flags
from castmesh.media.gop import GopCache, is_resume_point, metadata_tracks


def test_video_flags_legacy_and_enhanced():
    assert video_flags(b"\x17\x00\x00\x00\x00") == (False, True)  # AVC sequence header
    assert video_flags(b"\x17\x01\x00\x00\x00") == (True, False)  # AVC keyframe
    assert video_flags(b"\x27\x01\x00\x00\x00") == (False, False)  # AVC inter frame
    assert video_flags(b"\x17\x02\x00\x00\x00") == (False, False)  # end of sequence
    assert video_flags(b"\x90hvc1") == (False, True)  # enhanced: keyframe, SequenceStart
    assert video_flags(b"\x91hvc1\x00\x00\x00") == (True, False)  # keyframe, CodedFrames
    assert video_flags(b"\x93av01") == (True, False)  # keyframe, CodedFramesX
    assert video_flags(b"\xa1vp09\x00\x00\x00") == (False, False)  # inter frame
    assert video_flags(b"") == (False, False)


def test_audio_config():
    assert audio_is_config(b"\xaf\x00\x12\x10")
    assert not audio_is_config(b"\xaf\x01abc")
    assert not audio_is_config(b"\x2f")  # MP3 has no config


def test_flv_tags_parse_back():
    frames = [make_frame(VIDEO, 0x01020304, b"\x17\x01abc"), make_frame(AUDIO, 7, b"\xaf\x01zz")]
    data = flv.file_header(True, True) + flv.tags(frames)
    assert data[:5] == b"FLV\x01\x05"
    tags = flv.FlvReader().feed(data)
    assert [(t.kind, t.timestamp, t.payload) for t in tags] == [(9, 0x01020304, b"\x17\x01abc"), (8, 7, b"\xaf\x01zz")]
    # previous-tag-size fields are right
    assert int.from_bytes(data[13 + 11 + 5 : 13 + 11 + 5 + 4], "big") == 11 + 5


def test_gop_cache_starts_at_the_latest_keyframe():
    cache = GopCache(stream_key("live", "x"))
    seq = make_frame(VIDEO, 0, b"\x17\x00cfg")
    for frame in [seq, make_frame(AUDIO, 0, b"\xaf\x00\x12\x10"), make_frame(VIDEO, 0, b"\x27\x01p"),
                  make_frame(VIDEO, 40, b"\x17\x01k1"), make_frame(AUDIO, 50, b"\xaf\x01a"),
                  make_frame(VIDEO, 80, b"\x27\x01p"), make_frame(VIDEO, 120, b"\x17\x01k2"),
                  make_frame(AUDIO, 130, b"\xaf\x01b")]:
        cache.add(frame)
    assert [f.payload for f in cache.frames] == [b"\x17\x01k2", b"\xaf\x01b"]
    header = cache.header()
    assert header.video_config.payload == b"\x17\x00cfg" and header.audio_config.payload == b"\xaf\x00\x12\x10"
    assert header.has_audio and header.has_video


def test_audio_only_cache_keeps_about_a_second():
    cache = GopCache(stream_key("live", "a"))
    for ts in range(0, 5000, 23):
        cache.add(make_frame(AUDIO, ts, b"\xaf\x01x"))
    assert not cache.has_video
    assert cache.frames[-1].timestamp - cache.frames[0].timestamp <= 1000
    assert is_resume_point(cache.frames[0], has_video=False)


def test_gop_cache_is_bounded():
    cache = GopCache(stream_key("live", "b"), max_bytes=1000)
    cache.add(make_frame(VIDEO, 0, b"\x17\x01" + b"k" * 100))
    for ts in range(1, 50):
        cache.add(make_frame(VIDEO, ts, b"\x27\x01" + b"p" * 100))
    assert cache.size <= 1000


def test_metadata_declares_tracks():
    meta = amf0.encode("onMetaData", amf0.EcmaArray({"audiocodecid": 10.0, "audiosamplerate": 44100.0}))
    assert metadata_tracks(meta) == (True, False)
    cache = GopCache(stream_key("live", "c"))
    cache.add(make_frame(DATA, 0, meta))
    assert (cache.has_audio, cache.has_video) == (True, False)


SPS_SIZES = [  # SPS NAL units from ffmpeg's libx264, with the size each was asked for
    ("6764000dacd94141fb011000000300100000030320f1429960", (320, 240)),  # High
    ("67640028acd940780227e5c044000003000400000300c83c60c658", (1920, 1080)),  # High, cropped from 1088
    ("6742c01fd9005005bb011000000300100000030320f1832480", (1280, 720)),  # Constrained Baseline
    ("674d401eeca05a126c0440000003004000000c87c50a6580", (720, 576)),  # Main, interlaced
    ("67f4001e919b281485fc7cf808800000030080000019078b16cb", (642, 362)),  # High 4:4:4, odd size
]


@pytest.mark.parametrize(("sps", "size"), SPS_SIZES)
def test_the_picture_size_comes_from_the_sps(sps: str, size: tuple[int, int]) -> None:
    from castmesh.media.codecs import avc_dimensions

    assert avc_dimensions(bytes.fromhex(sps)) == size


@given(st.binary(max_size=64))
def test_any_sps_bytes_give_a_size_within_bounds_or_a_codec_error(data: bytes) -> None:
    from castmesh.media.codecs import avc_dimensions

    try:
        width, height = avc_dimensions(b"\x67" + data)
    except CodecError:
        return
    assert 0 < width <= 16384 and 0 < height <= 16384


def test_enhanced_coded_frames_carry_a_composition_time_only_for_avc_and_hevc() -> None:
    """E-RTMP's CodedFrames: AVC and HEVC have an SI24 composition time before the data; AV1 and VP9 have
    their frame right after the FourCC (ffmpeg's FLV muxer writes VP9 keyframes as 0x91 'vp09' 0x82...)."""
    from castmesh.media.codecs import VideoSample, read_video

    vp9 = read_video(b"\x91vp09\x82\x49\x83\x42\x00")
    assert isinstance(vp9, VideoSample) and vp9.keyframe and vp9.composition_ms == 0
    assert bytes(vp9.data) == b"\x82\x49\x83\x42\x00"
    av1 = read_video(b"\xa1av01\x12\x00\x32\x05")
    assert isinstance(av1, VideoSample) and not av1.keyframe and bytes(av1.data) == b"\x12\x00\x32\x05"
    hevc = read_video(b"\x91hvc1\x00\x00\x21\x00\x00\x00\x02\x26\x01")
    assert isinstance(hevc, VideoSample) and hevc.composition_ms == 0x21
    assert bytes(hevc.data) == b"\x00\x00\x00\x02\x26\x01"


def test_enhanced_rtmp_opus_is_read_as_its_head_and_packets() -> None:
    """ffmpeg's FLV muxer writes Opus as 0x90 'Opus' OpusHead, 0x94 'Opus' (the channel layout), then
    0x91 'Opus' and one Opus packet per tag."""
    from castmesh.media.codecs import OPUS_HEAD, read_opus

    assert read_opus(b"\x90OpusOpusHead\x01\x01\x38\x01\x80\xbb\x00\x00") is OPUS_HEAD
    assert read_opus(b"\x94Opus\x01\x01\x00\x00\x00\x04") is None
    assert read_opus(b"\x91Opus\xf8\x72\x49") == b"\xf8\x72\x49"
    assert read_opus(b"\xaf\x01\x21\x10") is None  # AAC
    assert read_opus(b"\x91mp4a\x01\x02") is None
    with pytest.raises(CodecError):
        read_opus(b"\x91Opus")


def test_an_hevc_configuration_records_parameter_sets_are_read() -> None:
    from castmesh.media.codecs import VideoConfig, read_video

    vps, sps, pps = bytes.fromhex("40010c01ffff"), bytes.fromhex("420101016000"), bytes.fromhex("4401c172b4")
    arrays = b"".join(bytes((0x80 | (ps[0] >> 1),)) + b"\x00\x01" + len(ps).to_bytes(2, "big") + ps
                      for ps in (vps, sps, pps))
    record = bytes((1,)) + bytes(20) + b"\x0f" + b"\x03" + arrays
    config = read_video(b"\x1c\x00\x00\x00\x00" + record)  # legacy FLV HEVC (codec 12)
    assert isinstance(config, VideoConfig) and config.parameter_sets == (vps, sps, pps)
    assert config.nal_length_size == 4
    with pytest.raises(CodecError):
        read_video(b"\x1c\x00\x00\x00\x00" + record[:-3])
