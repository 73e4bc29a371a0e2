"""Recording uploads against moto's standalone S3 server, a process of its own on loopback: files arrive under the
right keys with the right bytes (multipart ones too), are deleted only when asked, a failure is retried, an endpoint
that refuses is given up on without losing the file or blocking later ones, and the queue is bounded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from prometheus_client import REGISTRY

from services.worker import upload
from services.worker.upload import S3Target, Uploader, parse_s3_url
from tests.integration.harness import free_port


def start_moto(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto's S3 server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = start_moto(port, tmp_path_factory.mktemp("moto") / "moto.log")
    yield f"http://127.0.0.1:{port}"
    stop(process)


@asynccontextmanager
async def s3(endpoint: str) -> AsyncIterator[Any]:
    async with get_session().create_client("s3", region_name="us-east-1", endpoint_url=endpoint,
                                           aws_access_key_id="test", aws_secret_access_key="test") as client:
        yield client


def target(endpoint: str, bucket: str) -> S3Target:
    return S3Target(endpoint, bucket, access_key="test", secret_key="test")


def uploads(result: str) -> float:
    return REGISTRY.get_sample_value("castmesh_record_uploads_total", {"result": result}) or 0.0


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def segments(root: Path, names: list[str], size: int = 64 << 10) -> dict[str, bytes]:
    made = {}
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data := os.urandom(size))
        made[name] = data
    return made


@pytest.mark.asyncio
@pytest.mark.parametrize("delete_after", [False, True])
async def test_files_arrive_under_their_keys(moto: str, tmp_path: Path, delete_after: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # No keys in the target: botocore's chain finds them in the environment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    bucket = f"rec-{delete_after:d}"
    made = segments(tmp_path, ["live/cam1/init.mp4", "live/cam1/seg-00001.m4s", "live/cam 2/seg-00001.m4s"])
    noted: list[tuple[Path, str]] = []
    uploader = Uploader(parse_s3_url(f"s3://{bucket}/recordings?endpoint={moto}&delete={delete_after:d}"), tmp_path,
                        on_uploaded=lambda path, key: noted.append((path, key)))
    uploaded = REGISTRY.get_sample_value("castmesh_record_upload_bytes_total") or 0.0
    async with s3(moto) as client:
        await client.create_bucket(Bucket=bucket)
        uploader.start()
        for name in made:
            assert uploader.submit(tmp_path / name)
        await eventually(lambda: len(noted) == len(made))
        await uploader.close()
        for name, data in made.items():
            got = await client.get_object(Bucket=bucket, Key="recordings/" + name)
            assert await got["Body"].read() == data
            assert (tmp_path / name).exists() is not delete_after
    assert noted == [(tmp_path / name, "recordings/" + name) for name in made]
    assert REGISTRY.get_sample_value("castmesh_record_upload_bytes_total") == uploaded + sum(map(len, made.values()))


@pytest.mark.asyncio
async def test_large_file_goes_up_in_parts(moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upload, "MULTIPART_ABOVE", 6 << 20)
    monkeypatch.setattr(upload, "PART_SIZE", 5 << 20)  # S3's smallest part
    made = segments(tmp_path, ["live/long.m4s"], size=(12 << 20) + 123)
    uploader = Uploader(target(moto, "parts"), tmp_path)
    async with s3(moto) as client:
        await client.create_bucket(Bucket="parts")
        done = uploads("done")
        uploader.start()
        uploader.submit(tmp_path / "live/long.m4s")
        await eventually(lambda: uploads("done") == done + 1)
        await uploader.close()
        got = await client.get_object(Bucket="parts", Key="live/long.m4s")
        assert await got["Body"].read() == made["live/long.m4s"]
        assert got["ETag"].endswith('-3"')  # three parts: 5 + 5 + 2 MiB
        assert (await client.list_multipart_uploads(Bucket="parts")).get("Uploads", []) == []


@pytest.mark.asyncio
async def test_failure_is_retried(moto: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The bucket is missing at first (NoSuchBucket), and made while the uploader waits out its backoff.
    made = segments(tmp_path, ["live/x/seg-1.m4s"])
    failed, done = uploads("failed"), uploads("done")
    uploader = Uploader(target(moto, "late"), tmp_path, backoff=1.0)
    async with s3(moto) as client:
        uploader.start()
        uploader.submit(tmp_path / "live/x/seg-1.m4s")
        await eventually(lambda: uploads("failed") == failed + 1)
        await client.create_bucket(Bucket="late")
        await eventually(lambda: uploads("done") == done + 1)
        await uploader.close()
        got = await client.get_object(Bucket="late", Key="live/x/seg-1.m4s")
        assert await got["Body"].read() == made["live/x/seg-1.m4s"]
    assert uploads("failed") == failed + 1
    assert "upload.failed" in caplog.text and "NoSuchBucket" in caplog.text


@pytest.mark.asyncio
async def test_refusing_endpoint_is_given_up_on(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet: connections are refused
    made = segments(tmp_path / "rec", ["a.m4s", "b.m4s"])
    failed, gave_up, done = uploads("failed"), uploads("gave_up"), uploads("done")
    uploader = Uploader(target(f"http://127.0.0.1:{port}", "back"), tmp_path / "rec", retries=2, backoff=0.05)
    uploader.start()
    uploader.submit(tmp_path / "rec/a.m4s")
    await eventually(lambda: uploads("gave_up") == gave_up + 1)
    assert uploads("failed") == failed + 2
    assert (tmp_path / "rec/a.m4s").read_bytes() == made["a.m4s"]

    # The endpoint comes back: the next file goes up.
    moto = await asyncio.to_thread(start_moto, port, tmp_path / "moto.log")
    try:
        async with s3(f"http://127.0.0.1:{port}") as client:
            await client.create_bucket(Bucket="back")
            uploader.submit(tmp_path / "rec/b.m4s")
            await eventually(lambda: uploads("done") == done + 1)
            got = await client.get_object(Bucket="back", Key="b.m4s")
            assert await got["Body"].read() == made["b.m4s"]
    finally:
        stop(moto)
    started = time.monotonic()
    await uploader.close()
    assert time.monotonic() - started < 1


@pytest.mark.asyncio
async def test_close_during_backoff_returns_at_once(tmp_path: Path) -> None:
    segments(tmp_path, ["a.m4s"])
    failed = uploads("failed")
    uploader = Uploader(target(f"http://127.0.0.1:{free_port()}", "none"), tmp_path, backoff=30.0)
    uploader.start()
    uploader.submit(tmp_path / "a.m4s")
    await eventually(lambda: uploads("failed") == failed + 1)
    started = time.monotonic()
    await uploader.close()
    assert time.monotonic() - started < 1
    assert (tmp_path / "a.m4s").exists()
    assert not uploader.submit(tmp_path / "a.m4s")


@pytest.mark.asyncio
async def test_vanished_file_is_skipped(moto: str, tmp_path: Path) -> None:
    segments(tmp_path, ["kept.m4s"])
    vanished, failed, done = uploads("vanished"), uploads("failed"), uploads("done")
    uploader = Uploader(target(moto, "gone"), tmp_path)
    async with s3(moto) as client:
        await client.create_bucket(Bucket="gone")
        uploader.start()
        uploader.submit(tmp_path / "removed-by-retention.m4s")
        uploader.submit(tmp_path / "kept.m4s")
        await eventually(lambda: uploads("done") == done + 1)
        await uploader.close()
    assert uploads("vanished") == vanished + 1
    assert uploads("failed") == failed


@pytest.mark.asyncio
async def test_queue_is_bounded(tmp_path: Path) -> None:
    dropped = uploads("dropped")
    queued = REGISTRY.get_sample_value("castmesh_record_upload_queue") or 0.0
    uploader = Uploader(target("http://127.0.0.1:9", "full"), tmp_path, max_queued=2)  # never started
    assert [uploader.submit(tmp_path / f"{n}.m4s") for n in range(3)] == [True, True, False]
    assert uploads("dropped") == dropped + 1
    assert REGISTRY.get_sample_value("castmesh_record_upload_queue") == queued + 2
    await uploader.close()
    assert REGISTRY.get_sample_value("castmesh_record_upload_queue") == queued


def test_s3_urls() -> None:
    target = parse_s3_url("s3://rec-bucket/live/archive/?endpoint=http://127.0.0.1:9000&region=eu-west-1&delete=1")
    assert target == S3Target("http://127.0.0.1:9000", "rec-bucket", "live/archive/", "eu-west-1", delete_after=True)
    assert parse_s3_url("s3://rec-bucket") == S3Target("", "rec-bucket")
    for bad, says in [("http://rec-bucket/x", "s3://bucket"), ("s3://Rec_Bucket/x", "bucket name"),
                      ("s3://rec-bucket?endpont=http://x", "unknown"), ("s3://rec-bucket?delete=yes", "0 or 1"),
                      ("s3://rec-bucket?endpoint=127.0.0.1:9000", "http://"),
                      ("s3://rec-bucket?region=a&region=b", "twice")]:
        with pytest.raises(ValueError, match=says):
            parse_s3_url(bad)
