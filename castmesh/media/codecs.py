"""What a container muxer needs from FLV tag bodies: codec configuration and the coded samples, split out
without decoding anything.

Video: legacy FLV AVC (codec 7) and HEVC (codec 12, the common extension), and enhanced RTMP (hvc1, av01,
vp09, avc1 FourCCs). Samples stay in the length-prefixed form FLV carries (AVCC/HVCC), which is what MP4
wants; MPEG-TS turns them into Annex-B with `annex_b`. Audio: AAC, whose AudioSpecificConfig is read for
the ADTS header MPEG-TS needs.

Every reader checks lengths and raises CodecError on truncated or inconsistent input: a muxer drops that
frame and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass

_AVC, _HEVC_LEGACY = 7, 12
_AAC, _AUDIO_EX_HEADER = 10, 9  # FLV SoundFormat: AAC; enhanced RTMP v2's ExHeader (a FourCC follows)
_EX_SEQUENCE_START, _EX_CODED_FRAMES, _EX_SEQUENCE_END, _EX_CODED_FRAMES_X = 0, 1, 2, 3
_FOURCCS = {b"avc1": "avc1", b"hvc1": "hvc1", b"av01": "av01", b"vp09": "vp09"}
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
MAX_NAL_UNITS = 4096  # per frame; a real encoder writes a handful


class CodecError(ValueError):
    """A tag body that does not hold what its header says."""


@dataclass(slots=True, frozen=True)
class VideoConfig:
    codec: str  # the MP4 sample entry: avc1, hvc1, av01, vp09
    record: bytes  # the decoder configuration record (avcC, hvcC, av1C, vpcC box body)
    nal_length_size: int = 4
    parameter_sets: tuple[bytes, ...] = ()  # AVC: SPS then PPS; HEVC: VPS, SPS, PPS (as NAL units)


@dataclass(slots=True)
class VideoSample:
    """One coded picture: `data` is length-prefixed NAL units (AV1/VP9: the raw frame)."""

    keyframe: bool
    composition_ms: int
    data: bytes


@dataclass(slots=True, frozen=True)
class AudioConfig:
    codec: str  # "mp4a"
    object_type: int
    sample_rate: int
    rate_index: int
    channels: int
    record: bytes  # AudioSpecificConfig


def _s24(b: bytes | memoryview, at: int) -> int:
    value = (b[at] << 16) | (b[at + 1] << 8) | b[at + 2]
    return value - (1 << 24) if value & 0x800000 else value


def read_video(payload: bytes) -> VideoConfig | VideoSample | None:
    """A video tag body as a configuration, a sample, or None (sequence end, metadata, unsupported codec)."""
    if len(payload) < 2:
        raise CodecError("video tag shorter than its header")
    b0 = payload[0]
    if b0 & 0x80:  # enhanced RTMP: ExVideoTagHeader with a FourCC
        if len(payload) < 5:
            raise CodecError("enhanced video tag shorter than its FourCC")
        packet_type, frame_type = b0 & 0x0F, (b0 >> 4) & 0x07
        codec = _FOURCCS.get(bytes(payload[1:5]))
        if codec is None:
            return None
        if packet_type == _EX_SEQUENCE_START:
            return _video_config(codec, payload[5:])
        if packet_type == _EX_CODED_FRAMES and codec in ("avc1", "hvc1"):  # these two carry a composition time
            if len(payload) < 8:
                raise CodecError("enhanced coded frame shorter than its composition time")
            return VideoSample(frame_type == 1, _s24(payload, 5), payload[8:])
        if packet_type == _EX_CODED_FRAMES:  # AV1, VP9: the frame right after the FourCC
            return VideoSample(frame_type == 1, 0, payload[5:])
        if packet_type == _EX_CODED_FRAMES_X:
            return VideoSample(frame_type == 1, 0, payload[5:])
        return None
    frame_type, codec_id = b0 >> 4, b0 & 0x0F
    if codec_id not in (_AVC, _HEVC_LEGACY):
        return None
    if len(payload) < 5:
        raise CodecError("AVC/HEVC tag shorter than its 5-byte header")
    codec = "avc1" if codec_id == _AVC else "hvc1"
    if payload[1] == 0:
        return _video_config(codec, payload[5:])
    if payload[1] == 1:
        return VideoSample(frame_type == 1, _s24(payload, 2), payload[5:])
    return None


def _video_config(codec: str, record: bytes) -> VideoConfig:
    if codec == "avc1":
        return _avc_config(record)
    if codec == "hvc1":
        if len(record) < 23:
            raise CodecError("HEVC decoder configuration record shorter than 23 bytes")
        return VideoConfig(codec, bytes(record), (record[21] & 0x03) + 1, _hevc_parameter_sets(record))
    if not record:
        raise CodecError(f"empty {codec} configuration record")
    return VideoConfig(codec, bytes(record), 4)


def _hevc_parameter_sets(record: bytes) -> tuple[bytes, ...]:
    """The NAL units of an HEVCDecoderConfigurationRecord's arrays (ISO 14496-15 8.3.3.1: VPS, SPS, PPS
    and SEI as the encoder put them), in order."""
    sets: list[bytes] = []
    pos, arrays = 23, record[22]
    for _ in range(arrays):
        if pos + 3 > len(record):
            raise CodecError("HEVC configuration record ends inside its arrays")
        count = int.from_bytes(record[pos + 1:pos + 3], "big")
        pos += 3
        for _ in range(count):
            if pos + 2 > len(record):
                raise CodecError("HEVC parameter set length past the record's end")
            size = int.from_bytes(record[pos:pos + 2], "big")
            pos += 2
            if size < 2 or pos + size > len(record):
                raise CodecError("HEVC parameter set past the record's end")
            sets.append(bytes(record[pos:pos + size]))
            pos += size
    return tuple(sets)


def _avc_config(record: bytes) -> VideoConfig:
    """AVCDecoderConfigurationRecord (ISO 14496-15 5.3.3.1): version, profile, compat, level,
    lengthSizeMinusOne, SPS count and list, PPS count and list."""
    if len(record) < 7 or record[0] != 1:
        raise CodecError("AVC decoder configuration record is truncated or not version 1")
    sets: list[bytes] = []
    pos = 5
    for count_mask in (0x1F, 0xFF):
        if pos >= len(record):
            raise CodecError("AVC decoder configuration record ends before its parameter sets")
        count = record[pos] & count_mask
        pos += 1
        for _ in range(count):
            if pos + 2 > len(record):
                raise CodecError("AVC parameter set length past the record's end")
            size = (record[pos] << 8) | record[pos + 1]
            pos += 2
            if size == 0 or pos + size > len(record):
                raise CodecError("AVC parameter set past the record's end")
            sets.append(bytes(record[pos:pos + size]))
            pos += size
    return VideoConfig("avc1", bytes(record), (record[4] & 0x03) + 1, tuple(sets))


def nal_units(data: bytes, length_size: int) -> list[memoryview]:
    """The NAL units of a length-prefixed sample."""
    view = memoryview(data)
    units: list[memoryview] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + length_size > end:
            raise CodecError("NAL unit length past the sample's end")
        size = int.from_bytes(view[pos:pos + length_size], "big")
        pos += length_size
        if pos + size > end:
            raise CodecError(f"NAL unit of {size} bytes past the sample's end")
        units.append(view[pos:pos + size])
        pos += size
        if len(units) > MAX_NAL_UNITS:
            raise CodecError(f"more than {MAX_NAL_UNITS} NAL units in one sample")
    return units


_START = b"\x00\x00\x00\x01"
# Per codec: the access unit delimiter (pictures of any type), the first parameter set's NAL type (SPS;
# HEVC: VPS), the delimiter's NAL type, and the NAL type of a unit's first byte.
_ANNEX_B = {
    "avc1": (_START + b"\x09\xf0", 7, 9, lambda b: b & 0x1F),
    "hvc1": (_START + b"\x46\x01\x50", 32, 35, lambda b: (b >> 1) & 0x3F),
}


def annex_b(sample: VideoSample, config: VideoConfig) -> bytes:
    """An H.264 or HEVC access unit as MPEG-TS carries it: an access unit delimiter, the parameter sets
    before every keyframe (a player may start at any segment), then each NAL unit behind a start code."""
    delimiter, first_set, delimiter_type, nal_type = _ANNEX_B[config.codec]
    units = nal_units(sample.data, config.nal_length_size)
    out: list[bytes | memoryview] = [delimiter]
    if sample.keyframe and not any(nal_type(u[0]) == first_set for u in units if len(u)):
        for ps in config.parameter_sets:
            out += (_START, ps)
    for unit in units:
        if len(unit) and nal_type(unit[0]) != delimiter_type:
            out += (_START, unit)
    return b"".join(out)


def read_audio(payload: bytes) -> AudioConfig | bytes | None:
    """An audio tag body as an AAC configuration, a raw AAC frame, or None (another codec)."""
    if not payload:
        raise CodecError("empty audio tag")
    if payload[0] >> 4 != _AAC:
        return None
    if len(payload) < 2:
        raise CodecError("AAC tag shorter than its 2-byte header")
    if payload[1] == 0:
        return aac_config(payload[2:])
    return payload[2:]


OPUS_HEAD = True  # what read_opus says of an Opus sequence start


def read_opus(payload: bytes) -> bytes | bool | None:
    """Enhanced RTMP v2 Opus audio (SoundFormat 9, FourCC 'Opus', as ffmpeg's FLV muxer and OBS write it):
    OPUS_HEAD for its sequence start (the OpusHead header), an Opus packet for a coded frame, None for
    anything else (another codec, or a packet type that carries no audio, like the channel layout)."""
    if len(payload) < 5 or payload[0] >> 4 != _AUDIO_EX_HEADER or payload[1:5] != b"Opus":
        return None
    packet_type = payload[0] & 0x0F
    if packet_type == _EX_SEQUENCE_START:
        return OPUS_HEAD
    if packet_type == _EX_CODED_FRAMES:
        if len(payload) == 5:
            raise CodecError("empty Opus frame")
        return bytes(payload[5:])
    return None


def aac_config(asc: bytes) -> AudioConfig:
    """The parts of an AudioSpecificConfig (ISO 14496-3 1.6.2.1) that ADTS and MP4 need. For HE-AAC
    (explicit SBR/PS signalling) this is the core AAC-LC layer, which is what ADTS describes."""
    head = bytes(asc[:16])  # every field read here lies in the first 12 bytes
    bits, remaining = int.from_bytes(head, "big"), len(head) * 8

    def take(n: int) -> int:
        nonlocal remaining
        if n > remaining:
            raise CodecError("AudioSpecificConfig is truncated")
        remaining -= n
        return (bits >> remaining) & ((1 << n) - 1)

    def object_type() -> int:
        aot = take(5)
        return 32 + take(6) if aot == 31 else aot

    def rate() -> tuple[int, int]:
        index = take(4)
        if index == 15:
            explicit = take(24)
            nearest = min(range(len(AAC_SAMPLE_RATES)), key=lambda i: abs(AAC_SAMPLE_RATES[i] - explicit))
            return explicit, nearest
        if index >= len(AAC_SAMPLE_RATES):
            raise CodecError(f"AAC sampling frequency index {index} is reserved")
        return AAC_SAMPLE_RATES[index], index

    aot = object_type()
    sample_rate, index = rate()
    channels = take(4)
    if aot in (5, 29):  # SBR / PS: the extension rate, then the core object type
        rate()
        aot = object_type()
    if not 1 <= aot <= 4:
        aot = 2  # ADTS can only say Main, LC, SSR or LTP; players treat others as LC
    if channels == 0 or channels > 7:
        raise CodecError(f"AAC channel configuration {channels} is not supported")
    return AudioConfig("mp4a", aot, sample_rate, index, channels, bytes(asc))


def adts_header(config: AudioConfig, frame_size: int) -> bytes:
    """The 7-byte ADTS header (no CRC) for one raw AAC frame."""
    length = frame_size + 7
    if length > 0x1FFF:
        raise CodecError(f"AAC frame of {frame_size} bytes does not fit ADTS")
    profile = config.object_type - 1
    return bytes((
        0xFF, 0xF1,
        (profile << 6) | (config.rate_index << 2) | (config.channels >> 2),
        ((config.channels & 0x03) << 6) | (length >> 11),
        (length >> 3) & 0xFF,
        ((length & 0x07) << 5) | 0x1F,
        0xFC,
    ))


class Bits:
    """An H.264 RBSP read bit by bit (emulation prevention bytes removed), bounded by its length."""

    def __init__(self, nal: bytes) -> None:
        self.data = nal.replace(b"\x00\x00\x03", b"\x00\x00")
        self.pos = 0

    def bit(self) -> int:
        if self.pos >= len(self.data) * 8:
            raise CodecError("SPS ends early")
        value = (self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return value

    def bits(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | self.bit()
        return value

    def ue(self) -> int:
        zeros = 0
        while not self.bit():
            zeros += 1
            if zeros > 31:
                raise CodecError("Exp-Golomb code over 32 bits in the SPS")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


def avc_dimensions(sps: bytes) -> tuple[int, int]:
    """Width and height of the pictures an H.264 SPS NAL unit describes (ITU-T H.264 7.3.2.1.1), cropped."""
    bits = Bits(sps[1:])
    profile = bits.bits(8)
    bits.bits(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    chroma = 1
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma = bits.ue()
        if chroma > 3:
            raise CodecError(f"chroma_format_idc {chroma}")
        if chroma == 3:
            bits.bit()  # separate_colour_plane_flag
        bits.ue()  # bit depths
        bits.ue()
        bits.bit()
        if bits.bit():  # seq_scaling_matrix_present_flag
            for i in range(12 if chroma == 3 else 8):
                if bits.bit():
                    last = next_scale = 8
                    for _ in range(16 if i < 6 else 64):
                        if next_scale:
                            next_scale = (last + bits.se()) % 256
                        last = next_scale or last
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.bit()
        bits.se()
        bits.se()
        cycle = bits.ue()
        if cycle > 255:
            raise CodecError("too many reference frames in a picture order count cycle")
        for _ in range(cycle):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.bit()
    width_mbs, height_units = bits.ue() + 1, bits.ue() + 1
    frame_mbs_only = bits.bit()
    if not frame_mbs_only:
        bits.bit()
    bits.bit()  # direct_8x8_inference_flag
    crop = (bits.ue(), bits.ue(), bits.ue(), bits.ue()) if bits.bit() else (0, 0, 0, 0)
    unit_x = 1 if chroma in (0, 3) else 2
    unit_y = (2 if chroma == 1 else 1) * (2 - frame_mbs_only)
    width = width_mbs * 16 - (crop[0] + crop[1]) * unit_x
    height = (2 - frame_mbs_only) * height_units * 16 - (crop[2] + crop[3]) * unit_y
    if not (0 < width <= 16384 and 0 < height <= 16384):
        raise CodecError(f"SPS says {width}x{height}")
    return width, height
