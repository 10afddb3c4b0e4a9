"""Named batches: every ingest or submit belongs to one, and a batch of any size is watched cheaply.

Why counters and not a scan: an operator asks "how is yesterday's ingestion doing" of a batch
of 100,000 documents, and a progress bar asks it every half second. Reading 100,000 records
(or listing 100,000 archives) per refresh would cost more than the batch. So each job's
record names its batches, and every change of its state moves it between its batches'
counters in the same Redis script that writes the state (``pipeline.jobs``). A batch's
status is then one read of a few small hashes, whatever its size, and finished jobs are
appended to a list that ``as_completed`` follows from where it left off.

Redis keys, per batch ``B``: ``docpipe:batch:B`` (what it is: provider, location, total,
listing done, first/last finish), ``:counts`` (jobs per state), ``:reasons`` (failures per
``stage:code[:provider code]``), ``:refused`` (sources refused before they became jobs,
with the reason), ``:members`` (job ids), ``:finished`` (job ids in the order they ended).
"""

from __future__ import annotations

import fnmatch
import json
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

from pipeline import jobs, storage
from pipeline.enqueue import DOCUMENT_ERRORS, DocumentFailedError, Enqueued, JobHandle, enqueue, enqueue_listed, enqueue_many
from pipeline.models import JobError, NormalizedResult
from pipeline.runtime import get_runtime

PREFIX = "docpipe:batch:"
INDEX = "docpipe:batches"  # every batch by creation time
BATCH_TTL = 30 * 24 * 3600
FINAL = ("done", "failed", "cancelled")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class BatchError(ValueError):
    """A batch name that is not allowed, or one that does not exist."""


def new_name(provider: str) -> str:
    """A readable, sortable, unique name: ``<provider>-<UTC time>-<random>``."""
    return f"{provider}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise BatchError(f"batch name {name!r}: use letters, digits, '.', '_' and '-' (at most 100), starting with a letter or digit")
    return name


def key(name: str, part: str = "") -> str:
    return f"{PREFIX}{name}{':' + part if part else ''}"


def create(client: redis.Redis, name: str, *, provider: str, location: str, options: dict[str, Any] | None = None) -> None:
    """Record the batch (again: an ingest re-run under the same name adds to it)."""
    check_name(name)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.hsetnx(key(name), "created_at", now)
    pipe.hset(key(name), mapping={"name": name, "provider": provider, "location": location, "listing": "running", "updated_at": now})
    for part in ("", "counts", "reasons", "refused", "members", "finished"):
        pipe.expire(key(name, part), BATCH_TTL)
    pipe.zadd(INDEX, {name: now}, nx=True)
    pipe.execute()


def listing_done(client: redis.Redis, name: str) -> None:
    """Every source of the batch is enqueued or refused: its total is final."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(key(name), mapping={"listing": "done", "listed_at": time.time()})
    for part in ("", "counts", "reasons", "refused", "members", "finished"):
        pipe.expire(key(name, part), BATCH_TTL)
    pipe.execute()


def refuse(client: redis.Redis, name: str, source: str, reason: str) -> None:
    """A source that never became a job (unreadable, vanished, bad options): kept with its reason."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(key(name, "refused"), source, reason[:500])
    pipe.hincrby(key(name), "refused", 1)
    pipe.execute()


def exists(client: redis.Redis, name: str) -> bool:
    return bool(client.exists(key(name)))


def names(client: redis.Redis, limit: int = 50) -> list[str]:
    """The most recent batches, newest first."""
    return [n.decode() for n in client.zrevrange(INDEX, 0, limit - 1)]


# --- status ------------------------------------------------------------------------------------


