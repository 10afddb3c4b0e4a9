"""Ingest of a big S3 listing: does memory stay flat, and how fast are documents enqueued?

``python -m bench.listing [--keys 100000]`` puts ``--keys`` small objects under one prefix of
the local stack's S3 (moto behind the signature-checking front), then runs
``pipeline.ingest``'s way over the prefix in this process (``batches.fill_location``: a chunk
of the listing per round trip), with no worker consuming, and samples this process' resident
memory as it goes. It prints the RSS at each tenth of the listing, the growth from the first
tenth to the end, and the enqueue rate. Then what bounds it: the pace of the listing alone
(``storage.list_objects``, which lists a prefix's folders a few at once), and docpipe's own
pace from the first ``--held-keys`` of the listing held in memory; and the baseline, the same
listing enqueued one document at a time (a HEAD, a LIST, a Lua start and a publish each; on
its first ``--baseline-keys``). Last, one JSON line.

What memory can grow with: nothing per document is kept by the ingest (listing pages are
dropped as they are consumed, the window of documents in flight is bounded); what stays in
Redis (job records, queued messages, the batch's member set) is Redis' memory, not ours.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import batches, storage
from pipeline.config import get_settings
from pipeline.devstack import LocalStack
from pipeline.runtime import get_runtime


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill_bucket(bucket: str, prefix: str, keys: int, threads: int = 16) -> float:
    """Put ``keys`` small PDFs."""
    client = storage.s3_client(get_settings())
    client.create_bucket(Bucket=bucket)
    started = time.monotonic()

    def put(n: int) -> None:
        body = f"%PDF-1.4\n% document {n}\n%%EOF\n".encode()
        client.put_object(Bucket=bucket, Key=f"{prefix}{n // 1000:04d}/doc-{n:07d}.pdf", Body=body)

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, range(keys)):
            pass
    return time.monotonic() - started


LOCATION = "s3://bench-inbox/scans/"


def from_memory(listed: list[tuple[str, str | None]]) -> float:
    """docpipe's own pace, S3's listing aside: the same keys enqueued from a listing already
    held in memory (under other options, so that they are new jobs). Documents per second."""
    name = batches.new_name("baidu")
    batches.create(get_runtime().redis, name, provider="baidu", location=LOCATION)
    started = time.monotonic()
    filled = batches.fill_listed(name, listed, "baidu", {"held": "1"})
    return filled.enqueued / (time.monotonic() - started)


def one_by_one(keys: int, concurrency: int) -> float:
    """The baseline: the first ``keys`` of the same listing enqueued one document at a time
    (a HEAD, a LIST of its archive, a Lua start and a publish each), as a list of s3:// URIs
    is; under other options, so that they are new jobs. Documents per second."""
    listed = itertools.islice(batches.list_sources(LOCATION), keys)
    name = batches.new_name("baidu")
    batches.create(get_runtime().redis, name, provider="baidu", location=LOCATION)
    started = time.monotonic()
    filled = batches.fill(name, (source for source, _ in listed), "baidu", {"baseline": "1"}, concurrency=concurrency)
    return filled.enqueued / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--baseline-keys", type=int, default=3000, help="keys enqueued one by one, for the baseline")
    parser.add_argument("--concurrency", type=int, default=8, help="documents the one-by-one baseline enqueues at once")
    parser.add_argument("--held-keys", type=int, default=30000, help="keys enqueued again from the listing held in memory")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.keys, args.baseline_keys, args.concurrency, args.held_keys)))
    return 0


def run(keys: int, baseline_keys: int = 3000, concurrency: int = 8, held_keys: int = 30000) -> dict[str, Any]:
    """Fill a bucket, enqueue it from its listing, print the table; the figures."""
    with tempfile.TemporaryDirectory(prefix="docpipe-listing-") as tmp:
        stack = LocalStack(Path(tmp))
        try:
            stack.start_base(("baidu",))
            stack.activate()
            print(f"putting {keys} objects into s3://bench-inbox/scans/ ...", flush=True)
            put_s = fill_bucket("bench-inbox", "scans/", keys)
            samples: list[tuple[float, int, float]] = []  # (seconds, documents enqueued, RSS MB)
            done = threading.Event()
            counted = [0]

            def sample() -> None:
                started = time.monotonic()
                while not done.wait(0.5):
                    samples.append((time.monotonic() - started, counted[0], rss_mb()))

            def count(_outcome) -> None:
                counted[0] += 1

            idle = rss_mb()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            name = batches.new_name("baidu")
            batches.create(get_runtime().redis, name, provider="baidu", location=LOCATION)
            filled = batches.fill_location(name, LOCATION, "baidu", {}, on_each=count)
            elapsed = time.monotonic() - started
            done.set()
            sampler.join()
            listed_at = time.monotonic()
            held = list(batches.list_sources(LOCATION))
            listing_alone = len(held) / (time.monotonic() - listed_at)
            enqueue_alone = from_memory(held[:held_keys])
            del held
            baseline = one_by_one(baseline_keys, concurrency)
        finally:
            stack.stop()
    print(f"put {keys} objects in {put_s:.0f}s; enqueued {filled.enqueued} (refused {filled.refused}) in {elapsed:.0f}s")
    print(f"{'share':>6} {'documents':>10} {'RSS MB':>8}")
    marks = []
    for tenth in range(1, 11):
        target = keys * tenth // 10
        at = next((s for s in samples if s[1] >= target), samples[-1] if samples else (0.0, 0, rss_mb()))
        marks.append({"share": tenth / 10, "documents": at[1], "rss_mb": round(at[2], 1)})
        print(f"{tenth * 10:>5}% {at[1]:>10} {at[2]:>8.1f}")
    peak = max((s[2] for s in samples), default=rss_mb())
    growth = marks[-1]["rss_mb"] - marks[0]["rss_mb"]
    rate = filled.enqueued / elapsed if elapsed else 0.0
    print(f"RSS idle {idle:.1f} MB, peak {peak:.1f} MB; from the first tenth to the end: {growth:+.1f} MB; {rate:.0f} documents/s enqueued")
    print(f"the listing alone (storage.list_objects, its folders listed 4 at once; the most any enqueue from it could reach): {listing_alone:.0f} keys/s")
    print(f"enqueue alone, from the first {min(keys, held_keys)} keys of the listing held in memory: {enqueue_alone:.0f} documents/s")
    print(f"one by one (first {baseline_keys} keys): {baseline:.0f} documents/s; from the listing: {rate / baseline:.1f} x that (target: 2000/s)")
    return {"benchmark": "listing", "keys": keys, "enqueued": filled.enqueued, "refused": filled.refused,
            "seconds": round(elapsed, 1), "docs_per_s": round(rate, 1), "target_docs_per_s": 2000,
            "baseline_docs_per_s": round(baseline, 1), "listing_alone_keys_per_s": round(listing_alone, 1),
            "enqueue_alone_docs_per_s": round(enqueue_alone, 1), "rss_idle_mb": round(idle, 1),
            "rss_peak_mb": round(peak, 1), "rss_growth_first_tenth_to_end_mb": round(growth, 1), "marks": marks}


if __name__ == "__main__":
    sys.exit(main())
