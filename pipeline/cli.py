"""The ``docpipe`` command: submit documents, ingest prefixes, run the demo, inspect jobs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline import progress
from pipeline.providers import provider_names

# No locals in tracebacks: they would print settings and keys.
app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
console = Console()

ProviderOpt = Annotated[str, typer.Option("--provider", "-p", help=f"one of: {', '.join(provider_names())}")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="provider option KEY=VALUE (VALUE may be JSON)")]


def _options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _check_provider(provider: str) -> None:
    if provider not in provider_names():
        raise typer.BadParameter(f"unknown provider {provider!r}; known: {', '.join(provider_names())}", param_hint="--provider")


def _finish(handles, wait: bool, timeout: float) -> None:
    if not wait:
        for h in handles:
            console.print(f"{h.job_id}  {h.source}  -> {h.archive_uri}{'  (already archived)' if h.skipped else ''}")
        return
    outcomes = progress.track(handles, timeout=timeout, console=console)
    console.print(progress.summary_table(outcomes))
    counts = progress.counts(outcomes)
    console.print(f"done {counts['done']}, failed {counts['failed']}, unfinished {len(outcomes) - counts['done'] - counts['failed']}")
    if counts["done"] != len(outcomes):
        raise typer.Exit(1)


@app.command()
def submit(
    files: Annotated[list[str], typer.Argument(help="local paths or s3:// URIs")],
    provider: ProviderOpt = "baidu",
    option: OptionOpt = None,
    wait: Annotated[bool, typer.Option(help="wait and print where each result landed")] = False,
    timeout: float = 3600.0,
    retry_failed: bool = False,
) -> None:
    """Send documents down the provider's chain."""
    from pipeline.enqueue import enqueue_many

    _check_provider(provider)
    options = _options(option)
    handles, refused = [], 0
    for outcome in enqueue_many(files, provider, options, retry_failed=retry_failed):
        if outcome.handle is not None:
            handles.append(outcome.handle)
        else:  # named and reported; the other documents go on
            console.print(f"[red]{outcome.source}: {outcome.error}[/]")
            refused += 1
    _finish(handles, wait, timeout)
    if refused:
        raise typer.Exit(1)


@app.command()
def ingest(
    location: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local folder")],
    provider: ProviderOpt = "baidu",
    option: OptionOpt = None,
    wait: bool = True,
    timeout: float = 24 * 3600.0,
    retry_failed: bool = False,
) -> None:
    """Send every document under a prefix; what is already archived is skipped."""
    from pipeline.ingest import ingest as run_ingest

    _check_provider(provider)
    report = run_ingest(location, provider, _options(option), retry_failed=retry_failed)
    for source, reason in report.errors:
        console.print(f"[red]{source}: {reason}[/]")
    console.print(f"{len(report.handles)} documents, {report.skipped} already archived")
    _finish(report.handles, wait, timeout)


@app.command()
def status(job_id: str) -> None:
    """Show one job's Redis record (state, stage, provider task id, error)."""
    from pipeline import jobs
    from pipeline.runtime import get_runtime

    console.print_json(data=jobs.read(get_runtime().redis, job_id))


@app.command()
def callbacks(
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 to accept callbacks from other machines)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port; DOCPIPE_CALLBACK_BASE_URL must reach it")] = 8090,
) -> None:
    """Serve the callback receiver that callback providers (tuputech) deliver results to."""
    import uvicorn

    from pipeline.callbacks import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="warning", access_log=False)


@app.command()
def demo(
    count: Annotated[int, typer.Option(help="how many sample documents to make")] = 24,
    workers: Annotated[int, typer.Option(help="Celery worker processes")] = 2,
    out: Annotated[Path, typer.Option(help="where the archive is copied")] = Path("demo-output"),
    keep_up: Annotated[bool, typer.Option("--keep-up", help="leave the stack running for Flower until Ctrl-C")] = False,
    providers: Annotated[str, typer.Option(help="comma-separated providers to run")] = ",".join(provider_names()),
) -> None:
    """Run a sample batch through a local stack (Redis, S3, emulators, callbacks, workers, Flower)."""
    from pipeline.demo import run_demo

    chosen = tuple(p.strip() for p in providers.split(",") if p.strip())
    unknown = set(chosen) - set(provider_names())
    if unknown:
        raise typer.BadParameter(f"unknown providers: {', '.join(sorted(unknown))}")
    raise typer.Exit(run_demo(count=count, workers=workers, out=out, keep_up=keep_up, console=console, providers=chosen))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