@dataclass
class BatchStatus:
    """What a batch looks like now: from its counters, at a cost independent of its size."""

    name: str
    provider: str
    location: str
    created_at: float
    listing_done: bool
    total: int
    skipped: int
    refused: int
    counts: dict[str, int]
    reasons: dict[str, int]
    first_finished_at: float | None
    last_finished_at: float | None
    now: float = field(default_factory=time.time)

    @property
    def finished(self) -> int:
        return sum(self.counts.get(state, 0) for state in FINAL)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def unfinished(self) -> int:
        return self.total - self.finished

    @property
    def complete(self) -> bool:
        return self.listing_done and self.unfinished == 0

    @property
    def succeeded(self) -> bool:
        """Everything listed ended archived: nothing failed, cancelled or refused."""
        return self.complete and self.failed == 0 and self.counts.get("cancelled", 0) == 0 and self.refused == 0

    def throughput(self) -> float | None:
        """Documents finished per second, skipped ones aside, over the time the batch has run."""
        ran = self.finished - self.skipped
        if ran <= 0:
            return None
        elapsed = (self.last_finished_at if self.complete and self.last_finished_at else self.now) - self.created_at
        return ran / elapsed if elapsed > 0 else None

    def eta(self) -> float | None:
        """Seconds until the last listed document ends, at the throughput so far."""
        if self.unfinished == 0:
            return 0.0
        rate = self.throughput()
        return self.unfinished / rate if rate else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.name,
            "provider": self.provider,
            "location": self.location,
            "created_at": self.created_at,
            "listing_done": self.listing_done,
            "total": self.total,
            "finished": self.finished,
            "unfinished": self.unfinished,
            "skipped": self.skipped,
            "refused": self.refused,
            "counts": self.counts,
            "failures_by_reason": self.reasons,
            "throughput_per_s": self.throughput(),
            "eta_s": self.eta(),
            "complete": self.complete,
            "succeeded": self.succeeded,
        }


def status(client: redis.Redis, name: str) -> BatchStatus:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(key(name))
    pipe.hgetall(key(name, "counts"))
    pipe.hgetall(key(name, "reasons"))
    meta, counts, reasons = (jobs.decoded(h) for h in pipe.execute())
    if not meta:
        raise BatchError(f"no batch named {name!r}")
    return BatchStatus(
        name=name,
        provider=meta.get("provider", ""),
        location=meta.get("location", ""),
        created_at=float(meta.get("created_at") or 0.0),
        listing_done=meta.get("listing") == "done",
        total=int(meta.get("total") or 0),
        skipped=int(meta.get("skipped") or 0),
        refused=int(meta.get("refused") or 0),
        counts={k: int(v) for k, v in counts.items() if int(v) > 0},
        reasons=dict(sorted(((k, int(v)) for k, v in reasons.items() if int(v) > 0), key=lambda kv: -kv[1])),
        first_finished_at=float(meta["first_finished_at"]) if meta.get("first_finished_at") else None,
        last_finished_at=float(meta["last_finished_at"]) if meta.get("last_finished_at") else None,
    )


# --- members ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    job_id: str
    provider: str
    source: str
    state: str
    reason: str = ""  # stage:code[:provider code], for failures
    error: str = ""
    provider_task_id: str = ""
    retryable: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in ("", None)}


def members(client: redis.Redis, name: str, *, state: str | None = None, chunk: int = 500) -> Iterator[Member]:
    """The batch's jobs (optionally only those in ``state``), read a chunk at a time."""
    fields = ("provider", "source", "state", "reason", "error", "provider_task_id", "retryable")
    cursor = 0
    while True:
        cursor, ids = client.sscan(key(name, "members"), cursor, count=chunk)
        if ids:
            pipe = client.pipeline(transaction=False)
            for raw in ids:
                pipe.hmget(jobs.key(raw.decode()), *fields)
            for raw, values in zip(ids, pipe.execute()):
                provider, source, current, reason, error, task_id, retryable = (v.decode() if v else "" for v in values)
                member = Member(
                    raw.decode(), provider, source, current or "unknown", reason, error, task_id, {"1": True, "0": False}.get(retryable)
                )
                if state is None or member.state == state:
                    yield member
        if cursor == 0:
            return


def refused_sources(client: redis.Redis, name: str) -> dict[str, str]:
    return jobs.decoded(client.hgetall(key(name, "refused")))


# --- filling a batch ----------------------------------------------------------------------------


