"""Streamed archive writes against the local S3: a body read as it arrives lands whole, in parts
when it is large, and holds one part in memory (the figure is ``python -m bench.scale``'s)."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline import storage
from pipeline.config import get_settings
from pipeline.devstack import wait_until


def _chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_chunk_reader_gives_back_what_head_looked_at():
    reader = storage.ChunkReader(iter([b"%P", b"", b"DF-1.7", b" rest"]))
    assert reader.head(5) == b"%PDF-"
    assert reader.read() == b"%PDF-1.7 rest"
    assert reader.read() == b""


@pytest.mark.parametrize("size", [1000, 19 * storage.CHUNK + 17])  # one PUT, and three parts
def test_put_stream_writes_the_whole_body(stack, size):
    data = os.urandom(size)
    key = f"test-streams/{size}.bin"
    storage.put_stream(key, storage.ChunkReader(_chunks(data, 65536)), "application/pdf")
    stored = storage.s3_client().get_object(Bucket=get_settings().results_bucket, Key=key)
    assert stored["ContentType"] == "application/pdf"
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_read_ahead_keeps_the_order_and_raises_the_error_where_it_came():
    def pages():
        yield [1, 2]
        yield [3]
        raise ConnectionError("S3 went away")

    seen = []
    with pytest.raises(ConnectionError):
        for page in storage._read_ahead(pages(), ahead=2):
            seen.append(page)
    assert seen == [[1, 2], [3]]


def test_read_ahead_stops_its_thread_when_the_reader_stops_early():
    import threading

    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    before = threading.active_count()
    reader = storage._read_ahead(endless(), ahead=2)
    assert next(reader) == 0
    reader.close()  # the consumer walks away
    from pipeline.devstack import wait_until

    wait_until(lambda: threading.active_count() == before, timeout=10, what="the read-ahead thread to end")
    assert len(produced) <= 5  # it ran at most a few items ahead, never on and on


def test_read_ahead_thread_ends_when_the_reader_stops_after_the_last_item_was_read():
    import threading

    from pipeline.devstack import wait_until

    before = threading.active_count()
    reader = storage._read_ahead(iter([1, 2, 3]), ahead=1)
    assert next(reader) == 1
    reader.close()  # the producer may be waiting to hand over 3 or the end
    wait_until(lambda: threading.active_count() == before, timeout=10, what="the read-ahead thread to end")


def test_a_request_body_that_fails_to_read_says_so_with_s3_s_error_as_its_cause():
    def chunks():
        yield b"field="
        raise ConnectionError("S3 went away")

    body = storage.request_body(chunks())
    assert next(body) == b"field="
    with pytest.raises(storage.SourceUnreadable) as caught:
        next(body)
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_a_small_object_read_whole_is_served_again_from_memory_for_its_version_only(stack):
    """The stage reads a small document whole; the submit after it streams the same version from
    memory. Deleted from S3 in between, only its kept bytes can answer; another version misses."""
    bucket, key = get_settings().staging_bucket, "test-streams/small-read-whole.pdf"
    client = storage.s3_client()
    data = os.urandom(5000)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    head, meta = storage.read_head(bucket, key, 64 * 1024)
    assert head == data and meta["size"] == len(data)
    client.delete_object(Bucket=bucket, Key=key)
    assert b"".join(storage.iter_object(bucket, key, chunk_size=1024, etag=meta["etag"])) == data
    with pytest.raises(Exception) as missed:  # not that version (nor any: it was deleted): S3 is asked, and says so
        list(storage.iter_object(bucket, key, etag="0" * 32))
    assert "NoSuchKey" in str(missed.value) or "PreconditionFailed" in str(missed.value) or "Changed" in type(missed.value).__name__


def test_a_small_object_streamed_whole_is_kept_for_the_next_read_of_its_version(stack):
    """A local file its enqueuer measured is first read by baidu's check, whole, then by the submit."""
    stack.activate()
    bucket, key = get_settings().staging_bucket, "test-streams/small-streamed.pdf"
    client = storage.s3_client()
    data = os.urandom(3000)
    etag = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
    assert b"".join(storage.iter_object(bucket, key, chunk_size=1000, etag=etag)) == data
    client.delete_object(Bucket=bucket, Key=key)
    assert b"".join(storage.iter_object(bucket, key, chunk_size=1000, etag=etag)) == data  # from memory: S3 has it no more


