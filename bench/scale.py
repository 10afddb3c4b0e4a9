"""B5 (memory and scale): do the largest documents stream through a worker, does a big listing
enqueue fast with flat memory, and do 10,000 documents at raised limits all end, once each?

``python -m bench.scale [--only memory listing volume] [--idp-mb 49] [--baidu-mb 7] [--keys 100000] [--documents 10000]``

``memory``: one worker (4 threads) on the baidu and idp queues of a local stack. After a warm-up batch of
small documents (so that what the first document of a provider loads is not counted), its
resident memory is read (idle), its peak is reset (``/proc/<pid>/clear_refs``), and one large
document goes through each provider end to end: a PDF just under idp's 50 MB, and for baidu the
largest whose base64+url-encoded form fits its 10 MB. The peak resident memory the worker
reached is read after each (``VmHWM``).

Printed per provider: the document's size, the size of the artifacts fetch downloaded (idp's
highlighted PDF, the document with its fields marked), the bytes a worker holding them whole
would need (the document for idp's multipart upload and the highlighted PDF; the document, its
base64 and its url-encoding for baidu: the baseline the streaming replaces), the worker's idle
and peak RSS, and the growth against the 60 MB target.

``listing``: ``bench.listing``'s run (100,000 keys enqueued from their listing, the rate and
this process' memory at each tenth, against the same listing enqueued one by one).

``volume``: 10,000 documents over the three providers through four worker processes of eight
threads (two hosts' worth), with every limit raised 50 times (the emulators' and, through
``DOCPIPE_RATE_SCALE`` and ``DOCPIPE_TUPUTECH_MAX_IN_FLIGHT``, the client's): the chaos suite's
referees count documents lost, archived twice, sent twice and over a limit, and each provider's
achieved rate is printed as a share of its raised limit (in flight, for tuputech).

``--only memory listing volume`` picks scenarios (all by default). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline import sniff, storage
from pipeline.config import get_settings
from pipeline.devstack import LocalStack
from pipeline.enqueue import enqueue_many
from pipeline.samples import make_batch

EMULATOR = {"processing_min": 0.2, "processing_max": 0.5}
SETTINGS = {"DOCPIPE_POLL_FIRST_DELAY": "0.5", "DOCPIPE_POLL_BASE_DELAY": "0.5", "DOCPIPE_POLL_MAX_DELAY": "1"}
TARGET_MB = 60.0
MB = 1024 * 1024


def memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> None:
    """Make ``VmHWM`` start again from the current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def large_pdf(path: Path, size: int) -> Path:
    """A valid one-page PDF of about ``size`` bytes: the bulk is a stream of random bytes (their
    base64 holds the ``+`` and ``/`` that url-encoding triples) that the page refers to, so
    every reader (the stage's sniffing, the emulators' page count) takes it for what it is."""
    from pypdf import PdfWriter
    from pypdf.generic import NameObject, StreamObject

    writer = PdfWriter()
    page = writer.add_blank_page(595, 842)
    filler = StreamObject()
    filler.set_data(os.urandom(max(0, size - 2048)))
    page[NameObject("/DocpipeFiller")] = writer._add_object(filler)
    with path.open("wb") as out:
        writer.write(out)
    return path


def whole_submit_bytes(provider: str, path: Path) -> int:
    """What a submit holding the document whole keeps in memory at once, at the least."""
    size = path.stat().st_size
    if provider == "idp":
        return size
    with path.open("rb") as fh:
        encoded = sniff.urlencoded_base64_size(iter(lambda: fh.read(MB), b""))
    return size + size * 4 // 3 + encoded


def artifact_bytes(provider: str, job_id: str) -> int:
    """The size of what fetch downloaded besides the result (idp's highlighted PDF)."""
    names = storage.archive_names(provider, job_id) - {"result.json", "raw.json"}
    prefix = storage.archive_prefix(provider, job_id)
    return sum(storage.head(get_settings().results_bucket, prefix + name)["ContentLength"] for name in names)


def run_one(pid: int, provider: str, path: Path) -> dict[str, Any]:
    idle = memory_mb(pid, "VmRSS")
    reset_peak(pid)
    started = time.monotonic()
    sent = list(enqueue_many([path], provider))
    if sent[0].handle is None:
        raise SystemExit(f"{path.name} not sent: {sent[0].error}")
    sent[0].handle.wait(timeout=600)
    peak = memory_mb(pid, "VmHWM")
    artifacts = artifact_bytes(provider, sent[0].handle.job_id)
    return {
        "provider": provider,
        "document_mb": round(path.stat().st_size / MB, 1),
        "artifacts_mb": round(artifacts / MB, 1),
        "whole_submit_mb": round((whole_submit_bytes(provider, path) + artifacts) / MB, 1),
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - idle, 1),
        "seconds": round(time.monotonic() - started, 1),
        "target_met": peak - idle <= TARGET_MB,
    }


