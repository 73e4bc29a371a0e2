"""Elementary streams into castmesh's frames (FLV tag bodies, as RTMP carries them): Annex-B H.264 and HEVC
access units, ADTS AAC, Opus. What MPEG-TS (SRT) and RTP (WHIP) bring in becomes the same frames an RTMP
publisher sends: onMetaData and a sequence header whenever the parameter sets change, then each picture
as length-prefixed NAL units with its composition time; AAC as its AudioSpecificConfig, then raw frames;
Opus as enhanced RTMP's (an OpusHead, then the packets).
H.264 uses the legacy FLV codec id 7; HEVC the enhanced-RTMP form (FourCC hvc1), as OBS sends it.

No IO: a packer is handed access units with their times in ms and returns (kind, ms, payload) triples.
"""

from __future__ import annotations

from typing import Any

from castmesh.media import amf0
from castmesh.media.codecs import AAC_SAMPLE_RATES, Bits, CodecError, avc_dimensions
from castmesh.media.frames import AUDIO, DATA, VIDEO, audio_is_config
from castmesh.media.mpegts import AUDIO_KINDS, Pes, TsReader

MAX_NAL_UNITS = 4096  # per access unit; a real encoder writes a handful
Packed = tuple[int, int, bytes]  # (frame kind, ms, FLV tag body)

H264_IDR, H264_SEI, H264_SPS, H264_PPS, H264_AUD = 5, 6, 7, 8, 9
HEVC_VPS, HEVC_SPS, HEVC_PPS, HEVC_AUD = 32, 33, 34, 35
HEVC_IRAP = range(16, 24)  # BLA, IDR, CRA and reserved IRAP types: a picture that decodes alone


def nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B access unit (start codes of 3 or 4 bytes), empty ones left out."""
    units: list[bytes] = []
    starts: list[tuple[int, int]] = []  # (start code position, payload position)
    at = data.find(b"\x00\x00\x01")
    while at >= 0:
        starts.append((at - 1 if at > 0 and data[at - 1] == 0 else at, at + 3))
        if len(starts) > MAX_NAL_UNITS:
            raise CodecError(f"more than {MAX_NAL_UNITS} NAL units in one access unit")
        at = data.find(b"\x00\x00\x01", at + 3)
    for i, (_, begin) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(data)
        unit = data[begin:end].rstrip(b"\x00")  # trailing_zero_8bits belong to no NAL unit
        if unit:
            units.append(unit)
    return units


def avc_record(sps: bytes, pps: bytes) -> bytes:
    """An AVCDecoderConfigurationRecord (ISO 14496-15 5.3.3.1) for one SPS and one PPS, 4-byte lengths."""
    if len(sps) < 4:
        raise CodecError("SPS shorter than its profile and level")
    return (bytes((1, sps[1], sps[2], sps[3], 0xFF, 0xE1)) + len(sps).to_bytes(2, "big") + sps
            + b"\x01" + len(pps).to_bytes(2, "big") + pps)


def hevc_record(vps: bytes, sps: bytes, pps: bytes) -> bytes:
    """An HEVCDecoderConfigurationRecord (ISO 14496-15 8.3.3.1) for one VPS, SPS and PPS: the profile,
    tier and level copied from the SPS's profile_tier_level, chroma format and bit depths read from it,
    4-byte lengths."""
    bits = Bits(sps[2:])  # after the two-byte NAL header
    bits.bits(4)  # sps_video_parameter_set_id
    sub_layers = bits.bits(3)
    nested = bits.bit()
    ptl = bytes(bits.bits(8) for _ in range(12))  # general profile/tier/idc, 32 compat flags, 48 constraints, level
    present = [(bits.bit(), bits.bit()) for _ in range(sub_layers)]
    if sub_layers:
        bits.bits(2 * (8 - sub_layers))
    for profile, level in present:
        bits.bits(88 if profile else 0)
        bits.bits(8 if level else 0)
    bits.ue()  # sps_seq_parameter_set_id
    chroma = bits.ue()
    if chroma > 3:
        raise CodecError(f"HEVC chroma_format_idc {chroma}")
    if chroma == 3:
        bits.bit()
    bits.ue()  # width
    bits.ue()  # height
    if bits.bit():  # conformance window
        for _ in range(4):
            bits.ue()
    luma, chroma_depth = bits.ue(), bits.ue()
    if luma > 8 or chroma_depth > 8:
        raise CodecError("HEVC bit depth over 16")
    head = (bytes((1,)) + ptl + bytes((0xF0, 0x00, 0xFC, 0xFC | chroma, 0xF8 | luma, 0xF8 | chroma_depth, 0, 0))
            + bytes(((sub_layers + 1) << 3 | nested << 2 | 0x03, 3)))
    arrays = b"".join(bytes((0x80 | kind,)) + b"\x00\x01" + len(unit).to_bytes(2, "big") + unit
                      for kind, unit in ((HEVC_VPS, vps), (HEVC_SPS, sps), (HEVC_PPS, pps)))
    return head + arrays


class VideoPacker:
    """Annex-B access units of one track ("h264" or "hevc") into video frames."""

    def __init__(self, codec: str, encoder: str = "castmesh", audio: dict[str, Any] | None = None) -> None:
        self.codec = codec
        self.encoder = encoder
        self.audio = audio  # onMetaData's audio fields, if the stream has audio
        self.parameter_sets: tuple[bytes, ...] | None = None
        self.dropped = 0  # pictures before the first parameter sets

    def push(self, ms: int, cts: int, units: list[bytes]) -> list[Packed]:
        out: list[Packed] = []
        hevc = self.codec == "hevc"
        kinds = [(u[0] >> 1) & 0x3F if hevc else u[0] & 0x1F for u in units]
        wanted = (HEVC_VPS, HEVC_SPS, HEVC_PPS) if hevc else (H264_SPS, H264_PPS)
        sets = tuple(next((u for u, k in zip(units, kinds, strict=True) if k == want), b"") for want in wanted) \
            if wanted[-1] in kinds else ()  # most pictures carry none
        if sets and all(sets) and sets != self.parameter_sets:
            record = hevc_record(*sets) if hevc else avc_record(*sets)
            self.parameter_sets = sets
            out.append((DATA, ms, self._metadata(sets[0 if not hevc else 1])))
            out.append((VIDEO, ms, (b"\x90hvc1" if hevc else b"\x17\x00\x00\x00\x00") + record))
        if self.parameter_sets is None:
            self.dropped += 1
            return out  # nothing decodes before the parameter sets
        skip = (HEVC_VPS, HEVC_SPS, HEVC_PPS, HEVC_AUD) if hevc else (H264_SPS, H264_PPS, H264_AUD)
        body = b"".join(len(u).to_bytes(4, "big") + u for u, k in zip(units, kinds, strict=True) if k not in skip)
        if not body:
            return out
        key = any(k in HEVC_IRAP for k in kinds) if hevc else H264_IDR in kinds
        composition = (cts & 0xFFFFFF).to_bytes(3, "big")
        if hevc:  # enhanced RTMP: frame type, CodedFrames, FourCC, SI24 composition time
            out.append((VIDEO, ms, bytes((0x80 | (0x10 if key else 0x20) | 1,)) + b"hvc1" + composition + body))
        else:
            out.append((VIDEO, ms, bytes((0x17 if key else 0x27, 1)) + composition + body))
        return out

    def _metadata(self, sps: bytes) -> bytes:
        """onMetaData, as an RTMP encoder sends it: codecs and the picture's size (which the listings show
        and HLS's fMP4 init segment carries)."""
        meta: dict[str, Any] = {"videocodecid": 12.0 if self.codec == "hevc" else 7.0, "encoder": self.encoder}
        if self.codec == "h264":
            try:
                meta["width"], meta["height"] = (float(v) for v in avc_dimensions(sps))
            except CodecError:
                pass  # a size is nice to have; the stream plays without it
        return amf0.encode("onMetaData", meta | (self.audio or {}))


