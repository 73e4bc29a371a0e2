"""Jobs for streams, as dispatch, workers and the gateway all name them: ABR ladders written as text
(`--abr` rules, the API), job ids, and the streams a job publishes.

A ladder is renditions separated by commas, each NAME:SIZE:BITRATE[:FPS][:CODEC]:
    360p:640x360:800k,180p:x180:300k:15
SIZE is WIDTHxHEIGHT, or xHEIGHT (the width then follows the source's aspect ratio). BITRATE is the video's,
in kbit/s (a "k" may follow). FPS is a frame rate cap (default: the source's). CODEC is h264 (the default;
the only one for now). A rendition of stream S is published as S_NAME.

Rules say which apps get which ladder: APP_PATTERN=LADDER, several separated by ";", the first that
matches an app (fnmatch: "live", "live*", "*") wins.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from castmesh.media.frames import stream_path
from castmesh.proto.v1.dispatch_pb2 import JobSpec, Rendition
from castmesh.proto.v1.media_pb2 import StreamKey

CODECS = ("h264",)  # what a rendition may be encoded as (libx264)
MAX_RENDITIONS = 8
MAX_SIDE = 7680  # pixels: 8K
MAX_KBPS = 100_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,31}$")
ABR = "abr"


class LadderError(ValueError):
    """A ladder or rule that cannot be met: the message says which part and why."""


def parse_ladder(text: str) -> list[Rendition]:
    renditions: list[Rendition] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        if len(fields) < 3 or len(fields) > 5:
            raise LadderError(f"{item!r}: a rendition is NAME:SIZE:BITRATE[:FPS][:CODEC]")
        name, size, rate, *rest = fields
        rendition = Rendition(name=name, codec="h264")
        for extra in rest:  # FPS and CODEC, in either order
            if extra.replace(".", "", 1).isdigit():
                rendition.frame_rate = float(extra)
            else:
                rendition.codec = extra.lower()
        width, _, height = size.lower().partition("x")
        if not height.isdigit() or (width and not width.isdigit()):
            raise LadderError(f"{item!r}: the size is WIDTHxHEIGHT or xHEIGHT, not {size!r}")
        rendition.width, rendition.height = int(width or 0), int(height)
        kbps = rate.lower().removesuffix("k")
        if not kbps.isdigit():
            raise LadderError(f"{item!r}: the bitrate is in kbit/s (800 or 800k), not {rate!r}")
        rendition.bitrate_kbps = int(kbps)
        renditions.append(rendition)
    check_ladder(renditions)
    return renditions


def check_ladder(renditions: list[Rendition]) -> None:
    """LadderError unless every rendition can be made: names, sizes, bitrates, frame rates, codecs."""
    if not renditions:
        raise LadderError("a ladder needs at least one rendition")
    if len(renditions) > MAX_RENDITIONS:
        raise LadderError(f"a ladder has at most {MAX_RENDITIONS} renditions")
    names = set()
    for r in renditions:
        if not NAME.match(r.name):
            raise LadderError(f"rendition name {r.name!r}: letters, digits, '.' and '-', at most 32")
        if r.name in names:
            raise LadderError(f"rendition name {r.name!r} is given twice")
        names.add(r.name)
        if not 2 <= r.height <= MAX_SIDE or (r.width and not 2 <= r.width <= MAX_SIDE):
            raise LadderError(f"rendition {r.name}: sides are 2 to {MAX_SIDE} pixels")
        if r.height % 2 or r.width % 2:
            raise LadderError(f"rendition {r.name}: H.264 in 4:2:0 needs even sides, not {r.width}x{r.height}")
        if not 1 <= r.bitrate_kbps <= MAX_KBPS:
            raise LadderError(f"rendition {r.name}: the bitrate is 1 to {MAX_KBPS} kbit/s")
        if r.frame_rate and not 1 <= r.frame_rate <= 240:
            raise LadderError(f"rendition {r.name}: a frame rate is 1 to 240")
        if r.codec not in CODECS:
            raise LadderError(f"rendition {r.name}: codec {r.codec!r} is not one a worker encodes "
                              f"({', '.join(CODECS)})")


def ladder_text(renditions: list[Rendition]) -> str:
    """The text form parse_ladder reads."""
    parts = []
    for r in renditions:
        part = f"{r.name}:{f'{r.width}' if r.width else ''}x{r.height}:{r.bitrate_kbps}k"
        if r.frame_rate:
            part += f":{r.frame_rate:g}"
        parts.append(part + ("" if r.codec == "h264" else f":{r.codec}"))
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str
    renditions: tuple[Rendition, ...]


def parse_rules(text: str) -> list[Rule]:
    rules = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        pattern, sep, ladder = item.partition("=")
        if not sep or not pattern.strip():
            raise LadderError(f"{item!r}: a rule is APP_PATTERN=LADDER")
        try:
            rules.append(Rule(pattern.strip(), tuple(parse_ladder(ladder))))
        except LadderError as exc:
            raise LadderError(f"rule for {pattern.strip()!r}: {exc}") from None
    return rules


def matching(rules: list[Rule], app: str) -> Rule | None:
    return next((rule for rule in rules if fnmatch.fnmatchcase(app, rule.pattern)), None)


def job_id(kind: str, key: StreamKey) -> str:
    return f"{kind}:{stream_path(key)}"


def outputs(spec: JobSpec) -> list[str]:
    """The stream names the job publishes (in the source's app): each rendition's."""
    return [rendition_name(spec.stream.name, r.name) for r in spec.renditions]


def rendition_name(stream: str, rendition: str) -> str:
    return f"{stream}_{rendition}"


def lease_key(job: str) -> StreamKey:
    """Where a job's lease is kept in the stream directory: apart from every stream (no stream's vhost
    starts with "~"), and never listed (a lease without an origin is not a published stream)."""
    kind, _, path = job.partition(":")
    return StreamKey(vhost=f"~job-{kind}", app=kind, name=path)
