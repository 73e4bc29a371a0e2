"""The one configuration loader: every setting is a command-line flag with a CASTMESH_* environment
variable behind it (flag beats environment beats default), the 12-factor way containers expect.

Services declare their settings as Option rows; the CLI adds them to its parsers, so `--help` lists each
one with its variable and default, and a bad value from either source is a one-line error.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    default: Any
    help: str
    type: Callable[[str], Any] = str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "CASTMESH_" + self.dest.upper()


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"{value} is not positive")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def port_range(text: str) -> tuple[int, int] | None:
    """"LOW-HIGH" (inclusive), or empty for none."""
    if not text.strip():
        return None
    low, sep, high = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r} is not LOW-HIGH")
    first, last = port(low.strip()), port(high.strip())
    if not 0 < first <= last:
        raise ValueError(f"{text!r} is not a range of ports")
    return first, last


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def duration(text: str) -> float:
    """Seconds: "90", "90s", "15m", "12h" or "7d"."""
    value = text.strip().lower()
    scale = _SECONDS.get(value[-1:], 0)
    number = float(value[:-1] if scale else value)
    if number < 0:
        raise ValueError(f"{text!r} is negative")
    return number * (scale or 1)


def size(text: str) -> int:
    """Bytes: "1000000", "500M", "10G" or "1T" (binary multiples)."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = _BYTES.get(value[-1:], 0)
    number = float(value[:-1] if scale else value)
    if number < 0:
        raise ValueError(f"{text!r} is negative")
    return int(number * (scale or 1))


def words(text: str) -> tuple[str, ...]:
    """A comma-separated list."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for opt in options:
        if opt.type is flag:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_const", const=True, default=None,
                                help=f"{opt.help} (env {opt.env})")
        else:
            parser.add_argument(opt.flag, dest=opt.dest, default=None, type=opt.type, metavar=opt.dest.upper(),
                                help=f"{opt.help} (env {opt.env}, default {opt.default})")


def resolve(args: argparse.Namespace, options: Iterable[Option],
            environ: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in options:
        value = getattr(args, opt.dest, None)
        if value is None and opt.env in env:
            try:
                value = opt.type(env[opt.env])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{opt.env}={env[opt.env]!r}: {exc}") from exc
        values[opt.dest] = opt.default if value is None else value
    return values
