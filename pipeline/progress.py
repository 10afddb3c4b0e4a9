"""Watch batches to their end with a progress bar, then summarise them.

Each refresh reads each batch's counters (``pipeline.batches.status``): three small hashes
per batch, the same for 10 documents as for 100,000. Nothing here touches S3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import batches, storage
from pipeline.runtime import get_runtime

SHOWN_STATES = ("queued", "staged", "submitted", "fetched", "done", "failed", "cancelled")


def describe(status: batches.BatchStatus) -> str:
    """One line: counts by state, throughput, ETA."""
    parts = [f"{state}={status.counts[state]}" for state in SHOWN_STATES if status.counts.get(state)]
    rate = status.throughput()
    if rate:
        parts.append(f"{rate:.2f}/s")
    eta = status.eta()
    if eta and not status.complete:
        parts.append(f"ETA {_duration(eta)}")
    if not status.listing_done:
        parts.append("(listing)")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def watch(names: list[str], *, timeout: float = 3600.0, console: Console | None = None, interval: float = 0.5) -> dict[str, batches.BatchStatus]:
    """A bar per batch until every one is complete; ``TimeoutError`` after ``timeout`` (the bars stay printed)."""
    console = console or Console()
    client = get_runtime().redis
    deadline = time.monotonic() + timeout
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bars = {name: progress.add_task(name, total=None, detail="") for name in names}
        while True:
            current = {name: batches.status(client, name) for name in names}
            for name, status in current.items():
                progress.update(bars[name], total=status.total or None, completed=status.finished, detail=describe(status))
            if all(status.complete for status in current.values()):
                return current
            if time.monotonic() > deadline:
                unfinished = sum(s.unfinished for s in current.values())
                raise TimeoutError(f"{unfinished} documents unfinished after {timeout:.0f}s")
            time.sleep(interval)


@dataclass(frozen=True)
class Row:
    provider: str
    source: str
    state: str
    where: str  # the archive object, or why there is none


def rows(name: str) -> list[Row]:
    """One row per document of a (small) batch, from the records: where its result or error landed."""
    client = get_runtime().redis
    out = []
    for member in batches.members(client, name):
        if member.state == "done":
            where = storage.archive_uri(member.provider, member.job_id, "result.json")
        elif member.state == "failed":
            where = f"{storage.archive_uri(member.provider, member.job_id, 'error.json')}\n{member.error}"
        else:
            where = ""
        out.append(Row(member.provider, member.source, member.state, where))
    for source, reason in batches.refused_sources(client, name).items():
        out.append(Row("", source, "refused", reason))
    return sorted(out, key=lambda r: (r.provider, r.source))


def summary_table(all_rows: list[Row], title: str = "docpipe batch") -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("provider")
    table.add_column("source", overflow="fold")
    table.add_column("state")
    table.add_column("archive / reason", overflow="fold")
    for row in all_rows:
        style = {"done": "green", "failed": "red", "refused": "red"}.get(row.state, "yellow")
        table.add_row(row.provider, row.source, f"[{style}]{row.state}[/]", row.where)
    return table
