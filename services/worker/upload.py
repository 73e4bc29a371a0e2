"""Recording uploads: each finished segment file under a record directory goes to an S3 bucket (AWS or a look-alike
such as MinIO or Ceph) as prefix + its path under the root, one file at a time, by one background task.

A failed attempt (refused or timed-out connection, 5xx, AccessDenied, NoSuchBucket...) is logged and tried again
after an exponential backoff, `retries` times; then the upload is given up and the file stays on disk, as it does
when the uploader closes with files still queued. A file that vanished before its upload (retention removed it)
is skipped. Once uploaded, the file is reported to `on_uploaded` and, with `delete_after`, deleted.

Limits: at most `max_queued` files wait (past that `submit` refuses and counts a drop); one upload is in flight; a
file is read whole into memory up to MULTIPART_ABOVE bytes, and above that sent as a multipart upload of PART_SIZE
parts read one at a time; an attempt is abandoned after READ_TIMEOUT plus its size at MIN_RATE bytes a second (the
read timeout alone misses a server that stops reading the body). botocore's own retries are off: the backoff here
is the only one.

aiobotocore (botocore's signing, credential chain and errors on aiohttp), not aioboto3: measured in docs/spikes/s3/,
the same cost per upload, one layer fewer, and aioboto3 pins an older aiobotocore.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from prometheus_client import Counter, Gauge

from castmesh.mesh.logs import event

log = logging.getLogger("castmesh.worker")

MULTIPART_ABOVE = 64 << 20  # bytes: larger files go up in parts
PART_SIZE = 16 << 20  # bytes per part (S3's minimum is 5 MiB); over plain HTTP botocore hashes each in the event loop
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
MIN_RATE = 256 << 10  # bytes a second: an attempt gets READ_TIMEOUT plus its size at this rate
CLOSE_TIMEOUT = 5.0  # seconds close() lets the upload in flight finish
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rule for bucket names

UPLOADS = Counter("castmesh_record_uploads", "Recording upload attempts and files by how they ended: done, failed "
                  "(tried again later), gave_up, vanished (the file was gone), dropped (the queue was full)",
                  ["result"])
UPLOAD_BYTES = Counter("castmesh_record_upload_bytes", "Bytes of recording files uploaded")
QUEUED = Gauge("castmesh_record_upload_queue", "Recording files waiting for upload or uploading")


@dataclass(frozen=True, slots=True)
class S3Target:
    """Where uploads go. Empty keys: botocore's credential chain finds them (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role)."""

    endpoint: str  # "" for AWS itself, else the look-alike's URL, e.g. http://127.0.0.1:9000
    bucket: str
    prefix: str = ""  # put before every key as it is: "rec/" makes rec/live/x/1.m4s
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    delete_after: bool = False  # remove the local file once it is uploaded

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("an S3 target needs a bucket")
        if self.endpoint:
            url = urlsplit(self.endpoint)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ValueError(f"S3 endpoint must be an http:// or https:// URL, not {self.endpoint!r}")
        if bool(self.access_key) != bool(self.secret_key):
            raise ValueError("give both an S3 access key and its secret key, or neither")


def parse_s3_url(text: str) -> S3Target:
    """`s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&delete=1` as an S3Target. The path is a
    folder (`s3://b/rec` and `s3://b/rec/` both put keys under rec/); credentials never come from the URL."""
    url = urlsplit(text)
    if url.scheme != "s3" or not url.netloc:
        raise ValueError(f"an S3 URL looks like s3://bucket/prefix?endpoint=...&region=...&delete=1, not {text!r}")
    if not BUCKET.fullmatch(url.netloc):
        raise ValueError(f"{url.netloc!r} in {text!r} is no S3 bucket name (3-63 of a-z, 0-9, '.' and '-')")
    try:
        pairs = parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
    except ValueError as exc:
        raise ValueError(f"bad query in S3 URL {text!r}: {exc}") from None
    query = dict(pairs)
    if len(query) < len(pairs):
        raise ValueError(f"a parameter is given twice in S3 URL {text!r}")
    unknown = set(query) - {"endpoint", "region", "delete"}
    if unknown:
        raise ValueError(f"unknown S3 URL parameter(s) {', '.join(sorted(unknown))} in {text!r}: "
                         "endpoint, region and delete are known")
    delete = query.get("delete", "0")
    if delete not in ("0", "1"):
        raise ValueError(f"delete= in an S3 URL is 0 or 1, not {delete!r}")
    prefix = url.path.strip("/")
    return S3Target(endpoint=query.get("endpoint", ""), bucket=url.netloc, prefix=prefix + "/" if prefix else "",
                    region=query.get("region") or "us-east-1", delete_after=delete == "1")


