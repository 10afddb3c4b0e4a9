"""``docpipe demo``: a sample batch through a whole local stack, start to finish.

It starts redis-server, moto's S3 server, the baidu emulator, Celery workers and Flower
as local processes; makes sample invoices, ID cards and receipts (and one broken PDF);
puts them in an inbox bucket; ingests the prefix with a progress bar; prints where each
result landed; copies the archive to a local folder (the S3 server keeps data in
memory); and stops everything it started, Ctrl-C included.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from pipeline import progress, storage
from pipeline.devstack import LocalStack

INBOX_BUCKET = "docpipe-inbox"
DEMO_PROVIDER = "baidu"


def _copy_archive(out: Path) -> int:
    bucket = storage.get_settings().results_bucket
    copied = 0
    for obj in storage.list_objects(bucket):
        target = out / obj["Key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.s3_client().download_file(bucket, obj["Key"], str(target))
        copied += 1
    return copied


def run_demo(*, count: int, workers: int, out: Path, keep_up: bool, console: Console) -> int:
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    workdir = out / "stack"
    stack = LocalStack(
        workdir,
        emulator_config={DEMO_PROVIDER: {"processing_min": 2.0, "processing_max": 6.0}},
        # Baidu advises a first poll 30 s after submit; the emulator is quicker, so the demo is too.
        settings={"DOCPIPE_POLL_FIRST_DELAY": "3", "DOCPIPE_POLL_BASE_DELAY": "1", "DOCPIPE_POLL_MAX_DELAY": "5"},
    )
    try:
        with console.status("starting redis-server, S3 (moto), the baidu emulator, workers and Flower..."):
            stack.start_base([DEMO_PROVIDER])
            for n in range(workers):
                stack.start_worker(f"demo{n + 1}", [f"docpipe.{DEMO_PROVIDER}"], wait=False)
            stack.wait_workers([f"demo{n + 1}" for n in range(workers)])
            stack.start_flower()
        console.print(f"stack up: {workers} workers, Flower at [link]{stack.flower_url}[/link], logs in {workdir}")

        from pipeline import samples
        from pipeline.ingest import ingest

        samples_dir = out / "samples"
        made = samples.make_batch(samples_dir, count, corrupt=1)
        client = storage.s3_client()
        client.create_bucket(Bucket=INBOX_BUCKET)
        for sample in made:
            client.upload_file(str(sample.path), INBOX_BUCKET, f"samples/{sample.path.name}")
        console.print(f"made {len(made)} documents in {samples_dir}, uploaded to s3://{INBOX_BUCKET}/samples/")

        started = time.monotonic()
        report = ingest(f"s3://{INBOX_BUCKET}/samples/", DEMO_PROVIDER)
        outcomes = progress.track(report.handles, timeout=600, console=console)
        elapsed = time.monotonic() - started

        console.print(progress.summary_table(outcomes))
        counts = progress.counts(outcomes)
        copied = _copy_archive(out / "archive")
        console.print(
            f"\n[bold]{counts['done']} done, {counts['failed']} failed[/] of {len(outcomes)} in {elapsed:.1f}s\n"
            f"results: s3://{storage.get_settings().results_bucket}/{DEMO_PROVIDER}/<job_id>/ "
            f"(result.json, raw.json or error.json)\n"
            f"archive copied to {out / 'archive'} ({copied} files)\n"
            f"Flower: {stack.flower_url}"
        )
        if keep_up:
            console.print("stack stays up; Ctrl-C stops it")
            while True:
                time.sleep(1)
        unfinished = len(outcomes) - counts["done"] - counts["failed"]
        return 0 if unfinished == 0 else 1
    except KeyboardInterrupt:
        console.print("\ninterrupted: stopping the stack")
        return 130
    finally:
        stack.stop()
