"""B5 (memory): do the largest documents the providers accept stream through a worker?

``python -m bench.scale [--idp-mb 49] [--baidu-mb 7]``

One worker (4 threads) on the baidu and idp queues of a local stack. After a warm-up batch of
small documents (so that what the first document of a provider loads is not counted), its
resident memory is read (idle), its peak is reset (``/proc/<pid>/clear_refs``), and one large
document goes through each provider end to end: a PDF just under idp's 50 MB, and for baidu the
largest whose base64+url-encoded form fits its 10 MB. The peak resident memory the worker
reached is read after each (``VmHWM``).

Printed per provider: the document's size, the size of the artifacts fetch downloaded (idp's
highlighted PDF, the document with its fields marked), the bytes a worker holding them whole
would need (the document for idp's multipart upload and the highlighted PDF; the document, its
base64 and its url-encoding for baidu: the baseline the streaming replaces), the worker's idle and peak RSS, and the growth against
the 60 MB target. Last line: one JSON object of the figures.

Not measured here (issue 14's other B5 scenarios): the 100,000-key listing rate is
``python -m bench.listing``; the 10,000-document run at 50 times the limits has no benchmark yet.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idp-mb", type=float, default=49.0, help="idp accepts up to 50 MB")
    parser.add_argument("--baidu-mb", type=float, default=7.0, help="baidu accepts up to 10 MB once base64+url-encoded (~7.4 MB)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="docpipe-scale-") as tmp:
        workdir = Path(tmp)
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
            for provider, megabytes in (("idp", args.idp_mb), ("baidu", args.baidu_mb)):
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
    print(json.dumps({"benchmark": "B5 memory", "target_mb": TARGET_MB, "target_met": all(r["target_met"] for r in rows), "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
