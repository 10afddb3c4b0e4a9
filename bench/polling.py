"""B3: how many result calls does docpipe spend per document, and how late does it see results?

``python -m bench.polling [--docs 200] [--workers 2] [--noise 0.1]``

The documents go through baidu and idp (half each) on a real local stack, whose emulators take
a processing time proportional to each document's size, times a log-normal factor of spread
``--noise`` (OCR's work grows with the document; the factor is what size does not explain).
Sizes are log-normal too, so processing times have a long tail: median about 7 s, some over a
minute. The result endpoints keep their documented limits (baidu get_result 10/s).

Each policy runs the same documents on fresh workers:
- ``backoff``: docpipe's fixed ladder (the provider's advised first delay, then 2 s growing
  1.6 times per poll up to 60 s), what docpipe did before it learnt;
- ``adaptive``: the default, learning from nothing (its first documents are polled by the
  ladder until ten processing times are known), and ``adaptive_warm``: the same policy a
  batch later, with what the first run taught it (a deployment that has been running).

The emulators are the referees: for every task they record its processing time, how many
result-endpoint calls it took (the fetch included), and when the first answer saying "done"
left them. Printed per policy and provider: calls per document, the delay from the provider
finishing to docpipe seeing it (median and p95, in seconds and as a share of the processing
time), and the most result calls in any second. The last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from PIL import Image

from emulators.common import max_in_window
from pipeline.config import get_settings
from pipeline.devstack import LocalStack, local_http
from pipeline.enqueue import enqueue_many
from pipeline.polling import LearnedSchedule, ProcessingTimes

PROVIDERS = ("baidu", "idp")
RESULT_ENDPOINT = {"baidu": "get_result", "idp": "result"}
SECONDS_PER_MB = 20.0  # with a median size of 350 kB: a median processing time of 7 s
MEDIAN_SIZE = 350_000
SIZE_SPREAD = 0.9  # log-normal sigma of sizes: the 99th percentile is about 8 times the median
POLICIES = {
    "backoff": {"DOCPIPE_POLL_POLICY": "backoff"},
    "adaptive": {"DOCPIPE_POLL_POLICY": "adaptive"},
    "adaptive_warm": {"DOCPIPE_POLL_POLICY": "adaptive"},
}
SETTINGS = {"DOCPIPE_JOB_DEADLINE": "900", "DOCPIPE_VISIBILITY_TIMEOUT": "300"}


def make_documents(folder: Path, count: int, seed: int = 11) -> list[Path]:
    """PNG files of random pixels (incompressible: the size is what we ask for), log-normal sizes."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = min(4_500_000, MEDIAN_SIZE * math.exp(rng.gauss(0.0, SIZE_SPREAD)))
        side = max(32, int(math.sqrt(size / 3)))
        image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        path = folder / f"scan-{i:04d}.png"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def figures(stats: dict[str, Any], endpoint: str) -> dict[str, Any]:
    tasks = [t for t in stats.get("tasks", []) if t["delay"] is not None]
    if not tasks:
        return {"documents": 0}
    delays = sorted(t["delay"] for t in tasks)
    shares = sorted(t["delay"] / t["processing"] for t in tasks)
    processing = sorted(t["processing"] for t in tasks)
    return {
        "documents": len(tasks),
        "calls_per_doc": round(statistics.fmean(t["result_calls"] for t in tasks), 3),
        "median_delay_s": round(_q(delays, 0.5), 2),
        "p95_delay_s": round(_q(delays, 0.95), 2),
        "median_delay_share": round(_q(shares, 0.5), 3),
        "p95_delay_share": round(_q(shares, 0.95), 3),
        "median_processing_s": round(_q(processing, 0.5), 1),
        "max_processing_s": round(processing[-1], 1),
        "max_result_calls_in_1s": max_in_window(stats["arrivals"].get(endpoint, [])),
    }


