"""The Consul agent double as a process (python -m tests.consul.agent), for cluster tests."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.integration.harness import ROOT, free_port


class ConsulDouble:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.log = open(tmp / "consul.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.consul.agent", "--port", str(self.port)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log)
        assert self.proc.stdout is not None
        assert b"listening" in self.proc.stdout.readline()

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
            return json.loads(answer.read())

    def passing(self, service: str) -> list[str]:
        entries = self.get(f"/v1/health/service/{service}?passing")
        assert isinstance(entries, list)
        return sorted(e["Service"]["ID"] for e in entries)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
