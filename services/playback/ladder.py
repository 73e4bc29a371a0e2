"""ABR ladders as playback serves them. A stream with a running ladder job (services.worker) answers
/{app}/{stream}.m3u8 with a multivariant playlist: the source itself (its media playlist at
{stream}.m3u8?rendition=source) and each rendition (the stream {stream}_{name}, a stream like any other),
with BANDWIDTH, RESOLUTION, FRAME-RATE and CODECS from what the origin measures of each. LL-HLS media
playlists of a ladder's streams carry a rendition report for each other one.

Which streams form a ladder comes from dispatch's job listing (the catalog's, at most a second old).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from castmesh.media.frames import path_of, stream_path
from castmesh.media.hls import Variant
from castmesh.proto.v1.dispatch_pb2 import Job
from castmesh.proto.v1.relay_pb2 import StreamStats

ListJobs = Callable[[], Awaitable[list[Job]]]
SOURCE = "source"
PEAK = 1.2  # BANDWIDTH is a peak: the measured average (over a few seconds) with this much headroom


@dataclass(frozen=True, slots=True)
class Ladder:
    app: str
    source: str  # the source stream's name
    members: tuple[tuple[str, str], ...]  # (rendition, stream name), the source first as "source"

    def uri(self, stream: str, query: str = "") -> str:
        """A member's media playlist, relative to the multivariant playlist; `query`: format, signature."""
        if stream == self.source:
            return f"{stream}.m3u8?rendition={SOURCE}" + (f"&{query}" if query else "")
        return f"{stream}.m3u8" + (f"?{query}" if query else "")


def ladder_of(jobs: list[Job], app: str, name: str) -> Ladder | None:
    """The ladder `app/name` is the source or a rendition of, if its job runs and makes something."""
    for job in jobs:
        source = job.spec.stream
        if job.spec.kind != "abr" or source.app != app or job.state != Job.STATE_RUNNING or not job.outputs:
            continue
        if name != source.name and name not in job.outputs:
            continue
        prefix = len(source.name) + 1
        members = ((SOURCE, source.name), *((out[prefix:], out) for out in job.outputs))
        return Ladder(app, source.name, members)
    return None


def variants(ladder: Ladder, streams: list[StreamStats], query: Callable[[str], str]) -> list[Variant]:
    """The members that are published now, as a multivariant playlist lists them."""
    by_path = {stream_path(s.stream): s for s in streams}
    out = []
    for _, stream in ladder.members:
        stats = by_path.get(path_of(ladder.app, stream))
        if stats is None or not stats.publishing:
            continue
        media = stats.media
        out.append(Variant(ladder.uri(stream, query(stream)), int(media.bitrate_kbps * 1000 * PEAK),
                           media.width, media.height, media.frame_rate, media.codecs))
    return out
