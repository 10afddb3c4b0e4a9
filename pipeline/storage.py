"""S3 through boto3: the staging bucket where documents wait, and the results archive.

Archive keys are deterministic (``<provider>/<job_id>/<name>``) so that a re-run finds
what is already done, and a finished archive is never overwritten: ``result.json`` and
``error.json`` are written with ``If-None-Match: *`` and the first writer wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import io
import json
import logging
import queue
import shutil
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from pipeline.config import Settings, get_settings
from pipeline.errors import BadInput
from pipeline.runtime import BuiltOnce

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
S3_CONNECTIONS = 50
FINAL_NAMES = ("result.json", "error.json")


@BuiltOnce
def _client(endpoint: str | None, region: str, key_id: str | None, secret: str | None, raw_timestamps: bool = False) -> BaseClient:
    session = botocore.session.get_session()
    if raw_timestamps:
        # A listing parses LastModified for every key, with dateutil: more than half of what a
        # page of 1,000 keys costs to parse (bench.listing), for a field docpipe never reads.
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=session).client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        # Timeouts so that an S3 that stopped answering fails a request instead of hanging a thread.
        # A pool as large as the threads that share the client: the receiver streams a download per
        # thread (40), and past botocore's default of 10 each extra request opened a connection
        # and threw it away ("Connection pool is full"), in the very burst that starts a batch.
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"},
            signature_version="s3v4",
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=S3_CONNECTIONS,
        ),
    )


def s3_client(settings: Settings | None = None, *, raw_timestamps: bool = False) -> BaseClient:
    """One boto3 client per process and configuration (boto3 clients are thread-safe); with
    ``raw_timestamps``, one whose answers keep their timestamps as the text S3 sent."""
    s = settings or get_settings()
    return _client(
        s.s3_endpoint_url,
        s.s3_region,
        s.aws_access_key_id.get_secret_value() if s.aws_access_key_id else None,
        s.aws_secret_access_key.get_secret_value() if s.aws_secret_access_key else None,
        raw_timestamps,
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key is kept verbatim (``#`` and ``?`` are legal in keys)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return bucket, key


def ensure_buckets(settings: Settings | None = None, also: Iterable[str] = ()) -> list[str]:
    """Create the staging and results buckets (and ``also``) if they are missing, each with the rule
    that aborts stale multipart uploads (``abort_stale_uploads``); return those created."""
    s = settings or get_settings()
    client = s3_client(s)
    created = []
    for bucket in (s.staging_bucket, s.results_bucket, *also):
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=bucket)
            abort_stale_uploads(client, bucket)
            created.append(bucket)
    return created


STALE_UPLOAD_DAYS = 1
STALE_UPLOAD_RULE = "docpipe-abort-incomplete-multipart-uploads"


def abort_stale_uploads(client: BaseClient, bucket: str) -> bool:
    """Give a bucket docpipe created the lifecycle rule that aborts multipart uploads left
    incomplete for ``STALE_UPLOAD_DAYS``; False (and a warning) where the server refuses it.

    Why: a process killed in the middle of a multipart upload (the enqueuer staging a large
    file, a worker streaming idp's highlight PDF) neither completes nor aborts it. What was killed
    runs again and uploads anew, so no document is lost, but S3 keeps the orphaned parts, listed
    nowhere and billed, until such a rule aborts them. A bucket that already existed keeps the
    rules its owner gave it: putting a lifecycle configuration replaces all of them.
    """
    rule = {
        "ID": STALE_UPLOAD_RULE,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": STALE_UPLOAD_DAYS},
    }
    try:
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [rule]})
    except ClientError as exc:
        log.warning("bucket %s: lifecycle rule for stale multipart uploads not set (%s)", bucket, exc.response.get("Error", {}).get("Code"))
        return False
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def upload_file(path: Path, bucket: str, key: str, settings: Settings | None = None) -> None:
    """Stream a local file up: one PUT below the multipart threshold, parts above it.

    Below it, not through boto3's ``upload_file``: its transfer manager starts a pool of
    threads for every call, which cost an enqueuer more CPU than the PUT itself.
    """
    s = settings or get_settings()
    if path.stat().st_size < multipart_threshold(s):
        put_small(bucket, key, path.read_bytes(), s)
        return
    config = TransferConfig(multipart_threshold=multipart_threshold(s), multipart_chunksize=8 * CHUNK)
    s3_client(s).upload_file(str(path), bucket, key, Config=config)


def multipart_threshold(settings: Settings | None = None) -> int:
    """Bytes from which an upload goes in parts (below it, one PUT)."""
    return (settings or get_settings()).multipart_threshold_mb * CHUNK


def put_small(bucket: str, key: str, data: bytes, settings: Settings | None = None) -> str:
    """One PUT of bytes held in memory (below the multipart threshold); the ETag S3 gave them."""
    return str(s3_client(settings).put_object(Bucket=bucket, Key=key, Body=data)["ETag"]).strip('"')


NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def head(bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES:
            return None
        raise


def read_if_present(bucket: str, key: str) -> bytes | None:
    """The whole object, or None when there is none: one GET, no HEAD or LIST first."""
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES:
            return None
        raise


class SourceChanged(BadInput):
    """The object is no longer the version the job was made from (its ETag changed): the job's
    id was derived from that version, so no other may be processed under it."""

    def __init__(self, message: str, **_: object) -> None:
        super().__init__(message, code="source_changed")


def _pinned(etag: str | None) -> dict[str, str]:
    return {"IfMatch": f'"{etag}"'} if etag else {}


def _get(bucket: str, key: str, etag: str | None, **kwargs: Any) -> dict[str, Any]:
    try:
        return s3_client().get_object(Bucket=bucket, Key=key, **_pinned(etag), **kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            raise SourceChanged(f"s3://{bucket}/{key} changed since the job was made from it") from None
        raise


class ReadWhole:
    """Small objects this process has just read whole, by (bucket, key, ETag), the last few only.

    The steps of one document read it more than once in a row, in the same thread
    (``driver.run_inline``): the stage its first 64 kB, which for most documents is all of it
    (or, for a local file its enqueuer measured, baidu's ``check`` the whole of it), then the
    submit, to send it. Each read was a GET of the eight a document cost (bench.overhead), where
    S3 was the bound. Kept under its ETag, an entry is exactly the version a pinned read would get (a
    replaced object has another ETag and misses); bounded in count and size, it holds no
    more than ``entries`` x ``max_bytes``, and a miss reads S3 as before.
    """

    def __init__(self, entries: int = 32, max_bytes: int = 64 * 1024) -> None:
        self.entries, self.max_bytes = entries, max_bytes
        self._kept: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, bucket: str, key: str, etag: str | None, data: bytes) -> None:
        if not etag or len(data) > self.max_bytes:
            return
        with self._lock:
            self._kept[(bucket, key, etag)] = data
            self._kept.move_to_end((bucket, key, etag))
            while len(self._kept) > self.entries:
                self._kept.popitem(last=False)

    def get(self, bucket: str, key: str, etag: str | None) -> bytes | None:
        if not etag:
            return None
        with self._lock:
            return self._kept.get((bucket, key, etag))


READ_WHOLE = ReadWhole()


def read_head(bucket: str, key: str, length: int, etag: str | None = None) -> tuple[bytes, dict[str, Any]] | None:
    """The first ``length`` bytes and the object's metadata (``size``, ``etag``) in one request; None if absent.

    With ``etag``, only that version is read: ``SourceChanged`` when the object was replaced.
    An object read whole is kept in ``READ_WHOLE`` for ``iter_object``.
    """
    try:
        response = _get(bucket, key, etag, Range=f"bytes=0-{length - 1}")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        if code == "InvalidRange":  # what S3 answers for a range of an empty object
            return b"", {"size": 0, "etag": etag}
        raise
    data = response["Body"].read()
    total = str(response.get("ContentRange", "")).rpartition("/")[2]
    size = int(total) if total.isdigit() else int(response.get("ContentLength", len(data)))
    meta = {"size": size, "etag": str(response.get("ETag", "")).strip('"') or None}
    if size == len(data):
        READ_WHOLE.keep(bucket, key, meta["etag"], data)
    return data, meta


def read_range(bucket: str, key: str, start: int, end: int, etag: str | None = None) -> bytes:
    """Bytes ``start..end`` inclusive; a negative ``start`` reads the last ``-start`` bytes."""
    rng = f"bytes=-{-start}" if start < 0 else f"bytes={start}-{end}"
    return _get(bucket, key, etag, Range=rng)["Body"].read()


def iter_object(bucket: str, key: str, chunk_size: int = CHUNK, etag: str | None = None) -> Iterator[bytes]:
    """The object in chunks, streamed from S3; from memory when this version was just read whole
    (and a small one is kept, read whole, for the next read of it)."""
    kept = READ_WHOLE.get(bucket, key, etag)
    if kept is None:
        response = _get(bucket, key, etag)
        body = response["Body"]
        if int(response.get("ContentLength", READ_WHOLE.max_bytes + 1)) > READ_WHOLE.max_bytes:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()
            return
        with contextlib.closing(body):
            kept = body.read()
        READ_WHOLE.keep(bucket, key, str(response.get("ETag", "")).strip('"') or None, kept)
    yield from (kept[at : at + chunk_size] for at in range(0, len(kept), chunk_size))


class SourceUnreadable(Exception):
    """The document could not be read from S3 while a request was carrying it out (its cause is
    S3's error). The request never got its whole body, announced by its Content-Length, so the
    provider cannot have taken it: the submit was not sent, and waits like any S3 outage."""


@contextmanager
def _reading_source() -> Iterator[None]:
    """Around each read of a document a request carries: its errors become ``SourceUnreadable``."""
    try:
        yield
    except Exception as exc:
        raise SourceUnreadable(f"{type(exc).__name__} while reading the document from S3") from exc


def request_body(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` as a request body: an error in reading them comes out as ``SourceUnreadable``,
    which a provider's send tells from a request the provider may have taken."""
    iterator = iter(chunks)
    while True:
        with _reading_source():
            chunk = next(iterator, None)
        if chunk is None:
            return
        yield chunk


class ObjectStream:
    """An S3 object read as a request body goes out, with its length known ahead.

    httpx sends a file-like body in chunks, and gives it a Content-Length when it can learn the
    length by seeking to the end and back: this answers that peek from the size ``stage``
    measured, and opens the object only at the first read, so a request that waits for its
    rate token holds no S3 connection meanwhile. Read once, from the start: a resend needs a new
    stream. ``etag`` pins the version that size belongs to.
    """

    def __init__(self, bucket: str, key: str, size: int, etag: str | None = None) -> None:
        self._where, self._size, self._etag = (bucket, key), size, etag
        self._body: Any = None
        self._position = 0

    def fileno(self) -> int:
        raise OSError("an S3 object is not a local file")

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2 and offset == 0:  # the length, as httpx peeks it
            return self._size
        if whence == 0 and offset == self._position:
            return self._position
        raise io.UnsupportedOperation("a streamed S3 object is read once, from its start")

    def read(self, size: int = -1) -> bytes:
        if self._position >= self._size:
            return b""  # all of it is out: nothing can fail once the body is whole
        with _reading_source():
            if self._body is None:
                self._body = _get(*self._where, self._etag)["Body"]
            chunk = self._body.read(None if size is None or size < 0 else size)
        self._position += len(chunk)
        return chunk

    def close(self) -> None:
        if self._body is not None:
            self._body.close()


class ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (an HTTP response read as it arrives), so
    that boto3 can upload it part by part; ``head`` looks at the first bytes without using them."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def head(self, size: int) -> bytes:
        while len(self._pending) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._pending += chunk
        return self._pending[:size]

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = next((chunk for chunk in self._chunks if chunk), b"")
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


# Parts read and sent by the calling thread, one in memory at a time (boto3's default runs ten
# threads of 8 MB parts).
_STREAMED = TransferConfig(multipart_threshold=8 * CHUNK, multipart_chunksize=8 * CHUNK, use_threads=False)


def put_stream(key: str, body: BinaryIO, content_type: str) -> None:
    """Write one archive object from a stream, in parts when it is large.

    The stream is first copied to a temporary file: boto3 keeps every part of a stream it cannot
    seek until the upload completes (a 49 MB body cost a worker 108 MB), and reads a seekable
    file one part at a time (8 MB). The download also ends before the upload starts, so a slow
    S3 does not hold the provider's connection open."""
    settings = get_settings()
    with tempfile.TemporaryFile(prefix="docpipe-") as spool:
        shutil.copyfileobj(body, spool, CHUNK)
        spool.seek(0)
        s3_client().upload_fileobj(spool, settings.results_bucket, key, ExtraArgs={"ContentType": content_type}, Config=_STREAMED)


def read_object(bucket: str, key: str, etag: str | None = None) -> bytes:
    """Whole object; only for documents already checked against the provider's (small) size limit."""
    return _get(bucket, key, etag)["Body"].read()


def presign_get(bucket: str, key: str, expires: int = 3600) -> str:
    return s3_client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)


def list_objects(bucket: str, prefix: str = "", *, ahead: int = 2, folders_at_once: int = 4) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix``, in key order, as the listing goes.

    S3 lists one page of 1,000 keys per request, one request after the other: a listing's
    pace is one request's time per thousand keys, whatever the caller can take (the local S3
    listed 1,800 keys/s; the issue asks 2,000 enqueued per second). So the prefix is listed
    one level deep first (``Delimiter="/"``); the keys directly under it come from that
    listing, and each folder is listed on its own, ``folders_at_once`` of them at the same
    time, ``ahead`` pages each read in advance, and handed on in key order. A prefix with no
    folders is listed as before, a page at a time, the next ``ahead`` pages read in a thread.
    What is held: ``folders_at_once`` x (``ahead`` + 1) pages at most, and up to 1,000 x
    ``ahead`` top-level entries waiting behind a folder being handed on."""
    client = s3_client(raw_timestamps=True)
    window: deque[_ReadAhead | dict[str, Any]] = deque()  # files, and folders being listed, in key order
    folders = 0
    try:
        for entry in _read_ahead(_one_level(client, bucket, prefix), ahead):
            if isinstance(entry, str):
                window.append(_ReadAhead((page.get("Contents", []) for page in _pages(client, bucket, entry)), ahead))
                folders += 1
            else:
                window.append(entry)
            while folders >= folders_at_once or (window and len(window) > 1000 * ahead):
                folders -= yield from _hand_on(window.popleft())
        while window:
            yield from _hand_on(window.popleft())
    finally:
        for pending in window:
            if isinstance(pending, _ReadAhead):
                pending.close()


def _hand_on(entry: _ReadAhead | dict[str, Any]) -> Generator[dict[str, Any], None, int]:
    """Yield a file, or every object of a folder's listing; the number of folders done (0 or 1)."""
    if not isinstance(entry, _ReadAhead):
        yield entry
        return 0
    try:
        for page in entry:
            yield from page
    finally:
        entry.close()
    return 1


def _pages(client: BaseClient, bucket: str, prefix: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
    paginator = client.get_paginator("list_objects_v2")
    yield from paginator.paginate(Bucket=bucket, Prefix=prefix, **({"Delimiter": delimiter} if delimiter else {}))


def _one_level(client: BaseClient, bucket: str, prefix: str) -> Iterator[dict[str, Any] | str]:
    """The objects directly under ``prefix`` and its folders (as their prefixes), in key order: a
    folder's keys sort where its prefix does, so merging the two lists of each page by that
    name keeps the order of a flat listing."""
    for page in _pages(client, bucket, prefix, delimiter="/"):
        files = page.get("Contents", [])
        subfolders = [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        yield from heapq.merge(files, subfolders, key=lambda e: e if isinstance(e, str) else e["Key"])


_DONE = object()


class _ReadAhead:
    """``items``, produced by a thread from the moment this is made, up to ``ahead`` in advance; its
    error is raised to the reader, in order. ``close`` lets the thread end (a reader that stops
    early, or never started)."""

    def __init__(self, items: Iterator[Any], ahead: int) -> None:
        self._buffer: queue.Queue[Any] = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._items = items
        threading.Thread(target=self._produce, name="read-ahead", daemon=True).start()

    def _hand(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._buffer.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._hand(item):
                    return
            self._hand(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            self._hand(exc)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()


def _read_ahead(items: Iterator[Any], ahead: int) -> Iterator[Any]:
    """``items``, produced by a thread up to ``ahead`` in advance (``_ReadAhead``), until the reader stops."""
    reader = _ReadAhead(items, ahead)
    try:
        yield from reader
    finally:
        reader.close()


# --- the archive -------------------------------------------------------------------------


def archive_prefix(provider: str, job_id: str) -> str:
    return f"{provider}/{job_id}/"


def archive_uri(provider: str, job_id: str, name: str = "") -> str:
    return f"s3://{get_settings().results_bucket}/{archive_prefix(provider, job_id)}{name}"


def put_bytes(key: str, data: bytes, content_type: str, *, only_if_absent: bool = False) -> bool:
    """Write one archive object; with ``only_if_absent`` return False instead of overwriting."""
    kwargs: dict[str, Any] = {"Bucket": get_settings().results_bucket, "Key": key, "Body": data, "ContentType": content_type}
    if only_if_absent:
        kwargs["IfNoneMatch"] = "*"
    try:
        s3_client().put_object(**kwargs)
    except ClientError as exc:
        if only_if_absent and exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise
    return True


def put_json(key: str, payload: Any, *, only_if_absent: bool = False) -> bool:
    data = json.dumps(payload, ensure_ascii=False, indent=2, default=str).encode()
    return put_bytes(key, data, "application/json", only_if_absent=only_if_absent)


def finished(provider: str, job_id: str) -> str | None:
    """Which final file (``result.json`` or ``error.json``) the archive holds for a job, if any.

    One LIST of the archive's top level instead of a HEAD per name: it is asked for every
    document enqueued and every handle waited on, and S3 bills and paces per request.
    """
    prefix = archive_prefix(provider, job_id)
    page = s3_client().list_objects_v2(Bucket=get_settings().results_bucket, Prefix=prefix, Delimiter="/")
    names = {o["Key"][len(prefix) :] for o in page.get("Contents", [])}
    return next((name for name in FINAL_NAMES if name in names), None)


def archive_names(provider: str, job_id: str) -> set[str]:
    """The names in a job's archive prefix (``result.json``, ``raw.json``, artifacts, ``error.json``)."""
    prefix = archive_prefix(provider, job_id)
    return {o["Key"][len(prefix) :] for o in list_objects(get_settings().results_bucket, prefix)}


def get_json(key: str) -> Any:
    return json.loads(read_object(get_settings().results_bucket, key))