class AdtsPacker:
    """ADTS AAC (one or more frames per PES) into audio frames: the AudioSpecificConfig whenever the ADTS
    headers change, then each raw frame at its own time (1024 samples after the one before)."""

    def __init__(self) -> None:
        self.config: bytes | None = None
        self.errors = 0

    def push(self, ms: float, data: bytes) -> list[Packed]:
        out: list[Packed] = []
        at = 0
        while at + 7 <= len(data):
            if data[at] != 0xFF or data[at + 1] & 0xF6 != 0xF0:
                self.errors += 1
                break  # lost sync in this PES: the next PES starts afresh
            profile, index = (data[at + 2] >> 6) + 1, (data[at + 2] >> 2) & 0x0F
            channels = ((data[at + 2] & 0x01) << 2) | (data[at + 3] >> 6)
            length = ((data[at + 3] & 0x03) << 11) | (data[at + 4] << 3) | (data[at + 5] >> 5)
            header = 7 if data[at + 1] & 0x01 else 9  # protection_absent, else a CRC follows
            if index >= len(AAC_SAMPLE_RATES) or length < header or at + length > len(data):
                self.errors += 1
                break
            config = bytes(((profile << 3) | (index >> 1), ((index & 1) << 7) | (channels << 3)))
            if config != self.config:
                self.config = config
                out.append((AUDIO, int(ms), b"\xaf\x00" + config))
            out.append((AUDIO, int(ms), b"\xaf\x01" + data[at + header:at + length]))
            ms += 1024 * 1000 / AAC_SAMPLE_RATES[index]
            at += length
        return out


def opus_head(channels: int) -> bytes:
    """An OpusHead (RFC 7845 5.1) for mapping family 0: version 1, 312 samples of pre-skip (libopus's
    encoder delay at 48 kHz), 48 kHz, no gain."""
    return b"OpusHead" + bytes((1, channels)) + (312).to_bytes(2, "little") + (48000).to_bytes(4, "little") \
        + b"\x00\x00\x00"


def opus_duration_ms(packet: bytes) -> float:
    """How long an Opus packet plays, from its TOC byte (RFC 6716 3.1): frame size by configuration, times
    the frame count."""
    toc = packet[0]
    config = toc >> 3
    size: float
    if config < 12:
        size = (10, 20, 40, 60)[config % 4]
    elif config < 16:
        size = (10, 20)[config % 2]
    else:
        size = (2.5, 5, 10, 20)[config % 4]
    code = toc & 0x03
    frames = 1 if code == 0 else 2 if code < 3 else (packet[1] & 0x3F if len(packet) > 1 else 1)
    return size * frames


class OpusPacker:
    """Opus in MPEG-TS (the mapping ffmpeg writes: each packet behind a control header, 0x7FE0 with trim
    and extension flags, its size in bytes of 255 and a remainder, then the optional trims and extension)
    into enhanced RTMP audio (FourCC Opus): the OpusHead sequence start first, then each packet at its own
    time. The channel count comes from the PMT's descriptor."""

    def __init__(self, channels: int = 2) -> None:
        self.channels = channels
        self.config: bytes | None = None
        self.errors = 0

    def push(self, ms: float, data: bytes) -> list[Packed]:
        out: list[Packed] = []
        if self.config is None:
            self.config = opus_head(self.channels)
            out.append((AUDIO, int(ms), b"\x90Opus" + self.config))
        at, end = 0, len(data)
        while at + 2 <= end:
            if data[at] != 0x7F or data[at + 1] & 0xE0 != 0xE0:
                self.errors += 1
                break  # not a control header: the rest of this PES is lost
            flags = data[at + 1]
            at += 2
            size = 0
            while at < end:
                size += data[at]
                at += 1
                if data[at - 1] != 0xFF:
                    break
            at += (2 if flags & 0x10 else 0) + (2 if flags & 0x08 else 0)  # start and end trims
            if flags & 0x04 and at < end:
                at += 1 + data[at]  # the control extension
            if size == 0 or at + size > end:
                self.errors += 1
                break
            packet = data[at:at + size]
            at += size
            out.append((AUDIO, int(ms), b"\x91Opus" + packet))
            ms += opus_duration_ms(packet)
        return out


