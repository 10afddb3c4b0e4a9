"""B4: what does docpipe's machinery cost per document, against the simplest script that does the same?

``python -m bench.overhead [--docs 300] [--workers 2] [--threads 8]``

The baidu emulator answers at once (no processing time) and has no limits; docpipe's global
limits are off. The same small documents go, in the same run, through:

- ``docpipe``: ``enqueue_many`` of local files (upload to staging), then workers taking each
  through stage, submit, await, fetch and archive, with Redis (jobs, broker) and S3;
- ``baseline``: one asyncio process (httpx for the provider, boto3 in threads for S3) doing the
  provider and S3 calls a document needs and nothing else: upload to staging, submit, poll
  until done, write ``result.json`` and ``raw.json`` to the results bucket.

Printed for each: documents per second (first upload to last archive), CPU seconds per document
(docpipe: the workers, redis-server and the enqueuing process; baseline: its process), and
what each document costs: S3 requests (counted by the S3 front), Redis commands (from
``INFO commandstats``) and broker messages. The last line is JSON; the target is docpipe
at 0.5 of the baseline's throughput or more.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from pipeline import storage
from pipeline.devstack import LocalStack, local_http
from pipeline.enqueue import enqueue_many
from pipeline.providers.baidu import FILE_FIELD, RESULT_PATH, SUBMIT_PATH, TOKEN_PATH
from pipeline.samples import make_batch
from pipeline.sniff import sniff_format

EMULATOR = {"processing_min": 0.0, "processing_max": 0.0, "submit_qps": 1_000_000, "get_result_qps": 1_000_000}
SETTINGS = {
    "DOCPIPE_GLOBAL_LIMITS": "false",
    "DOCPIPE_POLL_FIRST_DELAY": "0",
    "DOCPIPE_POLL_BASE_DELAY": "0.1",
    "DOCPIPE_POLL_POLICY": "backoff",
}


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a live process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meters:
    """What the shared servers saw: S3 requests through the front, Redis commands by name."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.redis = redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"])

    def read(self) -> dict[str, Any]:
        s3 = local_http().get(f"http://127.0.0.1:{self.stack.ports['s3']}/_proxy/stats").json()
        commands = {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in self.redis.info("commandstats").items()}
        return {"s3": s3["forwarded"], "s3_ops": s3["operations"], "redis": commands, "redis_cpu": cpu_of(self.stack.procs["redis"].popen.pid)}

    @staticmethod
    def per_doc(before: dict[str, Any], after: dict[str, Any], docs: int) -> dict[str, Any]:
        redis_calls = {k: v - before["redis"].get(k, 0) for k, v in after["redis"].items()}
        busiest = sorted(((v, k) for k, v in redis_calls.items() if v), reverse=True)[:8]
        return {
            "s3_requests_per_doc": round((after["s3"] - before["s3"]) / docs, 2),
            "s3_requests_by_kind_per_doc": {
                k: round((v - before["s3_ops"].get(k, 0)) / docs, 2) for k, v in sorted(after["s3_ops"].items()) if v - before["s3_ops"].get(k, 0)
            },
            "redis_commands_per_doc": round(sum(redis_calls.values()) / docs, 1),
            "broker_messages_per_doc": round(redis_calls.get("lpush", 0) / docs, 2),
            "redis_commands_by_name_per_doc": {k: round(v / docs, 2) for v, k in busiest},
            "redis_cpu_s": round(after["redis_cpu"] - before["redis_cpu"], 2),
        }


def run_docpipe(stack: LocalStack, docs: list[Path], workers: int, threads: int) -> dict[str, Any]:
    names = [f"overhead-{i}" for i in range(workers)]
    for name in names:
        stack.start_worker(name, ["docpipe.baidu"], concurrency=threads, wait=False)
    stack.wait_workers(names)
    pids = [stack.procs[f"worker-{n}"].popen.pid for n in names]
    meters = Meters(stack)
    before, workers_cpu, enqueue_cpu = meters.read(), sum(cpu_of(p) for p in pids), own_cpu()
    started = time.monotonic()
    try:
        handles = [e.handle for e in enqueue_many(docs, provider="baidu", options={"bench": str(time.time())}, concurrency=16) if e.handle]
        for handle in handles:
            handle.wait(timeout=600, interval=0.05)
        elapsed = time.monotonic() - started
        cpu = sum(cpu_of(p) for p in pids) - workers_cpu
        after = meters.read()
    finally:
        for name in names:
            stack.procs.pop(f"worker-{name}").stop()
    enqueuer = own_cpu() - enqueue_cpu
    costs = Meters.per_doc(before, after, len(docs))
    total_cpu = cpu + enqueuer + costs["redis_cpu_s"]
    return {"name": "docpipe", "documents": len(handles), "seconds": round(elapsed, 2), "docs_per_s": round(len(handles) / elapsed, 1),
            "cpu_s_per_doc": round(total_cpu / len(docs), 4), "cpu_s": {"workers": round(cpu, 2), "enqueue": round(enqueuer, 2),
            "redis": costs["redis_cpu_s"]}, **costs}


