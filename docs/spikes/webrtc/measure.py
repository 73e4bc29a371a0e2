"""Drive the spike: server on core 0, receivers on core 1; server CPU and RSS over the receivers' window."""
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
SERVERS = {
    "aiortc-track": ["/tmp/spike/bin/python", "aio_server.py", "track"],
    "aiortc-shared": ["/tmp/spike/bin/python", "aio_server.py", "shared"],
    "aiortc-direct": ["/tmp/spike/bin/python", "aio_server.py", "direct"],
    "gstreamer": ["/usr/bin/python3", "gst_server.py"],
}


def cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def run(stack: str, n: int, seconds: float = 20) -> None:
    port = 18090
    server = subprocess.Popen(["taskset", "-c", "0", *SERVERS[stack], str(port)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    server.stdout.readline()  # ready
    idle_rss = rss(server.pid)
    receivers = subprocess.Popen(["taskset", "-c", "1", "/tmp/spike/bin/python", "aio_recv.py", str(n),
                                  f"http://127.0.0.1:{port}/whep", str(seconds)], stdout=subprocess.PIPE, text=True)
    assert receivers.stdout is not None
    states = receivers.stdout.readline().strip()
    receivers.stdout.readline()  # measure-start
    c0, t0, r0 = cpu(server.pid), time.monotonic(), cpu(receivers.pid)
    result = receivers.stdout.readline().strip()
    c1, t1, r1 = cpu(server.pid), time.monotonic(), cpu(receivers.pid)
    server_rss = rss(server.pid)
    receivers.wait(timeout=60)
    server.kill()
    server.wait()
    share = (c1 - c0) / (t1 - t0)
    print(f"{stack:14s} N={n:4d} server_cpu={share*100:5.1f}% viewers_per_core={n/share if share else 0:6.0f} "
          f"rss={server_rss}MB (+{(server_rss-idle_rss)/n:.2f}MB/viewer) receivers_cpu={(r1-r0)/(t1-t0)*100:.0f}% "
          f"{result} {states[:60]}", flush=True)


if __name__ == "__main__":
    for n in [int(x) for x in sys.argv[2].split(",")]:
        for stack in sys.argv[1].split(","):
            run(stack, n)
