"""``docpipe demo``: a sample batch through a whole local stack, start to finish.

It starts redis-server, moto's S3 server, the three provider emulators, the callback
receiver, Celery workers and Flower as local processes; makes sample documents (invoices,
ID cards and receipts for OCR and extraction, reports for moderation, one broken PDF);
puts them in an inbox bucket, one prefix per provider; ingests each prefix with a
progress bar; prints where each result landed; copies the archive to a local folder (the
S3 server keeps data in memory); and stops everything it started, Ctrl-C included.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from pipeline import progress, storage
from pipeline.devstack import LocalStack

INBOX_BUCKET = "docpipe-inbox"
PROVIDERS = ("baidu", "idp", "tuputech")


def _copy_archive(out: Path) -> int:
    bucket = storage.get_settings().results_bucket
    copied = 0
    for obj in storage.list_objects(bucket):
        target = out / obj["Key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.s3_client().download_file(bucket, obj["Key"], str(target))
        copied += 1
    return copied


def _samples(folder: Path, provider: str, count: int) -> list:
    from pipeline import samples

    folder.mkdir(parents=True, exist_ok=True)
    if provider == "tuputech":
        return [
            samples.make_report_pdf(folder / f"report-{n:03d}.pdf", n, flagged_page=None if n % 3 == 0 else 1,
                                    word="FORBIDDEN" if n % 3 == 1 else "REVIEW")
            for n in range(count)
        ]
    return samples.make_batch(folder, count, corrupt=1 if provider == "baidu" else 0)


def run_demo(*, count: int, workers: int, out: Path, keep_up: bool, console: Console, providers: tuple[str, ...] = PROVIDERS) -> int:
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    workdir = out / "stack"
    stack = LocalStack(
        workdir,
        emulator_config={name: {"processing_min": 2.0, "processing_max": 6.0} for name in providers},
        # Baidu advises a first poll 30 s after submit; the emulators are quicker, so the demo is too.
        settings={
            "DOCPIPE_POLL_FIRST_DELAY": "3",
            "DOCPIPE_POLL_BASE_DELAY": "1",
            "DOCPIPE_POLL_MAX_DELAY": "5",
            "DOCPIPE_TUPUTECH_CALLBACK_RULE": "all",
        },
    )
    queues = [f"docpipe.{name}" for name in providers]
    try:
        with console.status("starting redis-server, S3 (moto), the emulators, the callback receiver, workers and Flower..."):
            stack.start_all(providers, workers, name="demo")
        user, password = stack.flower_auth or ("", "")
        console.print(
            f"stack up: {workers} workers on {', '.join(queues)}; Flower at [link]{stack.flower_url}[/link] "
            f"(user {user}, password {password}); logs in {workdir}"
        )

        from pipeline import batches

        client = storage.s3_client()
        client.create_bucket(Bucket=INBOX_BUCKET)
        names = []
        started = time.monotonic()
        for provider in providers:
            made = _samples(out / "samples" / provider, provider, count if provider == "baidu" else max(4, count // 2))
            for sample in made:
                client.upload_file(str(sample.path), INBOX_BUCKET, f"{provider}/{sample.path.name}")
            batch = batches.ingest(f"s3://{INBOX_BUCKET}/{provider}/", provider)
            names.append(batch.name)
            console.print(f"{provider}: {len(made)} documents in s3://{INBOX_BUCKET}/{provider}/ -> batch {batch.name}")

        statuses = progress.watch(names, timeout=900, console=console)
        elapsed = time.monotonic() - started

        rows = [row for name in names for row in progress.rows(name)]
        console.print(progress.summary_table(rows))
        done = sum(s.counts.get("done", 0) for s in statuses.values())
        failed = sum(s.failed + s.refused for s in statuses.values())
        copied = _copy_archive(out / "archive")
        console.print(
            f"\n[bold]{done} done, {failed} failed[/] of {len(rows)} in {elapsed:.1f}s\n"
            f"results: s3://{storage.get_settings().results_bucket}/<provider>/<job_id>/ "
            f"(result.json + raw.json [+ highlight.pdf, pages/], or error.json)\n"
            f"archive copied to {out / 'archive'} ({copied} files)\n"
            f"batches: {', '.join(names)} (`docpipe status <batch>` while the stack is up)\n"
            f"Flower: {stack.flower_url}"
        )
        if keep_up:
            console.print("stack stays up; Ctrl-C stops it")
            while True:
                time.sleep(1)
        return 0
    except TimeoutError as exc:
        console.print(f"[red]the demo batch did not finish: {exc}[/]")
        return 3
    except KeyboardInterrupt:
        console.print("\ninterrupted: stopping the stack")
        return 130
    finally:
        stack.stop()