def matches(relative_key: str, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> bool:
    """Shell globs on the key below the prefix (``*`` crosses ``/``): kept when it matches one
    ``include`` (or there is none) and no ``exclude``."""
    include, exclude = list(include), list(exclude)
    if include and not any(fnmatch.fnmatchcase(relative_key, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(relative_key, p) for p in exclude)


def list_sources(location: str, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Iterator[tuple[str, str | None]]:
    """(source, ETag when the listing gave one) for every document under ``s3://bucket/prefix``
    or a local folder, page by page as the listing goes: nothing is held but the current page."""
    include, exclude = list(include), list(exclude)
    if location.startswith("s3://"):
        bucket, prefix = storage.parse_s3_uri(location)
        for obj in storage.list_objects(bucket, prefix):
            name = obj["Key"]
            if name.endswith("/") or not matches(name[len(prefix) :].lstrip("/"), include, exclude):
                continue
            yield f"s3://{bucket}/{name}", str(obj.get("ETag", "")).strip('"') or None
        return
    path = Path(location).expanduser()
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and matches(str(file.relative_to(path)), include, exclude):
                yield str(file), None
        return
    if not path.exists():
        raise FileNotFoundError(f"{location}: no such file or folder")
    yield str(path), None


@dataclass
class Filled:
    """What enqueueing a batch did, in counts (the batch itself holds the details)."""

    enqueued: int = 0
    skipped: int = 0
    refused: int = 0


def fill(
    name: str,
    sources: Iterable[str | Path],
    provider: str,
    options: dict[str, Any] | None = None,
    *,
    retry_failed: bool = False,
    concurrency: int = 8,
    on_each: Any = None,
) -> Filled:
    """Enqueue ``sources`` into batch ``name`` as they come; refused ones are recorded with their reason."""
    outcomes = enqueue_many(sources, provider, options, retry_failed=retry_failed, concurrency=concurrency, batch=name)
    return _count(name, outcomes, on_each)


def fill_listed(
    name: str, listed: Iterable[tuple[str, str | None]], provider: str, options: dict[str, Any] | None = None, *, on_each: Any = None
) -> Filled:
    """``fill`` from ``list_sources`` of an ``s3://`` location, a chunk of the listing at a time
    (``enqueue_listed``); a retry of failures goes one by one (``fill``)."""
    return _count(name, enqueue_listed(listed, provider, options, batch=name), on_each)


def fill_location(
    name: str,
    location: str,
    provider: str,
    options: dict[str, Any] | None = None,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    retry_failed: bool = False,
    concurrency: int = 8,
    on_each: Any = None,
) -> Filled:
    """Enqueue what ``list_sources`` finds under ``location``, by the quickest way that keeps every rule."""
    listed = list_sources(location, include, exclude)
    if location.startswith("s3://") and not retry_failed:
        return fill_listed(name, listed, provider, options, on_each=on_each)
    sources = (source for source, _ in listed)
    return fill(name, sources, provider, options, retry_failed=retry_failed, concurrency=concurrency, on_each=on_each)


def _count(name: str, outcomes: Iterable[Enqueued], on_each: Any) -> Filled:
    client = get_runtime().redis
    filled = Filled()
    for outcome in outcomes:
        if outcome.handle is None:
            refuse(client, name, outcome.source, outcome.error or "not sent")
            filled.refused += 1
        elif outcome.handle.skipped:
            filled.skipped += 1
        else:
            filled.enqueued += 1
        if on_each is not None:
            on_each(outcome)
    listing_done(client, name)
    return filled


# --- the Python handle ----------------------------------------------------------------------------


class Batch:
    """A handle on a named batch: ``status()``, ``wait()``, and ``as_completed()`` over its finished documents.

    Waiting reads the batch's counters and its list of finished jobs: one or two Redis
    commands per refresh, whatever the batch's size, and no S3 request until a finished
    document's result is asked for.
    """

    def __init__(self, name: str, filled: Filled | None = None) -> None:
        self.name = name
        self.filled = filled

    def __repr__(self) -> str:
        return f"Batch({self.name!r})"

    def status(self) -> BatchStatus:
        return status(get_runtime().redis, self.name)

    def wait(self, timeout: float = 3600.0, interval: float = 0.5) -> BatchStatus:
        """Block until every listed document has ended; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.status()
            if current.complete:
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {self.name}: {current.unfinished} of {current.total} documents unfinished after {timeout:.0f}s")
            time.sleep(interval)

    def as_completed(self, timeout: float = 3600.0, interval: float = 0.5) -> Iterator[JobHandle]:
        """Yield a handle per document as it ends (each once), until the batch is complete."""
        client = get_runtime().redis
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        offset = 0
        while True:
            complete = self.status().complete  # read before the list: nothing that ends after it is missed
            ids = client.lrange(key(self.name, "finished"), offset, offset + 999)
            offset += len(ids)
            if ids:
                pipe = client.pipeline(transaction=False)
                for raw in ids:
                    pipe.hmget(jobs.key(raw.decode()), "provider", "source")
                for raw, (provider, source) in zip(ids, pipe.execute()):
                    job_id = raw.decode()
                    if job_id not in seen:
                        seen.add(job_id)
                        yield JobHandle(job_id, (provider or b"").decode(), (source or b"").decode())
                continue
            if complete:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {self.name}: not complete after {timeout:.0f}s")
            time.sleep(interval)

    def results(self, timeout: float = 3600.0) -> Iterator[tuple[JobHandle, NormalizedResult | JobError]]:
        """Each finished document with its archived result (or its ``error.json``), as they end."""
        for handle in self.as_completed(timeout=timeout):
            try:
                yield handle, handle.wait(timeout=60)
            except DocumentFailedError as failed:
                yield handle, failed.error


def ingest(
    location: str,
    provider: str,
    options: dict[str, Any] | None = None,
    *,
    batch: str | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    retry_failed: bool = False,
    concurrency: int = 8,
) -> Batch:
    """Enqueue every document under ``location`` (``s3://bucket/prefix`` or a folder) as batch
    ``batch`` (a generated name when None), listing and enqueueing page by page."""
    from pipeline import preflight

    preflight.check_for_batch(provider, storage.parse_s3_uri(location)[0] if location.startswith("s3://") else None)
    name = check_name(batch) if batch else new_name(provider)
    create(get_runtime().redis, name, provider=provider, location=location, options=options)
    filled = fill_location(name, location, provider, options, include=include, exclude=exclude, retry_failed=retry_failed, concurrency=concurrency)
    return Batch(name, filled)


# --- retry and cancel -----------------------------------------------------------------------------


@dataclass
class RetryPlan:
    resend: list[Member] = field(default_factory=list)
    kept: list[tuple[Member, str]] = field(default_factory=list)  # (member, why it is not sent again)


def retry_plan(client: redis.Redis, name: str, *, every_failure: bool = False) -> RetryPlan:
    """Which failures to send again: those whose error.json says a retry could help (all with ``every_failure``)."""
    plan = RetryPlan()
    for member in members(client, name, state="failed"):
        if every_failure:
            plan.resend.append(member)
            continue
        retryable = member.retryable
        if retryable is None:  # a record without the flag (it expired, or predates it): ask the archive
            final = storage.finished(member.provider, member.job_id) if member.provider else None
            if final == "error.json":
                retryable = JobError.model_validate(storage.get_json(storage.archive_prefix(member.provider, member.job_id) + final)).retryable
        if retryable:
            plan.resend.append(member)
        else:
            plan.kept.append((member, f"{member.reason or 'failed'}: not retryable (--all sends it anyway)"))
    return plan


def resend(name: str, chosen: list[Member]) -> Filled:
    """Enqueue ``chosen`` failures again in their batch, with the options they were first sent with."""
    client = get_runtime().redis
    filled = Filled()
    for member in chosen:
        raw = client.hget(jobs.key(member.job_id), "options")
        options = json.loads(raw) if raw else {}
        try:
            enqueue(member.source, member.provider, options, retry_failed=True, batch=name)
        except DOCUMENT_ERRORS as exc:
            refuse(client, name, member.source, str(exc))
            filled.refused += 1
        else:
            filled.enqueued += 1
    return filled


@dataclass
class Cancelled:
    cancelled: int = 0
    ended: int = 0
    at_provider: list[Member] = field(default_factory=list)


def cancel(client: redis.Redis, name: str) -> Cancelled:
    """Cancel every member no provider has seen; the others are named (at the provider) or counted (ended)."""
    ledger = get_runtime().ledger
    outcome = Cancelled()
    for member in members(client, name):
        if member.state in FINAL:
            outcome.ended += 1
            continue
        answer = ledger.cancel(member.job_id)
        if answer == "cancelled":
            outcome.cancelled += 1
        elif answer == "at_provider":
            outcome.at_provider.append(jobs_member(client, member))
        else:
            outcome.ended += 1
    return outcome


def jobs_member(client: redis.Redis, member: Member) -> Member:
    """The member with its provider task id as recorded now (it may have been accepted meanwhile)."""
    task_id = client.hget(jobs.key(member.job_id), "provider_task_id")
    return Member(**{**member.__dict__, "provider_task_id": task_id.decode() if task_id else ""})