class Uploader:
    """Uploads the files given to `submit`, in order, from one task (`start`, then `close`)."""

    def __init__(self, target: S3Target, root: Path, retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 30.0, max_queued: int = 10000,
                 on_uploaded: Callable[[Path, str], None] | None = None) -> None:
        if max_queued < 1 or retries < 0:
            raise ValueError("an uploader queues at least one file and retries zero or more times")
        self.target = target
        self.root = root
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_queued = max_queued
        self.on_uploaded = on_uploaded
        self._queue: asyncio.Queue[tuple[Path, str]] = asyncio.Queue(max_queued)
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._waiting = False  # the task is waiting for the queue: nothing in flight
        self._current: Path | None = None  # a file taken from the queue and not finished with

    def key(self, path: Path) -> str:
        """The object key of a file under the root (ValueError for one that is not)."""
        return self.target.prefix + path.relative_to(self.root).as_posix()

    def submit(self, path: Path) -> bool:
        """Queues a finished file; False (and a counted drop) if the queue is full or the uploader closed."""
        key = self.key(path)
        if self._closing.is_set():
            return self._drop(path, key, "closed")
        try:
            self._queue.put_nowait((path, key))
        except asyncio.QueueFull:
            return self._drop(path, key, "queue full")
        QUEUED.inc()
        return True

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the uploader was started already")
        self._task = asyncio.create_task(self._run(), name="record-uploads")

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stops: the attempt in flight gets `timeout` seconds to finish; queued files stay on disk."""
        self._closing.set()
        task = self._task
        if task is not None:
            if self._waiting:
                task.cancel()
            _, pending = await asyncio.wait({task}, timeout=timeout)
            if pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = self._queue.qsize() + (self._current is not None)
        QUEUED.dec(left)
        while not self._queue.empty():
            self._queue.get_nowait()
        if left:
            event(log, "upload.closed", level=logging.WARNING, left=left, bucket=self.target.bucket)

    def _drop(self, path: Path, key: str, why: str) -> bool:
        UPLOADS.labels(result="dropped").inc()
        event(log, "upload.dropped", level=logging.WARNING, key=key, path=path, why=why)
        return False

    async def _run(self) -> None:
        target = self.target
        config = AioConfig(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                           retries={"total_max_attempts": 1},
                           # path-style: look-alikes seldom answer at bucket.host; AWS itself prefers virtual hosts
                           s3={"addressing_style": "path"} if target.endpoint else None,
                           # botocore >= 1.36 adds CRC32 checksums to every upload, which not every look-alike takes
                           request_checksum_calculation="when_required",
                           response_checksum_validation="when_required")
        try:
            async with get_session().create_client(
                    "s3", region_name=target.region, endpoint_url=target.endpoint or None, config=config,
                    aws_access_key_id=target.access_key or None,
                    aws_secret_access_key=target.secret_key or None) as client:
                while not self._closing.is_set():
                    self._waiting = True
                    path, key = await self._queue.get()
                    self._waiting = False
                    self._current = path
                    if not await self._deliver(client, path, key):
                        return  # closing during a backoff: the file stays queued, for close() to count
                    self._current = None
                    QUEUED.dec()
        except Exception as exc:  # no client (a bad region, say): say so, and refuse files from now on
            self._closing.set()
            event(log, "upload.stopped", level=logging.ERROR, bucket=target.bucket,
                  error=f"{type(exc).__name__}: {exc}")

    async def _deliver(self, client: Any, path: Path, key: str) -> bool:
        """True once the file is done with (uploaded, given up on, or gone); False if the uploader closed first."""
        for attempt in range(1, self.retries + 2):
            started = time.monotonic()
            try:
                size = await self._send(client, path, key)
            except FileNotFoundError:
                UPLOADS.labels(result="vanished").inc()
                event(log, "upload.vanished", level=logging.WARNING, key=key, path=path)
                return True
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if attempt > self.retries:
                    UPLOADS.labels(result="gave_up").inc()
                    event(log, "upload.gave_up", level=logging.ERROR, key=key, path=path, attempts=attempt,
                          error=error)
                    return True
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                UPLOADS.labels(result="failed").inc()
                event(log, "upload.failed", level=logging.WARNING, key=key, attempt=attempt, retry_in=delay,
                      error=error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                if self._closing.is_set():
                    return False
                continue
            UPLOADS.labels(result="done").inc()
            UPLOAD_BYTES.inc(size)
            event(log, "upload.done", key=key, bytes=size, seconds=round(time.monotonic() - started, 3),
                  attempts=attempt)
            self._finish(path, key)
            return True
        raise AssertionError("unreachable: the last attempt returns")

    async def _send(self, client: Any, path: Path, key: str) -> int:
        size = (await asyncio.to_thread(path.stat)).st_size
        async with asyncio.timeout(READ_TIMEOUT + size / MIN_RATE):
            if size <= MULTIPART_ABOVE:
                body = await asyncio.to_thread(path.read_bytes)
                await client.put_object(Bucket=self.target.bucket, Key=key, Body=body)
                return len(body)
            return await self._send_parts(client, path, key)

    async def _send_parts(self, client: Any, path: Path, key: str) -> int:
        bucket = self.target.bucket
        with await asyncio.to_thread(path.open, "rb") as file:  # first: a vanished file starts no multipart upload
            upload_id = (await client.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
            try:
                parts: list[dict[str, Any]] = []
                sent = 0
                while part := await asyncio.to_thread(file.read, PART_SIZE):
                    answer = await client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, Body=part,
                                                      PartNumber=len(parts) + 1)
                    parts.append({"PartNumber": len(parts) + 1, "ETag": answer["ETag"]})
                    sent += len(part)
                await client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts})
                return sent
            except Exception:
                # An unfinished multipart upload's parts are kept (and billed) until aborted; when this fails too,
                # or the attempt timed out, a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes them.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
                raise

    def _finish(self, path: Path, key: str) -> None:
        if self.on_uploaded is not None:
            try:
                self.on_uploaded(path, key)
            except Exception as exc:  # the index's bug: the upload stands, and later ones go on
                event(log, "upload.callback_failed", level=logging.ERROR, key=key,
                      error=f"{type(exc).__name__}: {exc}")
        if self.target.delete_after:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                event(log, "upload.delete_failed", level=logging.WARNING, path=path, error=str(exc))