def test_only_small_objects_are_kept_and_only_the_last_few():
    kept = storage.ReadWhole(entries=2, max_bytes=10)
    kept.keep("b", "big", "e", b"x" * 11)
    for name in ("one", "two", "three"):
        kept.keep("b", name, "e", name.encode())
    assert kept.get("b", "big", "e") is None and kept.get("b", "one", "e") is None
    assert (kept.get("b", "two", "e"), kept.get("b", "three", "e"), kept.get("b", "three", None)) == (b"two", b"three", None)


def test_a_listing_by_folders_at_once_gives_every_key_once_in_the_order_of_a_flat_listing(stack):
    """Files directly under the prefix and in folders, with names that sort around the folders'
    ('a.pdf' < 'a/...' < 'a0'), nested folders, and more keys than a page."""
    bucket, prefix = get_settings().staging_bucket, "test-listing-folders/"
    client = storage.s3_client()
    names = ["a.pdf", "a0.pdf", "z.pdf", "b/deep/x.pdf", "b/y.pdf"] + [f"a/{n:04d}.pdf" for n in range(1100)] + [f"c/{n}.pdf" for n in range(30)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: client.put_object(Bucket=bucket, Key=prefix + name, Body=b"%PDF-1.4\n"), names))
    flat = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix) for o in page["Contents"]]
    assert len(flat) == len(names)
    for at_once in (1, 2, 4):
        assert [o["Key"] for o in storage.list_objects(bucket, prefix, folders_at_once=at_once)] == flat
    threads = threading.active_count()
    listing = storage.list_objects(bucket, prefix, ahead=1, folders_at_once=3)
    assert next(listing)["Key"] == prefix + "a.pdf"
    listing.close()  # the reader stops early: every folder being read ahead lets its thread end
    wait_until(lambda: threading.active_count() <= threads, 10, "the read-ahead threads to end")


@pytest.mark.parametrize(("size_mb", "expected"), [(0.1, ["PutObject"]), (9, ["CreateMultipartUpload", "UploadPart", "UploadPart", "CompleteMultipartUpload"])])
def test_a_local_file_goes_up_in_one_put_below_the_threshold_and_in_parts_above_it(stack, tmp_path, size_mb, expected):
    stack.activate()
    source = tmp_path / "doc.bin"
    data = os.urandom(int(size_mb * storage.CHUNK))
    source.write_bytes(data)
    client, calls = storage.s3_client(), []

    def note(model, **_):
        calls.append(model.name)

    client.meta.events.register("before-call.s3", note)
    try:
        storage.upload_file(source, get_settings().staging_bucket, f"test-uploads/{size_mb}.bin")
    finally:
        client.meta.events.unregister("before-call.s3", note)
    assert sorted(calls) == sorted(expected)  # 8 MB threshold (the default): 9 MB is parts of 8 and 1
    stored = storage.read_object(get_settings().staging_bucket, f"test-uploads/{size_mb}.bin")
    assert stored == data


def test_a_full_disk_under_the_spool_delays_the_step_without_counting_against_the_document(monkeypatch):
    """``put_stream`` spools a large body to a temporary file before its upload: a worker whose
    disk is full fails there, through no fault of the document. The step waits it out, as for an
    S3 or Redis outage, with its attempts untouched (the job's deadline still bounds it)."""
    import errno
    import io
    import tempfile

    from pipeline import driver
    from pipeline.errors import is_outage
    from pipeline.models import Job

    class FullDisk(io.BytesIO):
        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kwargs: FullDisk())

    def archiving(job: Job) -> tuple[Job, float | None]:
        storage.put_stream("idp/x/highlight.pdf", io.BytesIO(b"%PDF-1.7 " * 1000), "application/pdf")
        raise AssertionError("the spool cannot have been written")

    monkeypatch.setitem(driver.STAGE_FUNCTIONS, "archive", archiving)
    job = Job(job_id="0" * 32, provider="idp", source="s3://b/k", location="s3://b/k", attempts=4)
    step = driver._execute("archive", job)
    assert step is not None and step.stage == "archive" and step.job.attempts == 4 and step.countdown > 0
    assert is_outage(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_outage(OSError(errno.ENOENT, "No such file or directory"))  # a missing file is the document's own