async def _baseline_one(path: Path, http: httpx.AsyncClient, token: str, base: str, s3: Any, run: str, results: str, staging: str) -> None:
    data = await asyncio.to_thread(path.read_bytes)
    key = f"baseline/{run}/{path.name}"
    await asyncio.to_thread(s3.put_object, Bucket=staging, Key=key, Body=data)
    body = await asyncio.to_thread(lambda: s3.get_object(Bucket=staging, Key=key)["Body"].read())
    field = FILE_FIELD[sniff_format(body[:64]) or "png"]
    form = {field: base64.b64encode(body).decode(), "fileName": path.name, "templateSign": "multiple_invoice"}
    submitted = (await http.post(f"{base}{SUBMIT_PATH}", params={"access_token": token}, data=form)).json()
    task_id = submitted["task_result"]["task_id"]
    while True:
        answer = (await http.post(f"{base}{RESULT_PATH}", params={"access_token": token}, data={"task_id": task_id})).json()
        if answer["task_result"]["status"] in ("Success", "Failed"):
            break
        await asyncio.sleep(0.1)
    prefix = f"baseline/{run}/{path.stem}/"
    raw = json.dumps(answer).encode()
    await asyncio.to_thread(s3.put_object, Bucket=results, Key=prefix + "raw.json", Body=raw)
    await asyncio.to_thread(s3.put_object, Bucket=results, Key=prefix + "result.json", Body=raw)


async def _baseline(docs: list[Path], base: str, concurrency: int) -> None:
    settings = storage.get_settings()
    s3 = storage.s3_client()
    run = str(time.time())
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:
        token = (await http.post(f"{base}{TOKEN_PATH}", params={"grant_type": "client_credentials", "client_id": "demo-api-key",
                                                              "client_secret": "demo-secret-key"})).json()["access_token"]

        async def one(path: Path) -> None:
            async with gate:
                await _baseline_one(path, http, token, base, s3, run, settings.results_bucket, settings.staging_bucket)

        await asyncio.gather(*(one(p) for p in docs))


def run_baseline(stack: LocalStack, docs: list[Path], concurrency: int) -> dict[str, Any]:
    meters = Meters(stack)
    before, cpu = meters.read(), own_cpu()
    started = time.monotonic()
    asyncio.run(_baseline(docs, stack.emulator_url("baidu"), concurrency))
    elapsed = time.monotonic() - started
    spent = own_cpu() - cpu
    costs = Meters.per_doc(before, meters.read(), len(docs))
    return {"name": "baseline", "documents": len(docs), "seconds": round(elapsed, 2), "docs_per_s": round(len(docs) / elapsed, 1),
            "cpu_s_per_doc": round(spent / len(docs), 4), "cpu_s": {"process": round(spent, 2)}, **costs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="docpipe-overhead-") as tmp:
        workdir = Path(tmp)
        docs = [s.path for s in make_batch(workdir / "docs", args.docs)]
        with LocalStack(workdir / "stack", emulator_config={"baidu": EMULATOR}, settings=dict(SETTINGS)) as stack:
            stack.start_base(["baidu"])
            rows.append(run_baseline(stack, docs, concurrency=args.workers * args.threads))
            rows.append(run_docpipe(stack, docs, args.workers, args.threads))
    for row in rows:
        print(f"{row['name']:<9} {row['documents']:>5} docs  {row['docs_per_s']:>7.1f} docs/s  {row['cpu_s_per_doc'] * 1000:>6.1f} ms CPU/doc  "
              f"S3 {row['s3_requests_per_doc']:>5.2f}/doc  Redis {row['redis_commands_per_doc']:>6.1f} commands/doc  "
              f"broker {row['broker_messages_per_doc']:>4.2f} messages/doc", flush=True)
    docpipe, baseline = rows[1], rows[0]
    ratio = docpipe["docs_per_s"] / baseline["docs_per_s"] if baseline["docs_per_s"] else 0.0
    print(f"docpipe at {ratio:.2f} of the baseline's throughput; Redis commands per document, busiest first: "
          f"{docpipe['redis_commands_by_name_per_doc']}", flush=True)
    for row in rows:
        print(f"S3 requests per document by kind, {row['name']}: {row['s3_requests_by_kind_per_doc']}", flush=True)
    print(json.dumps({"benchmark": "B4 overhead", "throughput_ratio": round(ratio, 3), "target_met": ratio >= 0.5, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
