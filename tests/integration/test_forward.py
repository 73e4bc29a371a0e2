"""Forward jobs (services/worker/forward.py) against real far ends: nginx with Debian's libnginx-mod-rtmp
takes the RTMP publish (and RTMPS through a TLS front in this process, its self-signed certificate trusted
through SSL_CERT_FILE as a CA would be), ffmpeg listening on srt:// takes SRT, and a player (ffmpeg) decodes
what they got. The job follows a stand-in for its subscription: a 2 s FLV clip made by ffmpeg, looped and
paced in real time, handed over as UpstreamSubscription hands frames over. Then: nginx restarted under a
running stream (the target retries and forwards again, and plays after the restart), an unreachable target
and one whose certificate does not check out (retried with a growing backoff, said why, and the target next
to them unaffected)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from castmesh.media.flv import FlvReader, Tag
from castmesh.media.frames import AUDIO, DATA, VIDEO, make_frame, stream_key
from castmesh.mesh.tls import self_signed
from castmesh.proto.v1.dispatch_pb2 import ForwardTarget, Job, JobSpec
from castmesh.proto.v1.media_pb2 import Frame, StreamHeader
from castmesh.proto.v1.relay_pb2 import StreamEnd
from castmesh.srt import libsrt as s
from services.worker.forward import STABLE_FOR, ForwardJob
from tests.integration.harness import FFMPEG, free_port

NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
KEY = "sk-0123-secret"  # a stream key that must never reach a log line

# The far ends -------------------------------------------------------------------------------------------


class Nginx:
    """nginx-rtmp on a loopback port, one process (no master), its files in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "nginx.conf").write_text(f"""
load_module {NGINX_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;  # publish and unpublish lines
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{self.port};
        application live {{ live on; wait_key on; wait_video on; }}
    }}
}}
""")

    def start(self) -> None:
        self.process = subprocess.Popen([NGINX, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
                                         "-e", str(self.directory / "error.log")], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(self.directory / 'error.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def url(self, name: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{name}"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path)
    server.start()
    yield server
    server.stop()


class TlsFront:
    """RTMPS in front of nginx's RTMP port, as a TLS-terminating proxy of a streaming service would be."""

    def __init__(self, certificate: Path, key: Path, port: int) -> None:
        import ssl

        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certificate, key)
        self.back = port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Its connections end too (an asyncio server's close leaves them open)."""
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            back_reader, back_writer = await asyncio.open_connection("127.0.0.1", self.back)
        except OSError:
            writer.close()
            return
        self.writers.append(back_writer)
        await asyncio.gather(self._pipe(reader, back_writer), self._pipe(back_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()


def unpublished(nginx_log: str, name: str) -> bool:
    """Whether nginx saw the publisher of `name` unpublish (deleteStream) before its connection closed."""
    connection = re.search(rf"\*(\d+) publish: name='{name}'", nginx_log)
    assert connection is not None, f"nobody published {name}"
    ends = re.findall(rf"\*{connection[1]} (deleteStream|disconnect),", nginx_log)
    return bool(ends) and ends[0] == "deleteStream"


async def decoded_pictures(url: str, seconds: float, timeout: float = 20.0) -> tuple[int, str]:
    """Video pictures ffmpeg decodes from `url` in its first `seconds`, and what it complained of."""
    player = await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-loglevel", "error", "-i", url, "-t", str(seconds), "-map", "0:v:0",
        "-f", "framecrc", "-", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(player.communicate(), timeout)
    finally:
        if player.returncode is None:
            player.kill()
            await player.wait()
    pictures = sum(1 for line in out.decode().splitlines() if line and not line.startswith("#"))
    return pictures, err.decode(errors="replace").strip()


# The source ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> list[Tag]:
    """2 s of 320x240 H.264 at 25 fps with a keyframe every second, and AAC: the tags of its FLV."""
    path = tmp_path_factory.mktemp("clip") / "clip.flv"
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25:duration=2", "-f", "lavfi", "-i", "sine=duration=2",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    "-f", "flv", str(path)], check=True, timeout=60)
    return FlvReader().feed(path.read_bytes())


class LoopedClip:
    """A stand-in for UpstreamSubscription: the header first, then the clip's frames over and over with
    timestamps running on, in batches as they fall due in real time, until stop(); then the StreamEnd of
    an unpublish."""

    def __init__(self, tags: list[Tag]) -> None:
        frames = [make_frame(t.kind, t.timestamp, t.payload) for t in tags if t.kind in (AUDIO, VIDEO, DATA)]
        first = {f.kind: f for f in reversed(frames) if f.sequence_header or f.kind == DATA}
        self.header = StreamHeader(stream=stream_key("live", "cam"), metadata=first[DATA], video_config=first[VIDEO],
                                   audio_config=first[AUDIO], has_audio=True, has_video=True, session_id="clip")
        self.frames = [f for f in frames if not f.sequence_header and f.kind != DATA]
        self.length = max(f.timestamp for f in self.frames) + 40
        self.stopped = asyncio.Event()
        self.on_header: Callable[[StreamHeader, bool], None] = lambda h, n: None
        self.on_frames: Callable[[list[Frame]], None] = lambda f: None

    def __call__(self, key: Any, on_header: Any, on_frames: Any) -> LoopedClip:
        self.on_header, self.on_frames = on_header, on_frames
        return self

    def stop(self) -> None:
        self.stopped.set()

    async def run(self) -> StreamEnd:
        self.on_header(self.header, True)
        loop = asyncio.get_running_loop()
        start, offset = loop.time(), 0
        while True:
            batch: list[Frame] = []
            for frame in self.frames:
                wait = start + (frame.timestamp + offset) / 1000 - loop.time()
                if wait > 0:
                    if batch:
                        self.on_frames(batch)
                        batch = []
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopped.wait(), wait)
                if self.stopped.is_set():
                    return StreamEnd(reason=StreamEnd.REASON_UNPUBLISHED, detail="the clip stopped")
                batch.append(make_frame(frame.kind, frame.timestamp + offset, frame.payload))
            if batch:
                self.on_frames(batch)
            offset += self.length


def forward_job(urls: list[str], source: LoopedClip, reports: list[Job], backoff: float = 0.2,
                max_backoff: float = 1.0) -> ForwardJob:
    def report(job: Job) -> None:
        copy = Job()
        copy.CopyFrom(job)
        reports.append(copy)

    job = Job(id="forward:__defaultVhost__/live/cam",
              spec=JobSpec(kind="forward", stream=stream_key("live", "cam"), targets=urls, source="api"))
    return ForwardJob(job, source, report, backoff=backoff, max_backoff=max_backoff)


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g}s: {what}")
        await asyncio.sleep(0.05)


def sample(name: str, scheme: str | None = None) -> float:
    return REGISTRY.get_sample_value(name, {"scheme": scheme} if scheme else {}) or 0.0


FORWARDING, RETRYING = ForwardTarget.STATE_FORWARDING, ForwardTarget.STATE_RETRYING


# The tests ----------------------------------------------------------------------------------------------


def test_it_forwards_over_rtmp_and_rtmps_and_a_player_decodes_it(clip: list[Tag], nginx: Nginx, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    certificate, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # trusted as a CA: RTMPS checks it, and it checks out
    before = {scheme: (sample("castmesh_forward_connects_total", scheme),
                       sample("castmesh_forward_bytes_total", scheme)) for scheme in ("rtmp", "rtmps")}

    async def scenario() -> tuple[list[tuple[int, str]], ForwardJob, list[Job]]:
        front = TlsFront(certificate, key, nginx.port)
        source, reports = LoopedClip(clip), []
        job = forward_job([nginx.url(f"cam?token={KEY}"),  # the query stays on the key; nginx reads it as args
                           f"rtmps://127.0.0.1:{await front.start()}/live/tls"], source, reports)
        run = asyncio.get_running_loop().create_task(job.run())
        try:
            await until(lambda: all(t.state == FORWARDING for t in job.job.targets), 10, "both targets forwarding")
            decoded = await asyncio.gather(decoded_pictures(nginx.url("cam"), 3),
                                           decoded_pictures(nginx.url("tls"), 3))
        finally:
            source.stop()
            end = await run
            job.close(end.reason == StreamEnd.REASON_UNPUBLISHED, end.detail)
            await asyncio.sleep(0.3)  # the unpublish goes through the TLS front too
            await front.close()
        return list(decoded), job, reports

    decoded, job, reports = asyncio.run(asyncio.wait_for(scenario(), 40))
    for pictures, errors in decoded:
        assert errors == ""
        assert pictures >= 70  # 3 s at 25 fps, from a keyframe
    plain, tls = job.job.targets
    assert plain.connects == tls.connects == 1
    assert plain.bytes > 100_000 and tls.bytes > 100_000
    assert [t.state for t in reports[-1].targets] == [FORWARDING, FORWARDING]
    assert len(reports) <= 6  # state changes only (connecting, forwarding), never per frame
    assert reports[-1].state == Job.STATE_RUNNING and reports[-1].detail == "forwarding to 2 of 2 targets"
    log = (nginx.directory / "error.log").read_text()
    assert unpublished(log, "cam") and unpublished(log, "tls")  # the source's unpublish was passed on
    assert "args='token=" in log  # the key's query string reached the far end
    for scheme in ("rtmp", "rtmps"):
        assert sample("castmesh_forward_connects_total", scheme) == before[scheme][0] + 1
        assert sample("castmesh_forward_bytes_total", scheme) > before[scheme][1] + 100_000


def test_it_forwards_again_after_nginx_restarts(clip: list[Tag], nginx: Nginx) -> None:
    async def scenario() -> tuple[int, str, ForwardJob, list[Job]]:
        source, reports = LoopedClip(clip), []
        job = forward_job([nginx.url("cam")], source, reports)
        run = asyncio.get_running_loop().create_task(job.run())
        target = job.job.targets[0]
        try:
            await until(lambda: target.state == FORWARDING, 10, "forwarding")
            await asyncio.sleep(STABLE_FOR + 1)  # past the backoff's reset and every retry window
            for connects in (2, 3):  # and again right after it came back
                await asyncio.to_thread(nginx.stop)
                await until(lambda: target.state == RETRYING, 5, "retrying once nginx is gone")
                await asyncio.sleep(0.5)
                await asyncio.to_thread(nginx.start)
                await until(lambda n=connects: target.state == FORWARDING and target.connects == n, 10,
                            "forwarding again")
            pictures, errors = await decoded_pictures(nginx.url("cam"), 2)
        finally:
            source.stop()
            await run
            job.close(True, "")
        return pictures, errors, job, reports

    pictures, errors, job, reports = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert errors == ""
    assert pictures >= 45  # 2 s at 25 fps, after the restarts
    states = [r.targets[0].state for r in reports]
    assert states.index(RETRYING) < len(states) - 1 - states[::-1].index(FORWARDING)  # forwarding after retrying
    retrying = next(r.targets[0] for r in reports if r.targets[0].state == RETRYING)
    assert retrying.detail.startswith(f"127.0.0.1:{nginx.port}: ")
    assert job.job.targets[0].connects == 3


def test_unreachable_targets_retry_with_a_growing_backoff_and_leave_the_others_alone(
        clip: list[Tag], nginx: Nginx, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="castmesh.worker")
    closed = free_port()
    certificate, key = self_signed(tmp_path)  # not trusted here: its check fails
    failures = sample("castmesh_forward_failures_total", "rtmp")

    async def scenario() -> tuple[int, str, ForwardJob]:
        front = TlsFront(certificate, key, nginx.port)
        source = LoopedClip(clip)
        job = forward_job([f"rtmp://127.0.0.1:{closed}/live/{KEY}", nginx.url("cam"),
                           f"rtmps://127.0.0.1:{await front.start()}/live/{KEY}"],
                          source, [], backoff=0.2, max_backoff=0.8)
        run = asyncio.get_running_loop().create_task(job.run())
        try:
            await until(lambda: job.job.targets[1].state == FORWARDING, 10, "the reachable target forwarding")
            pictures, errors = await decoded_pictures(nginx.url("cam"), 2)
            await until(lambda: sample("castmesh_forward_failures_total", "rtmp") >= failures + 4, 5, "four failures")
        finally:
            source.stop()
            await run
            job.close(True, "")
            await front.close()
        return pictures, errors, job

    pictures, errors, job = asyncio.run(asyncio.wait_for(scenario(), 40))
    unreachable, reachable, untrusted = job.job.targets
    assert unreachable.detail == f"127.0.0.1:{closed} refused the connection (nothing listens there)"
    assert unreachable.connects == 0
    assert "certificate verify failed" in untrusted.detail and untrusted.connects == 0
    assert reachable.connects == 1 and errors == "" and pictures >= 45
    retries = [r.castmesh_fields for r in caplog.records  # type: ignore[attr-defined]
               if getattr(r, "castmesh_event", "") == "forward.retry" and f":{closed}/" in r.castmesh_fields["target"]]
    waits = [float(r["retry_in"]) for r in retries[:4]]  # growing, each up to a fifth shorter (jitter)
    assert all(0.8 * want - 0.01 <= wait <= want for wait, want in zip(waits, [0.2, 0.4, 0.8, 0.8], strict=True)), waits
    assert retries[0]["target"] == f"rtmp://127.0.0.1:{closed}/live/****"
    assert KEY not in caplog.text  # masked in every line


def test_it_forwards_over_srt_to_ffmpeg_listening(clip: list[Tag]) -> None:
    port, passphrase = free_port(), "correct horse battery"

    async def scenario() -> tuple[int, str, ForwardJob]:
        listening = asyncio.get_running_loop().create_task(decoded_pictures(
            f"srt://127.0.0.1:{port}?mode=listener&passphrase={passphrase.replace(' ', '%20')}&latency=200000", 3))
        await asyncio.sleep(0.3)  # ffmpeg starts listening (the caller's handshake is repeated meanwhile anyway)
        source = LoopedClip(clip)
        job = forward_job([f"srt://127.0.0.1:{port}?streamid=publish:live/cam&passphrase={passphrase}&latency=200"],
                          source, [])
        run = asyncio.get_running_loop().create_task(job.run())
        try:
            await until(lambda: job.job.targets[0].state == FORWARDING, 10, "forwarding")
            pictures, errors = await listening
        finally:
            source.stop()
            await run
            job.close(True, "")
        return pictures, errors, job

    before = sample("castmesh_forward_connects_total", "srt")
    pictures, errors, job = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert errors == ""
    assert pictures >= 70
    assert job.job.targets[0].connects == 1 and job.job.targets[0].bytes > 100_000
    assert sample("castmesh_forward_connects_total", "srt") == before + 1


def test_an_srt_target_with_the_wrong_passphrase_says_so(clip: list[Tag], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="castmesh.worker")
    srt = s.lib()
    listener = s.check("srt_create_socket", srt.srt_create_socket())
    s.set_int(listener, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
    s.set_bytes(listener, s.SRTO_PASSPHRASE, b"the right passphrase")
    address = s.sockaddr("127.0.0.1", 0)
    s.check("srt_bind", srt.srt_bind(listener, address, len(address)))
    buffer, size = ctypes.create_string_buffer(128), ctypes.c_int(128)
    s.check("srt_getsockname", srt.srt_getsockname(listener, buffer, ctypes.byref(size)))
    s.check("srt_listen", srt.srt_listen(listener, 4))
    port = int(s.parse_sockaddr(ctypes.addressof(buffer)).rpartition(":")[2])
    failures = sample("castmesh_forward_failures_total", "srt")

    async def scenario() -> ForwardJob:
        source = LoopedClip(clip)
        job = forward_job([f"srt://127.0.0.1:{port}?streamid=live/cam&passphrase=not-the-right-one"], source, [])
        run = asyncio.get_running_loop().create_task(job.run())
        try:
            await until(lambda: job.job.targets[0].state == RETRYING, 5, "retrying")
        finally:
            source.stop()
            await run
            job.close(True, "")
        return job

    try:
        job = asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        srt.srt_close(listener)
    assert job.job.targets[0].detail == f"127.0.0.1:{port}: the SRT call failed: Incorrect passphrase (10)"
    assert sample("castmesh_forward_failures_total", "srt") >= failures + 1
    assert "not-the-right-one" not in caplog.text and "streamid=****&passphrase=****" in caplog.text


def test_a_rule_forwards_through_a_worker_and_the_api_shows_it_masked(nginx: Nginx, tmp_path: Path) -> None:
    """End to end in `castmesh up`: dispatch's --forward rule gives a published stream to the worker, which
    pushes it to nginx; a player decodes it there; the jobs API shows the target forwarding with its stream
    key masked, /metrics counts its bytes; a forward started and stopped through the API."""
    import json
    import urllib.request

    from tests.integration.harness import http_get, publish, scrape, start_up, total, wait_live

    up = start_up(tmp_path, "--forward", f"live=rtmp://127.0.0.1:{nginx.port}/live/{{name}}-{KEY}")
    source = publish(up.rtmp("cam"), 20, size="320x180", gop=30)
    base = f"http://127.0.0.1:{up.http_port}"
    try:
        wait_live(up.flv("cam"), timeout=20)
        deadline = time.monotonic() + 15
        target: dict[str, Any] = {}
        while time.monotonic() < deadline and target.get("state") != "forwarding":
            jobs = json.loads(http_get(f"{base}/api/v1/jobs").read())["jobs"]
            target = next((j["targets"][0] for j in jobs if j["kind"] == "forward"), {})
            time.sleep(0.2)
        assert target.get("state") == "forwarding" and target["url"] == f"rtmp://127.0.0.1:{nginx.port}/live/****", \
            target
        pictures, errors = asyncio.run(decoded_pictures(nginx.url(f"cam-{KEY}"), 3))
        assert pictures >= 60, (pictures, errors)
        assert total(scrape(up.http_port), 'castmesh_forward_bytes_total{scheme="rtmp"}') > 100_000
        body = json.dumps({"targets": [nginx.url(f"other-{KEY}")]}).encode()
        started = urllib.request.urlopen(urllib.request.Request(
            f"{base}/api/v1/streams/live/cam/forward", data=body, method="POST",
            headers={"Content-Type": "application/json"}), timeout=5)
        assert started.status == 200 and json.loads(started.read())["detail"] == "running already"  # the rule's
        stopped = urllib.request.urlopen(urllib.request.Request(f"{base}/api/v1/streams/live/cam/forward",
                                                                method="DELETE"), timeout=5)
        assert stopped.status == 200
        assert KEY not in up.process.log()
    finally:
        source.kill()
        up.process.stop()
