"""Connection caps (--max-per-ip, --max-connections): a viewer over the cap is refused with an error while
the viewers already in keep playing; a publisher over the ingest's cap is refused too."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.integration.harness import FFMPEG, http_get, publish, start_up, wait_live, watch_in_background


def test_a_viewer_over_the_cap_is_refused_and_the_others_continue(tmp_path: Path) -> None:
    up = start_up(tmp_path, "--max-per-ip", "2")
    publisher = publish(up.rtmp("capped"), 20, gop=30)
    try:
        wait_live(up.flv("capped"))
        time.sleep(0.5)  # wait_live's own connection has gone
        first, a = watch_in_background(up.flv("capped"), 8)
        second, b = watch_in_background(up.flv("capped"), 8)
        time.sleep(2)
        before = (len(first.tags), len(second.tags))
        refused = http_get(up.flv("capped"))
        assert refused.status == 503 and b"too many connections from 127.0.0.1 (2)" in refused.read()
        a.join(15)
        b.join(15)
        assert first.error == "" and second.error == ""
        assert len(first.tags) > before[0] + 60 and len(second.tags) > before[1] + 60  # kept playing
        # a second publisher from the same address is over the ingest's cap of 2 only with two in: the
        # first publisher holds one, so one more RTMP connection is admitted and a third is refused
        holder = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                                   "testsrc2=size=160x120:rate=10:duration=10", "-c:v", "libx264", "-f", "flv",
                                   up.rtmp("second")], stderr=subprocess.DEVNULL)
        time.sleep(2)
        third = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                                "testsrc2=size=160x120:rate=10:duration=2", "-c:v", "libx264", "-f", "flv",
                                up.rtmp("third")], capture_output=True, text=True, timeout=30, check=False)
        holder.kill()
        holder.wait()
        assert third.returncode != 0
        assert "rtmp.refused" in up.process.log() and "too many connections from 127.0.0.1 (2)" in up.process.log()
    finally:
        publisher.kill()
        publisher.wait()
        up.process.stop()
