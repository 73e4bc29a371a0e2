"""MPEG-TS (ISO 13818-1) writing for HLS: PAT and PMT with their CRC, PES packets with PTS/DTS, PCR on the
video PID, all cut into 188-byte packets. No IO and no decoding: callers hand over Annex-B access units and
ADTS frames with their 90 kHz timestamps.

Each HLS segment starts with a PAT and a PMT so that it can be played on its own; continuity counters run
on across segments, as they would in one long transport stream.
"""

from __future__ import annotations

PACKET = 188
PAT_PID, PMT_PID, VIDEO_PID, AUDIO_PID = 0x0000, 0x1000, 0x0100, 0x0101
STREAM_TYPE_H264, STREAM_TYPE_AAC_ADTS = 0x1B, 0x0F
VIDEO_STREAM_ID, AUDIO_STREAM_ID = 0xE0, 0xC0
TS_WRAP = 1 << 33


def _crc32_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc32_table()


def crc32_mpeg2(data: bytes) -> int:
    """The PSI section CRC: polynomial 0x04C11DB7, initial value all ones, not reflected, no final XOR."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[((crc >> 24) ^ byte) & 0xFF]
    return crc


def _timestamp(prefix: int, ts: int) -> bytes:
    ts %= TS_WRAP
    return bytes((
        (prefix << 4) | ((ts >> 29) & 0x0E) | 1,
        (ts >> 22) & 0xFF,
        ((ts >> 14) & 0xFE) | 1,
        (ts >> 7) & 0xFF,
        ((ts << 1) & 0xFE) | 1,
    ))


def _pcr(base: int) -> bytes:
    base %= TS_WRAP
    return bytes(((base >> 25) & 0xFF, (base >> 17) & 0xFF, (base >> 9) & 0xFF, (base >> 1) & 0xFF,
                  ((base & 1) << 7) | 0x7E, 0))


def pes(stream_id: int, payload: bytes, pts: int, dts: int | None = None) -> bytes:
    """A PES packet. Video PES have length 0 (unbounded, allowed in TS); audio PES carry their length."""
    if dts is not None and dts != pts:
        header = b"\x80\xc0\x0a" + _timestamp(3, pts) + _timestamp(1, dts)
    else:
        header = b"\x80\x80\x05" + _timestamp(2, pts)
    length = len(header) + len(payload)
    if stream_id == VIDEO_STREAM_ID or length > 0xFFFF:
        length = 0
    return b"\x00\x00\x01" + bytes((stream_id, length >> 8, length & 0xFF)) + header + payload


class TsWriter:
    """One transport stream with up to one H.264 and one AAC track."""

    def __init__(self, has_video: bool, has_audio: bool) -> None:
        self.has_video = has_video
        self.has_audio = has_audio
        self.pcr_pid = VIDEO_PID if has_video else AUDIO_PID
        self.counters: dict[int, int] = {}

    def tables(self) -> bytes:
        """PAT and PMT, one packet each."""
        pat = b"\x00\x01" + b"\x00\x01" + bytes((0xE0 | (PMT_PID >> 8), PMT_PID & 0xFF))  # ts id 1; program 1
        streams = b""
        if self.has_video:
            streams += bytes((STREAM_TYPE_H264, 0xE0 | (VIDEO_PID >> 8), VIDEO_PID & 0xFF, 0xF0, 0))
        if self.has_audio:
            streams += bytes((STREAM_TYPE_AAC_ADTS, 0xE0 | (AUDIO_PID >> 8), AUDIO_PID & 0xFF, 0xF0, 0))
        pmt = b"\x00\x01" + bytes((0xE0 | (self.pcr_pid >> 8), self.pcr_pid & 0xFF, 0xF0, 0)) + streams
        return self._section(PAT_PID, 0x00, pat) + self._section(PMT_PID, 0x02, pmt)

    def _section(self, pid: int, table_id: int, body: bytes) -> bytes:
        # table id, section length (body + version/section numbers + CRC), then id, version 0 current
        length = len(body) + 3 + 4
        head = bytes((table_id, 0xB0 | (length >> 8), length & 0xFF)) + body[:2] + b"\xc1\x00\x00"
        section = head + body[2:]
        section += crc32_mpeg2(section).to_bytes(4, "big")
        payload = b"\x00" + section  # pointer field
        return self._header(pid, True, 1) + payload.ljust(PACKET - 4, b"\xff")

    def video(self, access_unit: bytes, pts: int, dts: int, keyframe: bool) -> bytes:
        pcr = dts if self.pcr_pid == VIDEO_PID else None
        return self._packets(VIDEO_PID, pes(VIDEO_STREAM_ID, access_unit, pts, dts), pcr, keyframe)

    def audio(self, adts_frames: bytes, pts: int) -> bytes:
        pcr = pts if self.pcr_pid == AUDIO_PID else None
        return self._packets(AUDIO_PID, pes(AUDIO_STREAM_ID, adts_frames, pts), pcr, self.pcr_pid == AUDIO_PID)

    def _header(self, pid: int, start: bool, adaptation_control: int) -> bytes:
        cc = self.counters.get(pid, 0)
        self.counters[pid] = (cc + 1) & 0x0F
        return bytes((0x47, (0x40 if start else 0) | (pid >> 8), pid & 0xFF, (adaptation_control << 4) | cc))

    def _packets(self, pid: int, data: bytes, pcr: int | None, random_access: bool) -> bytes:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        first = True
        while first or pos < end:
            field: bytes | None = None  # the adaptation field after its length byte; None: no adaptation field
            if first and (pcr is not None or random_access):
                field = bytes(((0x40 if random_access else 0) | (0x10 if pcr is not None else 0),))
                if pcr is not None:
                    field += _pcr(pcr)
            room = PACKET - 4 - (0 if field is None else 1 + len(field))
            take = min(room, end - pos)
            short = room - take  # the last packet is filled up with adaptation field stuffing
            if short and field is None:
                field = b"" if short == 1 else b"\x00" + b"\xff" * (short - 2)
            elif short and field is not None:
                field += b"\xff" * short
            if field is None:
                out.append(self._header(pid, first, 1))
            else:
                out.append(self._header(pid, first, 3) + bytes((len(field),)) + field)
            out.append(view[pos:pos + take])
            pos += take
            first = False
        return b"".join(out)
