"""Structured logs: one line per session event (never per frame), as key=value pairs that both people
and log shippers read. `event(log, "publish.start", stream="live/x", peer="1.2.3.4:5")`."""

from __future__ import annotations

import logging
import sys
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, "%s %s", name, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))


def setup(level: str = "info") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
