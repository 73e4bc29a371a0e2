from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands.add_parser("fanout", help="HTTP-FLV fan-out benchmark")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("not written yet")
