"""Jobs for streams, as dispatch, workers and the gateway all name them: ABR ladders, recordings and
forwards written as text (`--abr`, `--record` and `--forward` rules, the API), job ids, and the streams a
job publishes.

A ladder is renditions separated by commas, each NAME:SIZE:BITRATE[:FPS][:CODEC]:
    360p:640x360:800k,180p:x180:300k:15
SIZE is WIDTHxHEIGHT, or xHEIGHT (the width then follows the source's aspect ratio). BITRATE is the video's,
in kbit/s (a "k" may follow). FPS is a frame rate cap (default: the source's). CODEC is h264 (the default;
the only one for now). A rendition of stream S is published as S_NAME.

Rules say which apps get which job: several separated by ";", the first of a kind that matches an app
(fnmatch: "live", "live*", "*") wins.
    abr:     APP_PATTERN=LADDER
    record:  APP_PATTERN[=SEGMENT_SECONDS]           live*=300;cams
    forward: APP_PATTERN=URL[ URL...]                live=rtmp://a.example/live/{name} srt://b:9000?streamid={app}/{name}
    pull:    APP/STREAM_PATTERN=URL[ ondemand[=IDLE_SECONDS]]
             cams/door=rtsp://10.0.0.5/h264;cams/*=rtsp://nvr/{name} ondemand
A forward URL may name the stream's {app} and {name}; its scheme is rtmp, rtmps or srt. A pull makes the
stream APP/STREAM from the URL (rtsp, rtsps, rtmp, rtmps, an HLS playlist's http or https, srt): always (the
pattern must then name one stream), or on demand: started by the first viewer of a matching stream, ended
IDLE_SECONDS (10) after the last. Pull rules are matched on APP/STREAM, the others on APP.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from castmesh.media.frames import stream_path
from castmesh.mesh.targets import masked, parse_target
from castmesh.proto.v1.dispatch_pb2 import JobSpec, Rendition
from castmesh.proto.v1.media_pb2 import StreamKey

CODECS = ("h264",)  # what a rendition may be encoded as (libx264)
MAX_RENDITIONS = 8
MAX_SIDE = 7680  # pixels: 8K
MAX_KBPS = 100_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,31}$")
ABR, RECORD, FORWARD, PULL = "abr", "record", "forward", "pull"
KINDS = (ABR, RECORD, FORWARD, PULL)
STREAM_KINDS = (ABR, RECORD, FORWARD)  # what rules give a published stream
PULL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "srt")
IDLE_SECONDS = (1, 3600)
DEFAULT_IDLE = 10
SEGMENT_SECONDS = (1, 86_400)  # a recording's files last from a second to a day
MAX_TARGETS = 8


class JobError(ValueError):
    """A job, ladder or rule that cannot be met: the message says which part and why."""


def parse_ladder(text: str) -> list[Rendition]:
    renditions: list[Rendition] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        if len(fields) < 3 or len(fields) > 5:
            raise JobError(f"{item!r}: a rendition is NAME:SIZE:BITRATE[:FPS][:CODEC]")
        name, size, rate, *rest = fields
        rendition = Rendition(name=name, codec="h264")
        for extra in rest:  # FPS and CODEC, in either order
            if extra.replace(".", "", 1).isdigit():
                rendition.frame_rate = float(extra)
            else:
                rendition.codec = extra.lower()
        width, _, height = size.lower().partition("x")
        if not height.isdigit() or (width and not width.isdigit()):
            raise JobError(f"{item!r}: the size is WIDTHxHEIGHT or xHEIGHT, not {size!r}")
        rendition.width, rendition.height = int(width or 0), int(height)
        kbps = rate.lower().removesuffix("k")
        if not kbps.isdigit():
            raise JobError(f"{item!r}: the bitrate is in kbit/s (800 or 800k), not {rate!r}")
        rendition.bitrate_kbps = int(kbps)
        renditions.append(rendition)
    check_ladder(renditions)
    return renditions


def check_ladder(renditions: list[Rendition]) -> None:
    """JobError unless every rendition can be made: names, sizes, bitrates, frame rates, codecs."""
    if not renditions:
        raise JobError("a ladder needs at least one rendition")
    if len(renditions) > MAX_RENDITIONS:
        raise JobError(f"a ladder has at most {MAX_RENDITIONS} renditions")
    names = set()
    for r in renditions:
        if not NAME.match(r.name):
            raise JobError(f"rendition name {r.name!r}: letters, digits, '.' and '-', at most 32")
        if r.name in names:
            raise JobError(f"rendition name {r.name!r} is given twice")
        names.add(r.name)
        if not 2 <= r.height <= MAX_SIDE or (r.width and not 2 <= r.width <= MAX_SIDE):
            raise JobError(f"rendition {r.name}: sides are 2 to {MAX_SIDE} pixels")
        if r.height % 2 or r.width % 2:
            raise JobError(f"rendition {r.name}: H.264 in 4:2:0 needs even sides, not {r.width}x{r.height}")
        if not 1 <= r.bitrate_kbps <= MAX_KBPS:
            raise JobError(f"rendition {r.name}: the bitrate is 1 to {MAX_KBPS} kbit/s")
        if r.frame_rate and not 1 <= r.frame_rate <= 240:
            raise JobError(f"rendition {r.name}: a frame rate is 1 to 240")
        if r.codec not in CODECS:
            raise JobError(f"rendition {r.name}: codec {r.codec!r} is not one a worker encodes "
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
    spec: JobSpec  # the job a stream of a matching app gets (its stream filled in then)


def parse_rules(text: str, kind: str = ABR) -> list[Rule]:
    rules = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        pattern, sep, value = (part.strip() for part in item.partition("="))
        if not pattern or (kind != RECORD and not sep):
            form = {ABR: "APP_PATTERN=LADDER", FORWARD: "APP_PATTERN=URL[ URL...]",
                    PULL: "APP/STREAM=URL[ ondemand[=IDLE_SECONDS]]"}.get(kind, "APP_PATTERN")
            raise JobError(f"{item!r}: a rule is {form}")
        spec = JobSpec(kind=kind, source=f"rule:{pattern}")
        try:
            if kind == ABR:
                spec.renditions.extend(parse_ladder(value))
            elif kind == RECORD:
                if value and not value.isdigit():
                    raise JobError(f"the segment length is whole seconds, not {value!r}")
                spec.segment_seconds = int(value or 0)
            elif kind == FORWARD:
                spec.targets.extend(value.split())
            elif kind == PULL:
                url, *options = value.split()
                app, slash, name = pattern.partition("/")
                if not slash or not app or not name or "/" in name:
                    raise JobError("a pull rule names APP/STREAM (a pattern: cams/*)")
                spec.url = url
                for option in options:
                    word, _, idle = option.partition("=")
                    if word != "ondemand" or (idle and not idle.isdigit()):
                        raise JobError(f"{option!r}: after the URL comes ondemand or ondemand=IDLE_SECONDS")
                    spec.on_demand, spec.idle_seconds = True, int(idle or 0)
                if not spec.on_demand and any(c in pattern for c in "*?["):
                    raise JobError(f"{pattern!r} names no one stream: a pattern pulls on demand only")
            else:
                raise JobError(f"no job kind {kind!r} ({', '.join(KINDS)})")
            check_spec(spec)
        except JobError as exc:
            raise JobError(f"rule for {pattern!r}: {exc}") from None
        rules.append(Rule(pattern, spec))
    return rules


def check_spec(spec: JobSpec) -> None:
    """JobError unless a worker can run the job as given."""
    if spec.kind == ABR:
        check_ladder(list(spec.renditions))
    elif spec.kind == RECORD:
        low, high = SEGMENT_SECONDS
        if spec.segment_seconds and not low <= spec.segment_seconds <= high:
            raise JobError(f"a recording's segments last {low} to {high} seconds")
    elif spec.kind == PULL:
        check_source(spec.url.replace("{app}", "app").replace("{name}", "name"))
        low, high = IDLE_SECONDS
        if spec.idle_seconds and not low <= spec.idle_seconds <= high:
            raise JobError(f"an on-demand pull's idle time is {low} to {high} seconds")
    elif spec.kind == FORWARD:
        if not spec.targets:
            raise JobError("a forward needs at least one URL")
        if len(spec.targets) > MAX_TARGETS:
            raise JobError(f"a forward has at most {MAX_TARGETS} URLs")
        if len(set(spec.targets)) < len(spec.targets):
            raise JobError("a forward names a URL twice")
        for url in spec.targets:
            check_target(url)
    else:
        raise JobError(f"no job kind {spec.kind!r} ({', '.join(KINDS)})")


def check_target(url: str) -> None:
    try:
        parse_target(url)
    except ValueError as exc:
        raise JobError(str(exc)) from None


def check_source(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError as exc:
        raise JobError(f"{masked(url)}: {exc}") from None
    if parts.scheme.lower() not in PULL_SCHEMES:
        raise JobError(f"{masked(url)}: a pull's source is {', '.join(s + '://' for s in PULL_SCHEMES)}")
    if not parts.hostname:
        raise JobError(f"{masked(url)}: no host")


def matching(rules: list[Rule], app: str, kind: str = ABR, name: str = "") -> Rule | None:
    """The first rule of `kind` for the app (a pull rule: for the stream app/name)."""
    subject = f"{app}/{name}" if kind == PULL else app
    return next((r for r in rules if r.spec.kind == kind and fnmatch.fnmatchcase(subject, r.pattern)), None)


def spec_for(rule: Rule, key: StreamKey) -> JobSpec:
    """The job `rule` gives the stream `key`: forward and pull URLs with its {app} and {name} filled in."""
    spec = JobSpec()
    spec.CopyFrom(rule.spec)
    spec.stream.CopyFrom(key)
    targets = [url.replace("{app}", key.app).replace("{name}", key.name) for url in spec.targets]
    del spec.targets[:]
    spec.targets.extend(targets)
    spec.url = spec.url.replace("{app}", key.app).replace("{name}", key.name)
    return spec


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
