"""Regenerate castmesh/proto from protos/ (`make proto`), or check that the committed code is current.

protoc names generated modules after the .proto path (castmesh/v1/media.proto -> castmesh.v1.media_pb2),
so the imports between generated modules are rewritten to live under castmesh.proto.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "castmesh" / "proto"
IMPORT = re.compile(rb"^from castmesh\.v1 import ", re.MULTILINE)


def generate(dest: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as raw:
        args = ["protoc", f"-I{PROTOS}", f"--python_out={raw}", f"--pyi_out={raw}", f"--grpc_python_out={raw}"]
        if protoc.main([*args, *sources]) != 0:
            raise SystemExit("protoc failed")
        generated = Path(raw) / "castmesh" / "v1"
        target = dest / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(generated.iterdir()):
            (target / path.name).write_bytes(IMPORT.sub(b"from castmesh.proto.v1 import ", path.read_bytes()))
        for pkg in (dest, target):
            (pkg / "__init__.py").touch()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if castmesh/proto is stale")
    args = parser.parse_args()
    if not args.check:
        if (OUT / "v1").exists():
            shutil.rmtree(OUT / "v1")
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        cmp = filecmp.dircmp(fresh / "v1", OUT / "v1", ignore=["__pycache__"])
        stale = cmp.left_only + cmp.right_only + cmp.diff_files
        if stale:
            print("castmesh/proto is stale, run `make proto`: " + ", ".join(sorted(stale)), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
