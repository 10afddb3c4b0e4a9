"""Batch ingestion: every object under an S3 prefix (or local folder) becomes one job.

One bad object (vanished, unreadable) is reported and the rest go on; objects whose
archive is already final are skipped, so re-running an ingestion resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.enqueue import JobHandle, enqueue_many


@dataclass
class IngestReport:
    handles: list[JobHandle] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    @property
    def skipped(self) -> int:
        return sum(1 for h in self.handles if h.skipped)


def sources(location: str) -> list[str]:
    """The documents under an ``s3://bucket/prefix`` or a local folder (or one file)."""
    if location.startswith("s3://"):
        bucket, prefix = storage.parse_s3_uri(location)
        return [f"s3://{bucket}/{o['Key']}" for o in storage.list_objects(bucket, prefix) if not o["Key"].endswith("/")]
    path = Path(location)
    if path.is_dir():
        return [str(p) for p in sorted(path.rglob("*")) if p.is_file()]
    return [str(path)]


def ingest(
    location: str, provider: str, options: dict[str, Any] | None = None, *, retry_failed: bool = False, concurrency: int = 8
) -> IngestReport:
    report = IngestReport()
    for outcome in enqueue_many(sources(location), provider, options, retry_failed=retry_failed, concurrency=concurrency):
        if outcome.handle is not None:
            report.handles.append(outcome.handle)
        else:
            report.errors.append((outcome.source, outcome.error or "not sent"))
    return report
