"""B2: does docpipe keep tuputech at its 30 tasks in flight, never 31, and keep it busy?

``python -m bench.concurrency [--docs 100] [--limit 30] [--workers 2]``

100 documents go through tuputech on a real local stack (redis-server, moto S3, the
tuputech emulator with its default processing-time distribution, the callback receiver,
Celery workers). The emulator is the referee: it logs every change of the number of tasks
it has accepted and not yet called back. Printed: the most tasks ever in flight (must be
the limit, never more), and the share of time the limit was reached while documents were
waiting for a slot: from the moment the limit is first reached to the last accepted
submit. The share from the first submit, which adds the ramp (staging the first
documents while slots are still free), and the ramp's length are printed beside it. The baseline, in
the same run, is a fixed-size batching client with no lease: it submits the limit, waits
for all their callbacks, then the next batch — what a client without a shared semaphore
must do to stay under the limit.

Beside them, the ceiling: how much of the time at the limit this emulator on this machine
allows at all. One asyncio process holds every document in memory, serves the downloads and
takes the callbacks itself, with each submit built and signed before its slot frees: no S3,
no Redis, no broker, no second process between a callback and the next submit. What it
loses is the emulator's own time (sending a callback, accepting a submit) and the machine's.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.devstack import LocalStack, free_port, local_http
from pipeline.enqueue import JobHandle, enqueue_many
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


def refill_gaps(log: list[tuple[float, int]], limit: int, end: float) -> list[float]:
    """Seconds from each drop below ``limit`` to the moment it is reached again (before ``end``):
    the cost of handing a freed slot to the next document, which is what the share loses."""
    gaps, dropped = [], None
    for t, value in sorted(log):
        if t > end:
            break
        if value < limit and dropped is None:
            dropped = t
        elif value >= limit and dropped is not None:
            gaps.append(t - dropped)
            dropped = None
    return gaps


def measure(stats: dict[str, Any], limit: int) -> dict[str, Any]:
    """Documents wait for a slot from the moment the limit is first reached (every slot is
    taken and more documents are coming) until the last one is accepted: that span is the
    target's. Before it, slots were free and documents were still being staged; that ramp
    is shown apart, and the share over the whole span from the first submit with it."""
    accepted = sorted(stats["accepted_at"].get("submit", []))
    log = sorted(stats["in_flight_log"])
    full = next((t for t, value in log if value >= limit), accepted[-1])
    gaps = sorted(refill_gaps([(t, v) for t, v in log if t >= full], limit, accepted[-1]))
    return {
        "refills": len(gaps),
        "refill_gap_median_ms": round(1000 * gaps[len(gaps) // 2], 1) if gaps else None,
        "refill_gap_p90_ms": round(1000 * gaps[int(len(gaps) * 0.9)], 1) if gaps else None,
        "max_in_flight": stats["max_in_flight_seen"],
        "share_at_limit_while_waiting": round(share_at_limit(log, limit, full, accepted[-1]), 3),
        "share_from_first_submit": round(share_at_limit(log, limit, accepted[0], accepted[-1]), 3),
        "ramp_to_limit_s": round(full - accepted[0], 2),
        "accepted": len(accepted),
        "first_to_last_submit_s": round(accepted[-1] - accepted[0], 1),
    }


def send(docs: list[Path], run_id: str) -> list[JobHandle]:
    """The batch as a user sends it: ``enqueue_many``, every document accounted for."""
    sent = list(enqueue_many(docs, provider="tuputech", options={"bench_run": run_id}))
    refused = [s for s in sent if s.handle is None]
    if refused:
        raise SystemExit(f"{len(refused)} documents not sent, e.g. {refused[0].source}: {refused[0].error}")
    return [s.handle for s in sent if s.handle is not None]


def run_docpipe(stack: LocalStack, docs: list[Path], run_id: str) -> dict[str, Any]:
    base = stack.emulator_url("tuputech")
    local_http().post(f"{base}/_emulator/reset")
    started = time.monotonic()
    handles = send(docs, run_id)
    for handle in handles:
        handle.wait(timeout=900)
    elapsed = time.monotonic() - started
    return {"client": "docpipe", "seconds": round(elapsed, 1), **stats_of(base)}


def stats_of(base: str) -> dict[str, Any]:
    return local_http().get(f"{base}/_emulator/stats", params={"arrivals": 1}).json()


def run_batches(stack: LocalStack, docs: list[Path], limit: int, run_id: str) -> dict[str, Any]:
    """The baseline: submit ``limit`` documents, wait until all are called back, repeat."""
    base = stack.emulator_url("tuputech")
    local_http().post(f"{base}/_emulator/reset")
    started = time.monotonic()
    for first in range(0, len(docs), limit):
        for handle in send(docs[first : first + limit], run_id):
            handle.wait(timeout=900)
    elapsed = time.monotonic() - started
    return {"client": "batches_of_limit", "seconds": round(elapsed, 1), **stats_of(base)}


def run_ceiling(stack: LocalStack, docs: list[Path], limit: int) -> dict[str, Any]:
    """The ceiling client (see the module's docstring): documents in memory, one event loop."""
    base = stack.emulator_url("tuputech")
    local_http().post(f"{base}/_emulator/reset")
    started = time.monotonic()
    asyncio.run(_ceiling(base, [d.read_bytes() for d in docs], limit))
    elapsed = time.monotonic() - started
    return {"client": "ceiling", "seconds": round(elapsed, 1), **stats_of(base)}


async def _ceiling(base: str, contents: list[bytes], limit: int) -> None:
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from pipeline.config import get_settings
    from pipeline.providers.tuputech_wire import SUBMIT_PATH, Doc, open_sealed, signed_submit_body

    settings = get_settings()
    secret_id, private_key = settings.tuputech_secret_id.get_secret_value(), settings.tuputech_private_key.get_secret_value()
    port = free_port()
    ours = f"http://127.0.0.1:{port}"
    slots = asyncio.Semaphore(limit)
    called_back: set[int] = set()
    all_back = asyncio.Event()

    async def document(request: Request) -> Response:
        data = contents[int(request.path_params["n"])]
        if request.method == "HEAD":
            return Response(headers={"Content-Length": str(len(data))}, media_type="application/pdf")
        return Response(data, media_type="application/pdf")

    async def callback(request: Request) -> JSONResponse:
        open_sealed(settings.tuputech_public_key, json.loads(await request.body()))  # checked, as any client must
        n = int(request.path_params["n"])
        if n not in called_back:
            called_back.add(n)
            slots.release()
            if len(called_back) == len(contents):
                all_back.set()
        return JSONResponse({"message": "ok"})

    app = Starlette(routes=[Route("/doc/{n}", document, methods=["GET", "HEAD"]), Route("/cb/{n}", callback, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    url = base + SUBMIT_PATH.format(secret_id=secret_id)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=limit)) as client:

        async def submit(n: int) -> None:
            body = signed_submit_body(secret_id, private_key, Doc(url=f"{ours}/doc/{n}", format="pdf", callback=f"{ours}/cb/{n}"))
            await slots.acquire()
            answer = await client.post(url, json=body)
            if json.loads(answer.json()["json"]).get("code") != 0:
                raise SystemExit(f"ceiling client: submit {n} refused: {answer.text[:200]}")

        await asyncio.gather(*(submit(n) for n in range(len(contents))))
        await asyncio.wait_for(all_back.wait(), timeout=900)
    server.should_exit = True
    await serving


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
            stack.start_base(["tuputech"], callbacks=True)
            names = [f"bench{n}" for n in range(args.workers)]
            for name in names:
                stack.start_worker(name, ["docpipe.tuputech"], concurrency=8, wait=False)
            stack.wait_workers(names)
            runners = (run_docpipe, lambda s, d, r: run_batches(s, d, args.limit, r), lambda s, d, r: run_ceiling(s, d, args.limit))
            for runner in runners:
                raw = runner(stack, docs, f"{time.time()}")
                row = {"client": raw["client"], "seconds": raw["seconds"], **measure(raw, args.limit)}
                rows.append(row)
                print(
                    f"{row['client']:>17}: max in flight {row['max_in_flight']} (limit {args.limit}), "
                    f"{row['share_at_limit_while_waiting']:.3f} of the time at the limit while documents waited for a slot "
                    f"({row['share_from_first_submit']:.3f} from the first submit, {row['ramp_to_limit_s']:.2f}s ramp), "
                    f"{row['accepted']} documents in {row['seconds']}s; a freed slot refilled in {row['refill_gap_median_ms']} ms "
                    f"(median, p90 {row['refill_gap_p90_ms']} ms, {row['refills']} refills)",
                    flush=True,
                )
    ours = rows[0]
    summary = {
        "benchmark": "B2 concurrency",
        "limit": args.limit,
        "processing_seconds": args.processing or "emulator default (uniform 2..8)",
        # Issue 14's target: at the limit 0.95 of the time from the first submit (the ramp included), never over it.
        "target_met": ours["max_in_flight"] == args.limit and ours["share_from_first_submit"] >= 0.95,
        "speedup_vs_batches": round(rows[1]["seconds"] / ours["seconds"], 2) if ours["seconds"] else None,
        # How close to what this emulator on this machine allows at all (the ceiling client's share).
        "share_of_ceiling": round(ours["share_from_first_submit"] / rows[2]["share_from_first_submit"], 3),
        "runs": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