def _q(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_policy(stack: LocalStack, name: str, docs: dict[str, list[Path]], workers: int) -> dict[str, Any]:
    client = redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"])
    if name == "adaptive":
        client.delete(*[f"docpipe:processing:{p}" for p in PROVIDERS])  # learn from nothing
    for provider in PROVIDERS:
        local_http().post(f"{stack.emulator_url(provider)}/_emulator/reset")
    names = [f"{name}-{i}" for i in range(workers)]
    for worker in names:
        stack.start_worker(worker, [f"docpipe.{p}" for p in PROVIDERS], concurrency=8, env=POLICIES[name], wait=False)
    stack.wait_workers(names)
    started = time.monotonic()
    try:
        run_id = f"{name}-{time.time()}"
        handles = []
        for provider in PROVIDERS:
            handles += [s.handle for s in enqueue_many(docs[provider], provider=provider, options={"bench_run": run_id}) if s.handle]
        for handle in handles:
            handle.wait(timeout=1800)
    finally:
        for worker in names:
            stack.procs.pop(f"worker-{worker}").stop()
    row: dict[str, Any] = {"name": name, "seconds": round(time.monotonic() - started, 1)}
    for provider in PROVIDERS:
        stats = local_http().get(f"{stack.emulator_url(provider)}/_emulator/stats", params={"arrivals": 1}).json()
        row[provider] = figures(stats, RESULT_ENDPOINT[provider]) | planned(client, provider)
    row.update(_overall(row))
    return row


def planned(client: redis.Redis, provider: str) -> dict[str, Any]:
    """What the schedule learnt from this run's processing times promises when replayed on them
    (calls and median delay share): the gap to what the emulators measured is the polls' own
    lateness (a countdown, the broker, a free worker thread), not the schedule."""
    settings = get_settings()
    model = LearnedSchedule.fit(ProcessingTimes(client).samples(provider), budget=settings.poll_call_budget, min_samples=settings.poll_learn_after)
    if model is None:
        return {}
    return {"planned_calls_per_doc": round(model.expected_calls, 3), "planned_median_delay_share": round(model.median_delay_share, 3)}


def _overall(row: dict[str, Any]) -> dict[str, Any]:
    """The policy's figures over both providers (per document, weighted by documents)."""
    parts = [row[p] for p in PROVIDERS if row[p].get("documents")]
    total = sum(p["documents"] for p in parts)
    return {
        "calls_per_doc": round(sum(p["calls_per_doc"] * p["documents"] for p in parts) / total, 3),
        "median_delay_share": max(p["median_delay_share"] for p in parts),
        "p95_delay_share": max(p["p95_delay_share"] for p in parts),
        "max_result_calls_in_1s": {p: row[p]["max_result_calls_in_1s"] for p in PROVIDERS},
    }


def print_row(row: dict[str, Any]) -> None:
    for provider in PROVIDERS:
        f = row[provider]
        print(
            f"{row['name']:<14} {provider:<6} {f['documents']:>5} {f['calls_per_doc']:>10.2f} {f['median_delay_s']:>9.2f} "
            f"{f['p95_delay_s']:>8.2f} {f['median_delay_share']:>11.3f} {f['p95_delay_share']:>10.3f} "
            f"{f['max_result_calls_in_1s']:>13} {f['median_processing_s']:>8.1f} {f['max_processing_s']:>7.1f}"
            f"{_planned(f)}",
            flush=True,
        )


def _planned(f: dict[str, Any]) -> str:
    if "planned_calls_per_doc" not in f:
        return ""
    return f"   (schedule's replay: {f['planned_calls_per_doc']:.2f} calls, median share {f['planned_median_delay_share']:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="documents per policy, half through each provider")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.1, help="log-normal spread of processing time around size's prediction")
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args(argv)
    processing = {"processing": {"seconds_per_mb": SECONDS_PER_MB, "noise": args.noise}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="docpipe-polling-") as tmp:
        workdir = Path(tmp)
        half = args.docs // 2
        made = make_documents(workdir / "docs", half * 2)
        docs = {"baidu": made[:half], "idp": made[half:]}
        with LocalStack(workdir / "stack", emulator_config={p: dict(processing) for p in PROVIDERS}, settings=dict(SETTINGS)) as stack:
            stack.start_base(PROVIDERS)
            print(f"{'policy':<14} {'prov.':<6} {'docs':>5} {'calls/doc':>10} {'median s':>9} {'p95 s':>8} "
                  f"{'median share':>11} {'p95 share':>10} {'max calls/1s':>13} {'median t':>8} {'max t':>7}", flush=True)
            for name in args.policies.split(","):
                row = run_policy(stack, name, docs, args.workers)
                rows.append(row)
                print_row(row)
    default = next((r for r in rows if r["name"] == "adaptive_warm"), None) or next((r for r in rows if r["name"] == "adaptive"), None)
    met = default is not None and default["calls_per_doc"] <= 1.5 and default["median_delay_share"] <= 0.10 and all(
        r["max_result_calls_in_1s"]["baidu"] <= 10 for r in rows
    )
    policies = [
        {"name": r["name"], "calls_per_doc": r["calls_per_doc"], "median_delay_share": r["median_delay_share"],
         "p95_delay_share": r["p95_delay_share"], "max_result_calls_in_1s": r["max_result_calls_in_1s"],
         "per_provider": {p: r[p] for p in PROVIDERS}, "seconds": r["seconds"]}
        for r in rows
    ]
    print(json.dumps({"benchmark": "B3 polling", "noise": args.noise, "target_met": met, "policies": policies}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