# --- volume: many documents at raised limits -----------------------------------------------------

RAISE = 50  # every limit, the emulators' and the client's, times this (time compressed)
VOLUME_EMULATOR = {
    "baidu": {"processing_min": 0.5, "processing_max": 3.0, "submit_qps": 2.0 * RAISE, "get_result_qps": 10.0 * RAISE},
    "idp": {"processing_min": 0.5, "processing_max": 3.0},
    "tuputech": {"processing_min": 0.5, "processing_max": 3.0, "max_in_flight": 30 * RAISE},
}
VOLUME_SETTINGS = {
    "DOCPIPE_RATE_SCALE": str(RAISE),
    "DOCPIPE_TUPUTECH_MAX_IN_FLIGHT": str(30 * RAISE),
    "DOCPIPE_POLL_FIRST_DELAY": "0.5",
    "DOCPIPE_POLL_BASE_DELAY": "0.5",
    "DOCPIPE_POLL_MAX_DELAY": "2",
}
# What each provider's achieved rate is measured against: (endpoint whose accepted arrivals count,
# its raised limit per second). idp documents no limit: the client's own, raised.
VOLUME_LIMITS = {"baidu": ("submit", 2.0 * RAISE), "idp": ("task", 2.0 * RAISE)}


def send_listed(chaos: Any, documents: int) -> list[Any]:
    """Put the documents in an inbox bucket (setting up, not measured), then enqueue each
    provider's prefix from its listing, as ``docpipe ingest`` does."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.batches import list_sources
    from pipeline.enqueue import enqueue_listed

    inbox = storage.s3_client(get_settings())
    inbox.create_bucket(Bucket="volume-inbox")
    made = chaos.documents("volume", documents)
    files = [(path, f"{provider}/{path.name}") for provider, paths in made.items() for path in paths]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: inbox.upload_file(str(item[0]), "volume-inbox", item[1]), files))
    handles = []
    for provider in made:
        for sent in enqueue_listed(list_sources(f"s3://volume-inbox/{provider}/"), provider):
            if sent.handle is None:
                raise SystemExit(f"{sent.source} not sent: {sent.error}")
            handles.append(sent.handle)
    return handles


def volume(workdir: Path, documents: int, workers: int, timeout: float) -> dict[str, Any]:
    """``documents`` over the three providers through ``workers`` worker processes (two hosts'
    worth), every limit raised ``RAISE`` times; the chaos suite's referees count what was lost,
    archived twice, sent twice or over a limit."""
    from bench.chaos import PROVIDERS, Chaos, Row
    from bench.rate_limits import rate

    chaos = Chaos(
        workdir, workers, emulator_config=VOLUME_EMULATOR, settings=VOLUME_SETTINGS, tuputech_limit=30 * RAISE, concurrency=8
    )
    try:
        chaos.start()
        row = Row(f"volume_{documents}")
        started = time.time()
        handles = send_listed(chaos, documents)
        sent_s = time.time() - started
        print(f"volume: {len(handles)} documents put in S3 and enqueued from its listing in {sent_s:.0f}s; waiting for them to end ...", flush=True)
        states = chaos.wait_ended(handles, timeout)
        row.seconds = round(time.time() - started, 1)
        chaos.measure(row, handles, states)
        shares: dict[str, dict[str, Any]] = {}
        for provider in PROVIDERS:
            stats = chaos.emulator(provider, "/_emulator/stats?arrivals=1")
            if provider in VOLUME_LIMITS:
                endpoint, limit = VOLUME_LIMITS[provider]
                achieved = rate(stats["accepted_at"].get(endpoint, []))
                shares[provider] = {"endpoint": endpoint, "limit_per_s": limit, "achieved_per_s": round(achieved, 1), "share": round(achieved / limit, 3)}
            else:
                seen = int(stats.get("max_in_flight_seen", 0))
                shares[provider] = {"endpoint": "in flight", "limit": 30 * RAISE, "max_in_flight_seen": seen, "share": round(seen / (30 * RAISE), 3)}
    finally:
        chaos.stack.stop()
    ok = row.lost == 0 and row.archived_twice == 0 and row.extra_provider_tasks == 0 and row.limit_violations == 0
    return {"row": row.as_json(), "providers": shares, "workers": workers, "raise": RAISE, "invariants_held": ok, "enqueue_s": round(sent_s, 1)}


def print_volume(result: dict[str, Any]) -> None:
    row = result["row"]
    print(
        f"volume: {row['documents']} documents in {row['seconds']:.0f}s on {result['workers']} workers: archived {row['archived']}, "
        f"failed {row['failed']}, lost {row['lost']}, archived twice {row['archived_twice']}, extra provider tasks "
        f"{row['extra_provider_tasks']}, limit violations {row['limit_violations']} {row['notes']}",
        flush=True,
    )
    for provider, figures in result["providers"].items():
        if "achieved_per_s" in figures:
            print(f"  {provider:<9} {figures['endpoint']}: {figures['achieved_per_s']:.1f}/s of {figures['limit_per_s']:.0f}/s = {figures['share']:.3f}")
        else:
            print(f"  {provider:<9} at most {figures['max_in_flight_seen']} in flight of {figures['limit']} = {figures['share']:.3f}")


def memory(workdir: Path, idp_mb: float, baidu_mb: float) -> list[dict[str, Any]]:
    rows = []
    providers = ("idp", "baidu")
    with LocalStack(workdir / "stack", emulator_config={p: dict(EMULATOR) for p in providers}, settings=dict(SETTINGS)) as stack:
        stack.start_base(providers)
        stack.start_worker("scale", [f"docpipe.{p}" for p in providers], concurrency=4)
        pid = stack.procs["worker-scale"].popen.pid
        warm = [s.path for s in make_batch(workdir / "warm", 4)]
        for provider in providers:
            for sent in enqueue_many(warm, provider, options={"warm-up": "1"}):
                if sent.handle is not None:
                    sent.handle.wait(timeout=300)
        for provider, megabytes in (("idp", idp_mb), ("baidu", baidu_mb)):
            path = large_pdf(workdir / f"large-{provider}.pdf", int(megabytes * MB))
            row = run_one(pid, provider, path)
            rows.append(row)
            print(
                f"{provider:<6} {row['document_mb']:>6.1f} MB document, {row['artifacts_mb']:>5.1f} MB artifacts "
                f"(held whole: {row['whole_submit_mb']:>6.1f} MB)  "
                f"worker RSS idle {row['idle_rss_mb']:>6.1f} MB, peak {row['peak_rss_mb']:>6.1f} MB: "
                f"+{row['growth_mb']:.1f} MB (target <= {TARGET_MB:.0f})  in {row['seconds']:.1f} s",
                flush=True,
            )
    return rows


SCENARIOS = ("memory", "listing", "volume")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--idp-mb", type=float, default=49.0, help="idp accepts up to 50 MB")
    parser.add_argument("--baidu-mb", type=float, default=7.0, help="baidu accepts up to 10 MB once base64+url-encoded (~7.4 MB)")
    parser.add_argument("--keys", type=int, default=100_000, help="keys of the listing")
    parser.add_argument("--documents", type=int, default=10_000, help="documents of the volume run, over the three providers")
    parser.add_argument("--workers", type=int, default=4, help="worker processes of the volume run (8 threads each)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="longest wait for the volume run to end")
    parser.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it (logs of every process)")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"benchmark": "B5 scale"}
    with tempfile.TemporaryDirectory(prefix="docpipe-scale-") as tmp:
        workdir = Path(tmp) if args.keep is None else args.keep
        workdir.mkdir(parents=True, exist_ok=True)
        if "memory" in args.only:
            print("== memory: the largest documents through one worker", flush=True)
            rows = memory(workdir / "memory", args.idp_mb, args.baidu_mb)
            figures["memory"] = {"target_mb": TARGET_MB, "target_met": all(r["target_met"] for r in rows), "runs": rows}
        if "listing" in args.only:
            from bench import listing

            print(f"== listing: {args.keys} keys enqueued from their listing", flush=True)
            figures["listing"] = listing.run(args.keys)
        if "volume" in args.only:
            print(f"== volume: {args.documents} documents, every limit x{RAISE}", flush=True)
            result = volume(workdir / "volume", args.documents, args.workers, args.timeout)
            print_volume(result)
            figures["volume"] = result
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
