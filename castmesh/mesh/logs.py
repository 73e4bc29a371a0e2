"""Structured logs: one line per session event (never per frame). As key=value pairs by default, which
both people and log shippers read, or one JSON object per line with CASTMESH_LOG_FORMAT=json.
`event(log, "publish.start", stream="live/x", peer="1.2.3.4:5")`."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from castmesh.mesh.config import ConfigError


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, "%s %s", name, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()),
                extra={"castmesh_event": name, "castmesh_fields": fields})


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "event", ...the event's fields} or, for other records, "message"."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        name = getattr(record, "castmesh_event", None)
        if name is not None:
            out["event"] = name
            for key, value in getattr(record, "castmesh_fields", {}).items():
                out.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None else str(value))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: str = "info", fmt: str | None = None) -> None:
    fmt = (fmt or os.environ.get("CASTMESH_LOG_FORMAT") or "text").lower()
    if fmt not in ("text", "json"):
        raise ConfigError(f"CASTMESH_LOG_FORMAT must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
