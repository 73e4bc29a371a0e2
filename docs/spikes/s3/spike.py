"""S3 upload cost: aiobotocore or aioboto3 (recording uploads, services/worker/upload.py).

`spike.py KIND [RUNS]` starts moto's standalone S3 server on a free 127.0.0.1 port, writes FILES files of SIZE
bytes, and runs each measurement RUNS times in a fresh interpreter (so the import is cold for Python, warm for
the page cache), printing one JSON line per run: import seconds, client-creation seconds, upload wall and CPU
seconds (this process: moto's own CPU is in its process), RSS after import and peak RSS.
KIND: aiobotocore (put_object), aioboto3 (put_object on its client), aioboto3-upload_file (its managed transfer),
or all. `spike.py one KIND ENDPOINT DIR` is the child.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FILES = 50
SIZE = 256 << 10
KINDS = ("aiobotocore", "aioboto3", "aioboto3-upload_file")


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(kind: str, endpoint: str, folder: str) -> None:
    t0 = time.perf_counter()
    if kind == "aiobotocore":
        import aiobotocore.session

        session = aiobotocore.session.get_session()
    else:
        import aioboto3

        session = aioboto3.Session()
    imported = time.perf_counter() - t0
    rss_imported = rss_kib()
    files = sorted(Path(folder).iterdir())
    bucket = "spike-" + kind.lower().replace("_", "-")

    async def run() -> dict[str, float]:
        t1 = time.perf_counter()
        client_of = session.create_client if kind == "aiobotocore" else session.client
        async with client_of("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                            aws_secret_access_key="x") as client:
            made = time.perf_counter() - t1
            try:
                await client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for path in files:
                if kind == "aioboto3-upload_file":
                    await client.upload_file(str(path), bucket, path.name)
                else:
                    await client.put_object(Bucket=bucket, Key=path.name, Body=path.read_bytes())
            return {"client": made, "wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0}

    out = asyncio.run(run())
    print(json.dumps({"kind": kind, "import": round(imported, 3), "client": round(out["client"], 3),
                      "upload_wall": round(out["wall"], 3), "upload_cpu": round(out["cpu"], 3),
                      "rss_after_import_mib": round(rss_imported / 1024, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    kinds = KINDS if sys.argv[1] == "all" else (sys.argv[1],)
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as folder:
            for i in range(FILES):
                Path(folder, f"seg{i:03}.m4s").write_bytes(os.urandom(SIZE))
            for kind in kinds:
                for _ in range(runs):
                    subprocess.run([sys.executable, __file__, "one", kind, endpoint, folder], check=True)
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    if sys.argv[1] == "one":
        child(*sys.argv[2:5])
    else:
        main()
