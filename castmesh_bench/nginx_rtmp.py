"""The peer the latency tier is measured against: Debian's nginx with libnginx-mod-rtmp (`make peers`
installs both), run as one process with `live on`, as its users run it, pinned like castmesh's playback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")

CONF = """\
load_module {module};
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 8192; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application live {{ live on; }}
    }}
}}
"""


def start(port: int, out: Path, cpus: set[int] | None) -> subprocess.Popen[bytes]:
    """nginx-rtmp listening on 127.0.0.1:port (one process: master_process off), once it accepts."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists() or not MODULE.exists():
        raise SystemExit("nginx-rtmp is not installed: run `make peers` (Debian's nginx-light and libnginx-mod-rtmp)")
    root = (out / f"nginx-{port}").resolve()
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(CONF.format(module=MODULE, root=root, port=port))
    proc = subprocess.Popen([nginx, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"nginx-rtmp did not start: {(root / 'error.log').read_text()[-500:]}") from None
            time.sleep(0.05)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
