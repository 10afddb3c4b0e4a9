"""Watch a batch until every document is archived, with a progress bar, then summarise it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import jobs, storage
from pipeline.enqueue import JobHandle
from pipeline.runtime import get_runtime


@dataclass
class Outcome:
    handle: JobHandle
    state: str  # done, failed, or the last state seen when the wait timed out
    location: str  # the archive object: result.json or error.json
    reason: str = ""


def track(handles: list[JobHandle], *, timeout: float = 3600, console: Console | None = None) -> list[Outcome]:
    """Show a progress bar until every handle is final (or ``timeout``); return each one's outcome."""
    console = console or Console()
    rt = get_runtime()
    ids = [h.job_id for h in handles]
    deadline = time.monotonic() + timeout
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("documents", total=len(handles), detail="")
        while True:
            current = jobs.states(rt.redis, ids)
            counts = Counter(state or "queued" for state in current.values())
            finished = counts["done"] + counts["failed"]
            detail = " ".join(f"{name}={counts[name]}" for name in ("queued", "staged", "submitted", "fetched", "done", "failed") if counts[name])
            progress.update(bar, completed=finished, detail=detail)
            if finished == len(handles) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return [_outcome(h, current.get(h.job_id) or "queued") for h in handles]


def _outcome(handle: JobHandle, state: str) -> Outcome:
    prefix = storage.archive_prefix(handle.provider, handle.job_id)
    final = storage.finished(handle.provider, handle.job_id)
    if final == "result.json":
        return Outcome(handle, "done", storage.archive_uri(handle.provider, handle.job_id, final))
    if final == "error.json":
        error = storage.get_json(prefix + final)
        return Outcome(handle, "failed", storage.archive_uri(handle.provider, handle.job_id, final), f"{error['stage']}: {error['message']}")
    return Outcome(handle, state, "", "not finished yet")


def summary_table(outcomes: list[Outcome]) -> Table:
    table = Table(title="docpipe batch", show_lines=False)
    table.add_column("provider")
    table.add_column("source", overflow="fold")
    table.add_column("state")
    table.add_column("archive / reason", overflow="fold")
    for outcome in outcomes:
        style = {"done": "green", "failed": "red"}.get(outcome.state, "yellow")
        where = outcome.location + (f"\n{outcome.reason}" if outcome.reason else "")
        table.add_row(outcome.handle.provider, outcome.handle.source, f"[{style}]{outcome.state}[/]", where)
    return table


def counts(outcomes: list[Outcome]) -> Counter:
    return Counter(o.state for o in outcomes)