TS_WRAP = 1 << 33
AUDIO_METADATA = {"aac": {"audiocodecid": 10.0}, "opus": {"audiocodecid": float(int.from_bytes(b"Opus", "big"))}}
MAX_AHEAD = 300  # frames held back waiting for the audio track's first frame (a few seconds of video)


class TsFrames:
    """An MPEG-TS byte stream (SRT's payload) into frames: the first program's H.264 or HEVC and AAC.

    Timestamps: the 33-bit 90 kHz clock is unwrapped (a step of under 2^32 ticks either way is a step,
    not a wrap) and counted from the first PES seen, in ms, never below 0; the feed's jitter rules then
    treat them as they treat RTMP's."""

    def __init__(self, encoder: str = "castmesh") -> None:
        self.reader = TsReader()
        self.encoder = encoder
        self.video: VideoPacker | None = None
        self.audio = AdtsPacker()
        self.opus: OpusPacker | None = None
        self.origin: int | None = None
        self.last_raw = 0
        self.clock = 0  # unwrapped 90 kHz
        self.bad_media = 0  # PES packets whose contents did not parse (NAL units, parameter sets)
        self.holding: list[Packed] | None = []  # frames held until the audio track's first frame; None: done

    @property
    def errors(self) -> int:
        return self.reader.errors + self.audio.errors + (self.opus.errors if self.opus else 0) + self.bad_media

    def feed(self, data: bytes) -> list[Packed]:
        out: list[Packed] = []
        for pes in self.reader.feed(data):
            try:
                self._pes(pes, out)
            except CodecError:
                self.bad_media += 1  # that access unit is lost; the next one may decode
        return self._in_order(out)

    def flush(self) -> list[Packed]:
        """The frames of the PES packets still being gathered (at the end of the stream)."""
        out: list[Packed] = []
        for pes in self.reader.flush():
            try:
                self._pes(pes, out)
            except CodecError:
                self.bad_media += 1
        return self._in_order(out)

    def _in_order(self, out: list[Packed]) -> list[Packed]:
        """Both sequence headers before any picture, as an RTMP publisher sends them: while the PMT names an
        AAC track whose first frame has not come, video waits (at most MAX_AHEAD frames; then it goes
        alone, and audio that starts later is a new track to the muxers)."""
        if self.holding is None:
            return out
        self.holding += out
        audio_known = self.audio.config is not None or (self.opus is not None and self.opus.config is not None)
        has_audio = any(kind in AUDIO_KINDS for kind in self.reader.tracks.values())
        if not audio_known and has_audio and len(self.holding) < MAX_AHEAD:
            return []
        held, self.holding = self.holding, None
        configs = [p for p in held if p[0] == AUDIO and audio_is_config(p[2])]
        return configs + [p for p in held if not (p[0] == AUDIO and audio_is_config(p[2]))]

    def _ms(self, ts: int) -> float:
        if self.origin is None:
            self.origin = self.clock = self.last_raw = ts
        step = (ts - self.last_raw) % TS_WRAP
        if step >= TS_WRAP >> 1:
            step -= TS_WRAP  # backwards: B-frames' PTS, or audio behind video
        self.last_raw = ts
        self.clock += step
        return max(0.0, (self.clock - self.origin) / 90)

    def _pes(self, pes: Pes, out: list[Packed]) -> None:
        if pes.kind == "aac":
            out += self.audio.push(self._ms(pes.pts), pes.data)
            return
        if pes.kind == "opus":
            if self.opus is None:
                self.opus = OpusPacker(self.reader.opus_channels)
            out += self.opus.push(self._ms(pes.pts), pes.data)
            return
        if self.video is None or self.video.codec != pes.kind:
            audio = next((kind for kind in self.reader.tracks.values() if kind in AUDIO_KINDS), None)
            self.video = VideoPacker(pes.kind, self.encoder, AUDIO_METADATA.get(audio or ""))
        dts = self._ms(pes.dts)
        offset = (pes.pts - pes.dts) % TS_WRAP  # PTS before DTS is an encoder's error: taken as 0
        ms = round(dts)
        cts = round(dts + offset / 90) - ms if offset < 1 << 23 else 0  # both rounded alike: PTS order holds
        out += self.video.push(ms, cts, nal_units(pes.data))
