"""MPEG-TS (ISO 13818-1) writing for HLS: PAT and PMT with their CRC, PES packets with PTS/DTS, PCR on the
video PID, all cut into 188-byte packets. No IO and no decoding: callers hand over Annex-B access units and
ADTS frames with their 90 kHz timestamps.

Each HLS segment starts with a PAT and a PMT so that it can be played on its own; continuity counters run
on across segments, as they would in one long transport stream.
"""

from __future__ import annotations

PACKET = 188
PAT_PID, PMT_PID, VIDEO_PID, AUDIO_PID = 0x0000, 0x1000, 0x0100, 0x0101
STREAM_TYPE_H264, STREAM_TYPE_HEVC, STREAM_TYPE_AAC_ADTS = 0x1B, 0x24, 0x0F
VIDEO_STREAM_ID, AUDIO_STREAM_ID, PRIVATE_STREAM_ID = 0xE0, 0xC0, 0xBD
STREAM_TYPE_PRIVATE = 0x06  # PES private data: Opus, by its registration descriptor
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
    """One transport stream with up to one video track (H.264, or HEVC with `video_type`) and one AAC track.
    `version` is the PMT's: a stream whose tracks change says so with new tables of the next version."""

    def __init__(self, has_video: bool, has_audio: bool, video_type: int = STREAM_TYPE_H264,
                 version: int = 0, counters: dict[int, int] | None = None, opus_channels: int = 0) -> None:
        self.has_video = has_video
        self.has_audio = has_audio
        self.video_type = video_type
        self.opus_channels = opus_channels  # not 0: the audio track is Opus (private data, as ffmpeg maps it)
        self.version = version & 0x1F
        self.pcr_pid = VIDEO_PID if has_video else AUDIO_PID
        self.counters: dict[int, int] = counters if counters is not None else {}

    def tables(self) -> bytes:
        """PAT and PMT, one packet each."""
        pat = b"\x00\x01" + b"\x00\x01" + bytes((0xE0 | (PMT_PID >> 8), PMT_PID & 0xFF))  # ts id 1; program 1
        streams = b""
        if self.has_video:
            streams += bytes((self.video_type, 0xE0 | (VIDEO_PID >> 8), VIDEO_PID & 0xFF, 0xF0, 0))
        if self.has_audio and self.opus_channels:
            descriptors = b"\x05\x04Opus" + b"\x7f\x02\x80" + bytes((self.opus_channels,))
            streams += bytes((STREAM_TYPE_PRIVATE, 0xE0 | (AUDIO_PID >> 8), AUDIO_PID & 0xFF, 0xF0,
                              len(descriptors))) + descriptors
        elif self.has_audio:
            streams += bytes((STREAM_TYPE_AAC_ADTS, 0xE0 | (AUDIO_PID >> 8), AUDIO_PID & 0xFF, 0xF0, 0))
        pmt = b"\x00\x01" + bytes((0xE0 | (self.pcr_pid >> 8), self.pcr_pid & 0xFF, 0xF0, 0)) + streams
        return self._section(PAT_PID, 0x00, pat) + self._section(PMT_PID, 0x02, pmt)

    def _section(self, pid: int, table_id: int, body: bytes) -> bytes:
        # table id, section length (body + version/section numbers + CRC), then id, version 0 current
        length = len(body) + 3 + 4
        version = 0xC1 | (self.version << 1) if table_id == 0x02 else 0xC1  # reserved bits, version, current
        head = bytes((table_id, 0xB0 | (length >> 8), length & 0xFF)) + body[:2] + bytes((version, 0, 0))
        section = head + body[2:]
        section += crc32_mpeg2(section).to_bytes(4, "big")
        payload = b"\x00" + section  # pointer field
        return self._header(pid, True, 1) + payload.ljust(PACKET - 4, b"\xff")

    def video(self, access_unit: bytes, pts: int, dts: int, keyframe: bool) -> bytes:
        pcr = dts if self.pcr_pid == VIDEO_PID else None
        return self._packets(VIDEO_PID, pes(VIDEO_STREAM_ID, access_unit, pts, dts), pcr, keyframe)

    def audio(self, frames: bytes, pts: int) -> bytes:
        """ADTS AAC frames, or Opus packets behind their control headers (opus_access_unit)."""
        pcr = pts if self.pcr_pid == AUDIO_PID else None
        stream_id = PRIVATE_STREAM_ID if self.opus_channels else AUDIO_STREAM_ID
        return self._packets(AUDIO_PID, pes(stream_id, frames, pts), pcr, self.pcr_pid == AUDIO_PID)

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


