"""Ingest of a big S3 listing: does memory stay flat, and how fast are documents enqueued?

``python -m bench.listing [--keys 100000]`` puts ``--keys`` small objects under one prefix of
the local stack's S3 (moto behind the signature-checking front), then runs
``pipeline.ingest`` over the prefix in this process, with no worker consuming, and samples
this process' resident memory as it goes. It prints the RSS at each tenth of the listing,
the growth from the first tenth to the end, and the enqueue rate; last, one JSON line.

What memory can grow with: nothing per document is kept by the ingest (listing pages are
dropped as they are consumed, the window of documents in flight is bounded); what stays in
Redis (job records, queued messages, the batch's member set) is Redis' memory, not ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import batches, storage
from pipeline.devstack import LocalStack


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill_bucket(bucket: str, prefix: str, keys: int, threads: int = 16) -> float:
    client = storage.s3_client()
    client.create_bucket(Bucket=bucket)
    started = time.monotonic()

    def put(n: int) -> None:
        body = f"%PDF-1.4\n% document {n}\n%%EOF\n".encode()
        client.put_object(Bucket=bucket, Key=f"{prefix}{n // 1000:04d}/doc-{n:07d}.pdf", Body=body)

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, range(keys)):
            pass
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8, help="documents enqueued at once")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="docpipe-listing-") as tmp:
        stack = LocalStack(Path(tmp))
        try:
            stack.start_base(("baidu",))
            print(f"putting {args.keys} objects into s3://bench-inbox/scans/ ...", flush=True)
            put_s = fill_bucket("bench-inbox", "scans/", args.keys)
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
            storage_sources = (s for s, _ in batches.list_sources("s3://bench-inbox/scans/"))
            name = batches.new_name("baidu")
            from pipeline.runtime import get_runtime

            batches.create(get_runtime().redis, name, provider="baidu", location="s3://bench-inbox/scans/")
            filled = batches.fill(name, storage_sources, "baidu", {}, concurrency=args.concurrency, on_each=count)
            elapsed = time.monotonic() - started
            done.set()
            sampler.join()
        finally:
            stack.stop()
    print(f"put {args.keys} objects in {put_s:.0f}s; enqueued {filled.enqueued} (refused {filled.refused}) in {elapsed:.0f}s")
    print(f"{'share':>6} {'documents':>10} {'RSS MB':>8}")
    marks = []
    for tenth in range(1, 11):
        target = args.keys * tenth // 10
        at = next((s for s in samples if s[1] >= target), samples[-1] if samples else (0.0, 0, rss_mb()))
        marks.append({"share": tenth / 10, "documents": at[1], "rss_mb": round(at[2], 1)})
        print(f"{tenth * 10:>5}% {at[1]:>10} {at[2]:>8.1f}")
    peak = max((s[2] for s in samples), default=rss_mb())
    growth = marks[-1]["rss_mb"] - marks[0]["rss_mb"]
    rate = filled.enqueued / elapsed if elapsed else 0.0
    print(f"RSS idle {idle:.1f} MB, peak {peak:.1f} MB; from the first tenth to the end: {growth:+.1f} MB; {rate:.0f} documents/s enqueued")
    print(json.dumps({"benchmark": "listing", "keys": args.keys, "enqueued": filled.enqueued, "refused": filled.refused,
                      "seconds": round(elapsed, 1), "docs_per_s": round(rate, 1), "rss_idle_mb": round(idle, 1),
                      "rss_peak_mb": round(peak, 1), "rss_growth_first_tenth_to_end_mb": round(growth, 1), "marks": marks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
