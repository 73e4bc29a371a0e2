"""SRT stream ids, in the forms SRS and MediaMTX accept (the caller sets one; the listener reads it in the
handshake):

- the access-control syntax of the SRT spec, `#!::r=live/cam,m=publish` (keys r: resource, m: mode
  publish / request, u: user; other keys, such as a signed URL's expires and sign, are kept as the query);
- MediaMTX's `publish:live/cam` and `read:live/cam`, with an optional `?expires=...&sign=...` query;
- a bare `live/cam` (SRS's default for a caller that names no mode): a request to play, or publish on an
  ingest port, where nothing else can be meant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

NAME = re.compile(r"^[A-Za-z0-9_.~-]{1,256}$")
MODES = {"publish": "publish", "request": "request", "read": "request", "play": "request"}


class StreamIdError(ValueError):
    pass


@dataclass(frozen=True)
class StreamId:
    mode: str  # "publish", "request" (play), or "" when the id names none
    app: str
    name: str
    query: dict[str, str] = field(default_factory=dict)
    user: str = ""


def parse(text: str) -> StreamId:
    """The stream an SRT caller asks for; StreamIdError with the reason if its id is not understood."""
    text = text.strip()
    if not text:
        raise StreamIdError("the stream id is empty: use #!::r=APP/STREAM,m=publish or publish:APP/STREAM")
    if text.startswith("#!::"):
        keys: dict[str, str] = {}
        for item in text[4:].split(","):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise StreamIdError(f"{item!r} in the stream id is not key=value")
            keys[key.strip()] = value.strip()
        resource = keys.pop("r", "")
        mode = keys.pop("m", "")
        if mode and mode not in MODES:
            raise StreamIdError(f"mode {mode!r} is not publish or request")
        user = keys.pop("u", "")
        for ignored in ("s", "t", "h"):
            keys.pop(ignored, None)
        app, name = _path(resource)
        return StreamId(MODES.get(mode, ""), app, name, keys, user)
    mode = ""
    head, sep, rest = text.partition(":")
    if sep and head in MODES:
        mode, text = MODES[head], rest
    path, _, query = text.partition("?")
    app, name = _path(path)
    return StreamId(mode, app, name, dict(parse_qsl(query)) if query else {})


def _path(path: str) -> tuple[str, str]:
    app, sep, name = path.strip("/").partition("/")
    if not sep or not NAME.match(app) or not NAME.match(name):
        raise StreamIdError(f"{path!r} is not APP/STREAM (letters, digits, _ . ~ -)")
    return app, name
