"""B1: does docpipe use baidu's documented limits fully without ever breaking them?

``python -m bench.rate_limits [--docs 60] [--workers 1,4,8] [--redis-rtt 0,2,10,20]``

For each worker count, a batch goes through the baidu chain on a real local stack
(redis-server, moto S3, the baidu emulator, N single-process Celery workers), twice:
with docpipe's global Redis limiter, and — the baseline — with Celery's per-worker
``rate_limit`` ("2/s" on submit, "10/s" on each get_result task) instead. The emulator is
the referee: it timestamps every request on arrival and answers error 18 past 2 or 10
requests in any second, as Baidu does.

Printed for each run: achieved submit rate / 2.0, the most submits that arrived in any
1-second window, the error-18 answers; the same for get_result against 10.0. The
get_result rate is measured over the processing_min seconds after the last submit, when
~30 documents are Running and polled (demand well above 10/s; at the tail of a batch
too few documents remain to ask for 10/s). The last line is JSON.

``--redis-rtt`` puts the workers' Redis behind a TCP delay line (``emulators.netem``) adding
that round trip: the limiter must keep its share of each limit with Redis far away, and
never overrun it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from emulators.common import max_in_window
from pipeline.devstack import LocalStack, local_http
from pipeline.samples import make_batch

SUBMIT_LIMIT, RESULT_LIMIT = 2.0, 10.0
# Long enough that ~40 documents are Running at once: polling them asks for more than 10/s.
EMULATOR = {"processing_min": 15.0, "processing_max": 25.0}
POLLING = {
    "DOCPIPE_POLL_FIRST_DELAY": "1",
    "DOCPIPE_POLL_BASE_DELAY": "0.5",
    "DOCPIPE_POLL_MULTIPLIER": "1.3",
    "DOCPIPE_POLL_MAX_DELAY": "2",
    "DOCPIPE_VISIBILITY_TIMEOUT": "60",
    "DOCPIPE_MAX_INLINE_WAIT": "1.0",
    # The fixed ladder: polls asked for faster than 10/s, so that the limiter, not a thrifty
    # schedule, decides the get_result rate (B3, ``bench.polling``, measures the schedule).
    "DOCPIPE_POLL_POLICY": "backoff",
}
BASELINE = {
    "DOCPIPE_GLOBAL_LIMITS": "false",
    "DOCPIPE_CELERY_RATE_LIMITS": json.dumps(
        {"docpipe.baidu.submit": "2/s", "docpipe.baidu.await": "10/s", "docpipe.baidu.fetch": "10/s"}
    ),
}


def rate(times: list[float]) -> float:
    """Requests per second between the first and the last (n-1 intervals)."""
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def gap_profile(times: list[float], interval: float) -> dict[str, float]:
    """Where a rate below the limit goes: the median gap between two requests (the pace the
    limiter keeps when it is asked), and the share of the span spent in gaps over twice the
    documented interval (moments nobody asked for the free slot)."""
    times = sorted(times)
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    if not gaps:
        return {"median_gap_s": 0.0, "share_in_holes": 0.0}
    holes = sum(g - interval for g in gaps if g > 2 * interval)
    return {"median_gap_s": round(gaps[len(gaps) // 2], 3), "share_in_holes": round(holes / (times[-1] - times[0]), 3)}


def measure(stats: dict[str, Any]) -> dict[str, float]:
    submit_ok = sorted(stats["accepted_at"].get("submit", []))
    result_ok = sorted(stats["accepted_at"].get("get_result", []))
    # From the last submit, for the shortest processing time, every document submitted in
    # that span is still Running and polled: demand is well above 10/s, so the achieved
    # rate there is the limiter's doing, not the batch's.
    start = submit_ok[-1] if submit_ok else 0.0
    window = EMULATOR["processing_min"]
    saturated = sum(1 for t in result_ok if start <= t < start + window)
    ends = stats["endpoints"]
    return {
        "submit_ratio": round(rate(submit_ok) / SUBMIT_LIMIT, 3),
        "submit_max_in_1s": max_in_window(stats["arrivals"].get("submit", [])),
        **{f"submit_{k}": v for k, v in gap_profile(submit_ok, 1 / SUBMIT_LIMIT).items()},
        "submit_error_18": ends.get("submit", {}).get("limit_violations", 0),
        "get_result_ratio": round(saturated / window / RESULT_LIMIT, 3),
        "get_result_max_in_1s": max_in_window(stats["arrivals"].get("get_result", [])),
        "get_result_error_18": ends.get("get_result", {}).get("limit_violations", 0),
        "submits_accepted": len(submit_ok),
    }


def run_once(
    stack: LocalStack, docs: list[Path], workers: int, mode: str, run_id: str, rtt_ms: float = 0.0, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    from pipeline import enqueue

    base = stack.emulator_url("baidu")
    local_http().post(f"{base}/_emulator/reset")
    env = dict(BASELINE) if mode == "celery_rate_limit" else {}
    env.update(extra_env or {})
    if rtt_ms:
        if "netem-redis" not in stack.procs:
            stack.start_netem("redis", stack.ports["redis"])
        stack.netem("redis", "delay", ms=rtt_ms / 2)
        env["DOCPIPE_REDIS_URL"] = f"redis://127.0.0.1:{stack.ports['netem-redis']}/0"
    names = [f"{mode}-{workers}-{rtt_ms:g}ms-{i}" for i in range(workers)]
    for name in names:
        stack.start_worker(name, ["docpipe.baidu"], pool="threads", concurrency=4, env=env, wait=False)
    stack.wait_workers(names)
    try:
        started = time.monotonic()
        handles = [enqueue(doc, provider="baidu", options={"bench_run": run_id}) for doc in docs]
        for handle in handles:
            handle.wait(timeout=600)
        elapsed = time.monotonic() - started
    finally:
        for name in names:
            stack.procs.pop(f"worker-{name}").stop()
    stats = local_http().get(f"{base}/_emulator/stats", params={"arrivals": 1}).json()
    return {"mode": mode, "workers": workers, "redis_rtt_ms": rtt_ms, "documents": len(docs), "seconds": round(elapsed, 1), **measure(stats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--workers", default="1,4,8")
    parser.add_argument("--modes", default="global,celery_rate_limit")
    parser.add_argument("--redis-rtt", default="0", help="round trips (ms) added between the workers and Redis, comma-separated")
    parser.add_argument("--poll-policy", choices=("backoff", "adaptive"), default="backoff",
                        help="backoff (default) asks for more than 10 polls/s, so the limiter sets the get_result rate; "
                        "adaptive is docpipe's default, which polls far less (the submit share is then the one to read)")
    parser.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it (logs of every process)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="docpipe-bench-") as tmp:
        workdir = Path(tmp) if args.keep is None else args.keep
        docs = [s.path for s in make_batch(workdir / "docs", args.docs)]
        with LocalStack(workdir / "stack", emulator_config={"baidu": EMULATOR}, settings=POLLING) as stack:
            stack.start_base(["baidu"])
            for rtt in (float(r) for r in args.redis_rtt.split(",")):
                for mode in args.modes.split(","):
                    for workers in (int(w) for w in args.workers.split(",")):
                        row = run_once(stack, docs, workers, mode, f"{mode}-{workers}-{time.time()}", rtt,
                                       {"DOCPIPE_POLL_POLICY": args.poll_policy})
                        rows.append(row)
                        print(
                            f"{mode:>18} workers={workers} redis +{rtt:g} ms  submit {row['submit_ratio']:.3f} of 2/s, max {row['submit_max_in_1s']} in 1s, "
                            f"{row['submit_error_18']} x error 18 (median gap {row['submit_median_gap_s']:.3f}s, "
                            f"{row['submit_share_in_holes']:.3f} of the span in holes) | get_result {row['get_result_ratio']:.3f} of 10/s, "
                            f"max {row['get_result_max_in_1s']} in 1s, {row['get_result_error_18']} x error 18 | {row['seconds']}s",
                            flush=True,
                        )
    ok = all(
        r["submit_ratio"] >= (0.95 if not r["redis_rtt_ms"] else 0.9) and r["submit_error_18"] == 0 and r["get_result_error_18"] == 0
        and r["submit_max_in_1s"] <= SUBMIT_LIMIT and r["get_result_max_in_1s"] <= RESULT_LIMIT
        for r in rows if r["mode"] == "global"
    )
    print(json.dumps({"benchmark": "B1 rate_limits", "target_met": ok, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