def opus_access_unit(packet: bytes) -> bytes:
    """An Opus packet as MPEG-TS carries it: the control header (0x7FE0, no trims) and its size in bytes of
    255 and a remainder (TsFrames' OpusPacker reads it back)."""
    size = len(packet)
    return b"\x7f\xe0" + b"\xff" * (size // 255) + bytes((size % 255,)) + packet


def lead_into(data: bytes, counters: dict[int, int]) -> bytes:
    """`data` (whole packets) with its continuity counters renumbered so that each PID's last packet comes
    right before `counters` (each PID's next counter): bytes made apart, such as a joining viewer's start,
    followed without a break by a stream already under way."""
    packets = len(data) // PACKET
    total: dict[int, int] = {}
    for at in range(0, packets * PACKET, PACKET):
        pid = ((data[at + 1] & 0x1F) << 8) | data[at + 2]
        total[pid] = total.get(pid, 0) + 1
    out = bytearray(data)
    seen: dict[int, int] = {}
    for at in range(0, packets * PACKET, PACKET):
        pid = ((out[at + 1] & 0x1F) << 8) | out[at + 2]
        index = seen.get(pid, 0)
        seen[pid] = index + 1
        cc = (counters.get(pid, 0) - total[pid] + index) & 0x0F
        out[at + 3] = (out[at + 3] & 0xF0) | cc
    return bytes(out)


# Reading ----------------------------------------------------------------------------------------------
READ_TYPES = {STREAM_TYPE_H264: "h264", STREAM_TYPE_HEVC: "hevc", STREAM_TYPE_AAC_ADTS: "aac"}
AUDIO_KINDS = ("aac", "opus")
MAX_PES = 8 << 20  # bytes of one PES packet: a 4K keyframe is a few MB
MAX_SECTION = 1024  # PAT and PMT sections: ISO 13818-1 caps them at 1021 bytes
MAX_TRACKS = 8  # elementary streams taken from one PMT


class TsError(ValueError):
    """Input that is not a transport stream at all (no sync to be found)."""


class Pes:
    """One elementary stream packet: its track ("h264", "hevc", "aac", "opus"), 90 kHz PTS and DTS, and
    payload."""

    __slots__ = ("data", "dts", "kind", "pid", "pts")

    def __init__(self, pid: int, kind: str, pts: int, dts: int, data: bytes) -> None:
        self.pid, self.kind, self.pts, self.dts, self.data = pid, kind, pts, dts, data


class TsReader:
    """A transport stream in, PES packets of the first program's H.264 or HEVC and AAC or Opus tracks out. Sans-IO:
    `feed` takes bytes cut anywhere and returns the PES packets they complete.

    Bounded: a partial packet (under 188 bytes) and one PES per track of at most MAX_PES are held; a PES
    that grows past that, or that loses a packet (a continuity counter skips), is dropped and counted in
    `errors`. Lost sync is found again at the next 0x47 that a second one 188 bytes on confirms."""

    def __init__(self) -> None:
        self.rest = b""
        self.pmt_pid: int | None = None
        self.tracks: dict[int, str] = {}  # PID -> kind
        self.sections: dict[int, bytearray] = {}
        self.last_tables: dict[int, bytes] = {}  # by PID: the last PAT or PMT section that was read
        self.opus_channels = 2
        self.building: dict[int, list[bytes]] = {}
        self.sizes: dict[int, int] = {}
        self.counters: dict[int, int] = {}
        self.errors = 0
        self.resyncs = 0

    def feed(self, data: bytes) -> list[Pes]:
        out: list[Pes] = []
        buffer = self.rest + data if self.rest else data
        pos, end = 0, len(buffer)
        tracks, building, sizes, counters = self.tracks, self.building, self.sizes, self.counters
        while end - pos >= PACKET:
            if buffer[pos] != 0x47:
                pos = self._resync(buffer, pos)
                continue
            flags, control = buffer[pos + 1], buffer[pos + 3]
            pid = ((flags & 0x1F) << 8) | buffer[pos + 2]
            if pid in tracks and not flags & 0x40 and control & 0x30 == 0x10:
                # Most packets: the middle of a track's PES, payload only. What _packet and _pes_data do
                # with one, without the calls (the demuxer's cost is per packet: docs/BENCHMARKS.md).
                counter, expected = control & 0x0F, counters.get(pid)
                counters[pid] = counter
                parts = building.get(pid)
                if parts is not None and counter != expected:  # else a duplicate, or not in a PES
                    size = sizes[pid] + PACKET - 4
                    if (expected is not None and counter != (expected + 1) & 0x0F) or size > MAX_PES:
                        self._drop(pid)  # a packet was lost, or the PES is too large
                    else:
                        sizes[pid] = size
                        parts.append(buffer[pos + 4:pos + PACKET])
            else:
                self._packet(memoryview(buffer)[pos:pos + PACKET], out)
            pos += PACKET
        self.rest = bytes(buffer[pos:])
        return out

    def flush(self) -> list[Pes]:
        """The PES packets still being gathered (at the end of the stream)."""
        out: list[Pes] = []
        for pid in list(self.building):
            self._finish(pid, out)
        return out

    def _resync(self, buffer: bytes, pos: int) -> int:
        """Where the next packet starts: a 0x47 with another 0x47 188 bytes on (or too near the end to
        tell yet); the end of the buffer if there is no 0x47 at all."""
        self.resyncs += 1
        at = pos + 1
        while True:
            found = buffer.find(b"\x47", at)
            if found < 0:
                return len(buffer)
            if found + PACKET >= len(buffer) or buffer[found + PACKET] == 0x47:
                return found
            at = found + 1

    def _packet(self, packet: memoryview, out: list[Pes]) -> None:
        start = bool(packet[1] & 0x40)
        pid = ((packet[1] & 0x1F) << 8) | packet[2]
        control, counter = (packet[3] >> 4) & 0x03, packet[3] & 0x0F
        offset = 4
        if control & 0x02:  # adaptation field
            offset += 1 + packet[4]
        if not control & 0x01 or offset >= PACKET:
            return  # no payload
        payload = packet[offset:]
        if pid in self.tracks:
            expected = self.counters.get(pid)
            self.counters[pid] = counter
            if expected is not None and counter == expected:
                return  # a duplicate packet (ISO 13818-1 allows one)
            if expected is not None and counter != (expected + 1) & 0x0F and pid in self.building and not start:
                self._drop(pid)  # a packet was lost: the PES would decode wrong
            self._pes_data(pid, start, payload, out)
        elif pid == PAT_PID or pid == self.pmt_pid:
            self._section(pid, start, payload)

    def _pes_data(self, pid: int, start: bool, payload: memoryview, out: list[Pes]) -> None:
        if start:
            self._finish(pid, out)
            self.building[pid] = []
            self.sizes[pid] = 0
        parts = self.building.get(pid)
        if parts is None:
            return  # joined mid-PES: wait for the next start
        self.sizes[pid] += len(payload)
        if self.sizes[pid] > MAX_PES:
            self._drop(pid)
            return
        parts.append(bytes(payload))

    def _drop(self, pid: int) -> None:
        self.building.pop(pid, None)
        self.errors += 1

    def _finish(self, pid: int, out: list[Pes]) -> None:
        parts = self.building.pop(pid, None)
        if not parts:
            return
        data = b"".join(parts)
        if len(data) < 9 or data[:3] != b"\x00\x00\x01":
            self.errors += 1
            return
        flags, header_length = data[7], data[8]
        body = 9 + header_length
        if body > len(data) or (flags & 0x80 and header_length < 5) or (flags & 0x40 and header_length < 10):
            self.errors += 1
            return
        if not flags & 0x80:
            self.errors += 1  # no PTS: nothing to place it with
            return
        pts = _read_timestamp(data, 9)
        dts = _read_timestamp(data, 14) if flags & 0x40 else pts
        length = (data[4] << 8) | data[5]
        payload = data[body:6 + length] if length else data[body:]
        out.append(Pes(pid, self.tracks[pid], pts, dts, payload))

    def _section(self, pid: int, start: bool, payload: memoryview) -> None:
        if start:
            pointer = payload[0]
            self.sections[pid] = bytearray(payload[1 + pointer:])
        elif pid in self.sections:
            self.sections[pid] += payload
        else:
            return
        section = self.sections[pid]
        if len(section) > MAX_SECTION:
            del self.sections[pid]
            self.errors += 1
            return
        if len(section) < 3:
            return
        length = ((section[1] & 0x0F) << 8) | section[2]
        if len(section) < 3 + length:
            return
        del self.sections[pid]
        body = bytes(section[:3 + length])
        if body == self.last_tables.get(pid):
            return  # the tables again (muxers repeat them every 100 ms or so): read once
        if length < 9 or crc32_mpeg2(body[:-4]) != int.from_bytes(body[-4:], "big"):
            self.errors += 1
            return
        self.last_tables[pid] = body
        if pid == PAT_PID and body[0] == 0x00:
            self._pat(body[8:-4])
        elif body[0] == 0x02:
            self._pmt(body)

    def _pat(self, entries: bytes) -> None:
        for at in range(0, len(entries) - 3, 4):
            program = (entries[at] << 8) | entries[at + 1]
            if program != 0:  # 0 names the network PID
                self.pmt_pid = ((entries[at + 2] & 0x1F) << 8) | entries[at + 3]
                return

    def _pmt(self, body: bytes) -> None:
        info_length = ((body[10] & 0x0F) << 8) | body[11]
        at, end = 12 + info_length, len(body) - 4
        tracks: dict[int, str] = {}
        while at + 5 <= end and len(tracks) < MAX_TRACKS:
            stream_type, pid = body[at], ((body[at + 1] & 0x1F) << 8) | body[at + 2]
            es_length = ((body[at + 3] & 0x0F) << 8) | body[at + 4]
            kind = READ_TYPES.get(stream_type)
            if stream_type == STREAM_TYPE_PRIVATE:
                kind = self._opus(body[at + 5:min(end, at + 5 + es_length)])
            audio = kind in AUDIO_KINDS and any(k in AUDIO_KINDS for k in tracks.values())
            if kind is not None and kind not in tracks.values() and not audio:
                tracks[pid] = kind  # the first track of each kind, and one audio track
            at += 5 + es_length
        if tracks != self.tracks:
            for pid in set(self.building) - set(tracks):
                self.building.pop(pid)
            self.tracks = tracks


    def _opus(self, descriptors: bytes) -> str | None:
        """"opus" if a private-data stream's descriptors register it as Opus (the mapping ffmpeg writes: a
        registration descriptor 'Opus', a DVB extension descriptor 0x80 with the channel configuration)."""
        found = None
        at = 0
        while at + 2 <= len(descriptors):
            tag, length = descriptors[at], descriptors[at + 1]
            value = descriptors[at + 2:at + 2 + length]
            if tag == 0x05 and value == b"Opus":
                found = "opus"
            elif tag == 0x7F and len(value) >= 2 and value[0] == 0x80:
                self.opus_channels = value[1] if value[1] in (1, 2) else 2  # mapping family 0: 1 or 2
            at += 2 + length
        return found


def _read_timestamp(data: bytes, at: int) -> int:
    return (((data[at] >> 1) & 0x07) << 30) | (data[at + 1] << 22) | ((data[at + 2] >> 1) << 15) \
        | (data[at + 3] << 7) | (data[at + 4] >> 1)
