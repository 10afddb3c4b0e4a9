"""B2: does docpipe keep tuputech at its 30 tasks in flight, never 31, and keep it busy?

``python -m bench.concurrency [--docs 100] [--limit 30] [--workers 2]``

100 documents go through tuputech on a real local stack (redis-server, moto S3, the
tuputech emulator with its default processing-time distribution, the callback receiver,
Celery workers). The emulator is the referee: it logs every change of the number of tasks
it has accepted and not yet called back. Printed: the most tasks ever in flight (must be
the limit, never more), and the share of time the limit was reached while documents were
still waiting for a slot (from the first accepted submit to the last). The baseline, in
the same run, is a fixed-size batching client with no lease: it submits the limit, waits
for all their callbacks, then the next batch — what a client without a shared semaphore
must do to stay under the limit. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from pipeline.devstack import LocalStack
from pipeline.samples import make_report_pdf


def share_at_limit(log: list[tuple[float, int]], limit: int, start: float, end: float) -> float:
    """Fraction of [start, end] during which ``limit`` tasks were in flight, from a change log."""
    if end <= start:
        return 0.0
    at_limit = 0.0
    events = sorted(log)
    for (t, value), (t_next, _) in zip(events, events[1:] + [(end, 0)]):
        lo, hi = max(t, start), min(t_next, end)
        if hi > lo and value >= limit:
            at_limit += hi - lo
    return at_limit / (end - start)


def measure(stats: dict[str, Any], limit: int) -> dict[str, Any]:
    accepted = sorted(stats["accepted_at"].get("submit", []))
    return {
        "max_in_flight": stats["max_in_flight_seen"],
        "share_at_limit_while_waiting": round(share_at_limit(stats["in_flight_log"], limit, accepted[0], accepted[-1]), 3),
        "accepted": len(accepted),
        "first_to_last_submit_s": round(accepted[-1] - accepted[0], 1),
    }


def run_docpipe(stack: LocalStack, docs: list[Path], run_id: str) -> dict[str, Any]:
    from pipeline import enqueue

    base = stack.emulator_url("tuputech")
    httpx.post(f"{base}/_emulator/reset")
    started = time.monotonic()
    handles = [enqueue(doc, provider="tuputech", options={"bench_run": run_id}) for doc in docs]
    for handle in handles:
        handle.wait(timeout=900)
    elapsed = time.monotonic() - started
    return {"client": "docpipe", "seconds": round(elapsed, 1), **stats_of(base)}


def stats_of(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/_emulator/stats", params={"arrivals": 1}).json()


def run_batches(stack: LocalStack, docs: list[Path], limit: int, run_id: str) -> dict[str, Any]:
    """The baseline: submit ``limit`` documents, wait until all are called back, repeat."""
    from pipeline import enqueue

    base = stack.emulator_url("tuputech")
    httpx.post(f"{base}/_emulator/reset")
    started = time.monotonic()
    for first in range(0, len(docs), limit):
        batch = [enqueue(doc, provider="tuputech", options={"bench_run": run_id}) for doc in docs[first : first + limit]]
        for handle in batch:
            handle.wait(timeout=900)
    elapsed = time.monotonic() - started
    return {"client": "batches_of_limit", "seconds": round(elapsed, 1), **stats_of(base)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--processing", default="", metavar="MIN,MAX", help="emulator processing seconds (default: its own)")
    args = parser.parse_args(argv)
    emulator: dict[str, Any] = {}
    if args.processing:
        low, high = (float(v) for v in args.processing.split(","))
        emulator = {"processing_min": low, "processing_max": high}

    rows = []
    with tempfile.TemporaryDirectory(prefix="docpipe-bench-") as tmp:
        workdir = Path(tmp)
        docs = [make_report_pdf(workdir / f"doc-{n:03d}.pdf", n).path for n in range(args.docs)]
        settings = {
            "DOCPIPE_TUPUTECH_MAX_IN_FLIGHT": str(args.limit),
            "DOCPIPE_POLL_FIRST_DELAY": "1",
            "DOCPIPE_POLL_BASE_DELAY": "0.5",
            "DOCPIPE_POLL_MAX_DELAY": "2",
        }
        with LocalStack(workdir / "stack", emulator_config={"tuputech": emulator}, settings=settings) as stack:
            stack.start_base(["tuputech"])
            stack.start_callbacks()
            names = [f"bench{n}" for n in range(args.workers)]
            for name in names:
                stack.start_worker(name, ["docpipe.tuputech"], concurrency=8, wait=False)
            stack.wait_workers(names)
            for runner in (run_docpipe, lambda s, d, r: run_batches(s, d, args.limit, r)):
                raw = runner(stack, docs, f"{time.time()}")
                row = {"client": raw["client"], "seconds": raw["seconds"], **measure(raw, args.limit)}
                rows.append(row)
                print(
                    f"{row['client']:>17}: max in flight {row['max_in_flight']} (limit {args.limit}), "
                    f"{row['share_at_limit_while_waiting']:.3f} of the time at the limit while documents waited, "
                    f"{row['accepted']} documents in {row['seconds']}s",
                    flush=True,
                )
    ours = rows[0]
    summary = {
        "benchmark": "B2 concurrency",
        "limit": args.limit,
        "processing_seconds": args.processing or "emulator default (uniform 2..8)",
        "target_met": ours["max_in_flight"] == args.limit and ours["share_at_limit_while_waiting"] >= 0.9,
        "speedup_vs_batches": round(rows[1]["seconds"] / ours["seconds"], 2) if ours["seconds"] else None,
        "runs": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
