"""Streamed archive writes against the local S3: a body read as it arrives lands whole, in parts
when it is large, and holds one part in memory (the figure is ``python -m bench.scale``'s)."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline import storage
from pipeline.config import get_settings


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
