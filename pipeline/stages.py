"""The five stages of a document, as plain functions of a ``Job``.

Each is idempotent, because late acks mean any of them may run twice after a crash:
``stage`` only reads, ``submit`` remembers the provider's task id before returning,
``fetch`` writes to a work area keyed by job id, and ``archive`` commits with a
conditional write of ``result.json`` that only the first writer wins.
Celery lives in ``workers/``; nothing here needs a broker.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import datetime, timezone

import redis
from pydantic import ValidationError

from pipeline import jobs, sniff, storage
from pipeline.config import get_settings
from pipeline.errors import BadInput, DeadlineExceeded, DocpipeError, Permanent, RateWait
from pipeline.models import DocumentInfo, Job, JobError
from pipeline.polling import PollPolicy
from pipeline.providers import get_provider
from pipeline.runtime import get_runtime

log = logging.getLogger(__name__)

STAGES = ("stage", "submit", "await", "fetch", "archive")
# Redis broker priority per stage (0 is served first): finish started documents before starting new ones.
STAGE_PRIORITY = {"archive": 0, "fetch": 1, "await": 2, "submit": 3, "stage": 4}


def already_final(job: Job) -> bool:
    """The job's record says it ended and the archive agrees (the archive is the truth)."""
    state = jobs.read(get_runtime().redis, job.job_id).get("state")
    return state in ("done", "failed") and storage.finished(job.provider, job.job_id) is not None


def work_prefix(job: Job) -> str:
    """Where ``fetch`` leaves what ``archive`` commits (in the staging bucket)."""
    return f"_work/{job.provider}/{job.job_id}/"


# --- stage ---------------------------------------------------------------------------------


def stage(job: Job) -> Job:
    """Learn what the document really is and refuse it here, before any provider request."""
    bucket, key = storage.parse_s3_uri(job.location)
    found = storage.read_head(bucket, key, sniff.HEAD_BYTES)
    if found is None:
        raise BadInput(f"{job.label()}: the document is not in s3://{bucket}/{key}", code="not_found")
    head, meta = found
    size = int(meta["size"])
    if size == 0:
        raise BadInput(f"{job.label()}: the document is empty (0 bytes)", code="empty")
    fmt = sniff.sniff_format(head)
    if fmt is None:
        raise BadInput(
            f"{job.label()}: the bytes are not a PDF, OFD or image we know (starts with {head[:8]!r})",
            code="unsupported_format",
        )
    width = height = None
    tail = head[-1024:] if size <= len(head) else None  # a small document was read whole already
    if fmt == "pdf" and not sniff.pdf_looks_complete(tail if tail is not None else storage.read_range(bucket, key, -1024, 0)):
        raise BadInput(f"{job.label()}: the PDF is corrupt or truncated (no %%EOF at its end)", code="corrupt")
    if fmt in sniff.IMAGE_FORMATS:
        dims = sniff.image_size(head)
        if dims is None and size > len(head):
            dims = sniff.image_size(storage.read_range(bucket, key, 0, 4 * 1024 * 1024 - 1))
        if dims is None:
            raise BadInput(f"{job.label()}: the {fmt} image header is corrupt", code="corrupt")
        width, height = dims
    document = DocumentInfo(
        bucket=bucket,
        key=key,
        filename=key.rsplit("/", 1)[-1],
        size=size,
        format=fmt,
        etag=meta["etag"],
        width=width,
        height=height,
    )
    get_provider(job.provider).check(document, job)
    # Where the bytes are, for the receiver's document links (they never name the bucket).
    jobs.record(
        get_runtime().redis,
        job.job_id,
        state="staged",
        stage="stage",
        doc_bucket=bucket,
        doc_key=key,
        doc_etag=document.etag,
        doc_format=fmt,
    )
    return job.model_copy(update={"document": document})


# --- submit --------------------------------------------------------------------------------


def submit(job: Job) -> Job:
    """Send the document once: a re-delivered submit finds the task id already recorded.

    Where the provider limits tasks in flight, the provider takes a lease right before its
    request (``Provider.take_slot``) with a short TTL, so a worker that dies before sending
    frees it within seconds. The moment the raw answer names a task, its id is recorded and
    only then the lease lengthened to the document's deadline: the provider has the task from
    that moment, so a Redis blip in between must not look like a free slot, and anything that
    fails afterwards (an answer that does not verify or validate) fails the document with the
    task id instead of sending it again. A refusal frees the slot at once.
    """
    rt = get_runtime()
    provider = get_provider(job.provider)
    limit = provider.max_in_flight()
    deadline = float(job.options.get("deadline", rt.settings.job_deadline))
    record = jobs.read(rt.redis, job.job_id)
    if record.get("provider_task_id"):
        log.info("%s: already accepted as %s; not submitting again", job.label(), record["provider_task_id"])
        if limit:  # lengthen the lease if it is still held; never bring back a released one
            rt.leases.extend(provider.lease_key(), job.job_id, deadline, only_if_held=True)
        return job.model_copy(
            update={"provider_task_id": record["provider_task_id"], "submitted_at": float(record.get("submitted_at") or time.time())}
        )
    # One submit at a time per job, even if two chains run for it (two ingests of one prefix).
    guard = f"docpipe:submitting:{job.job_id}"
    if not rt.redis.set(guard, "1", nx=True, ex=int(rt.settings.http_timeout * 2 + rt.settings.lease_max_wait)):
        raise RateWait(guard, 2.0)
    acceptance: dict[str, float | str] = {}

    def accepted(task_id: str) -> None:
        acceptance.update(task_id=task_id, at=time.time())
        _remember_acceptance(job, task_id, float(acceptance["at"]))
        if limit:
            rt.leases.extend(provider.lease_key(), job.job_id, deadline)

    try:
        task_id = provider.submit(job, accepted)
    except Exception as exc:
        rt.redis.delete(guard)
        if acceptance:
            # The provider has the task: fail the document with its id, keep the slot until the provider is done.
            raise Permanent(
                f"{job.label()}: the provider accepted task {acceptance['task_id']} but its answer is unusable "
                f"({_reason(exc)}); not sending the document again",
                code="accepted_answer_invalid",
            ) from None
        # An answer (even an error) means the provider did not take the task: free the slot now.
        # A timeout may hide an accepted task, so that lease is left to expire with its grace.
        if limit and getattr(exc, "code", None) != "timeout":
            rt.leases.release(provider.lease_key(), job.job_id)
        raise
    if not acceptance:  # a provider module that returned without reporting the acceptance
        accepted(task_id)
    rt.redis.delete(guard)
    return job.model_copy(update={"provider_task_id": task_id, "submitted_at": float(acceptance["at"]), "polls": 0})


def _reason(exc: BaseException) -> str:
    """What went wrong, in words that quote no input (a pydantic error's text would quote the answer)."""
    if isinstance(exc, DocpipeError):
        return exc.message
    if isinstance(exc, ValidationError):
        return "unexpected answer shape at " + ", ".join(".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)[:3])
    return type(exc).__name__


def _remember_acceptance(job: Job, task_id: str, submitted_at: float, patience: float = 120.0) -> None:
    """Record the provider's task id, insisting: the provider has accepted (and bills) the task,
    so losing its id to a Redis blip would submit the document a second time on retry."""
    rt = get_runtime()
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            jobs.record(rt.redis, job.job_id, state="submitted", stage="submit", provider_task_id=task_id, submitted_at=submitted_at)
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: accepted as %s but Redis is unreachable; retrying the record", job.label(), task_id)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# --- await ---------------------------------------------------------------------------------


def poll_policy(provider_name: str, job: Job) -> PollPolicy:
    s = get_settings()
    first = job.options.get("first_poll_delay", s.poll_first_delay)
    if first is None:
        first = get_provider(provider_name).first_poll_delay
    return PollPolicy(
        first_delay=float(first),
        base_delay=s.poll_base_delay,
        multiplier=s.poll_multiplier,
        max_delay=s.poll_max_delay,
        deadline=float(job.options.get("deadline", s.job_deadline)),
    )


def await_result(job: Job) -> tuple[Job, float | None]:
    """Poll once if it is time; return the job and the seconds until the next poll (None: done)."""
    policy = poll_policy(job.provider, job)
    submitted_at = job.submitted_at or time.time()
    now = time.time()
    if job.polls == 0 and now < submitted_at + policy.first_delay:
        return job, submitted_at + policy.first_delay - now
    if policy.expired(submitted_at, now):
        last = f", last status {job.provider_status}" if job.provider_status else ""
        raise DeadlineExceeded(
            f"{job.label()}: the provider has not finished {policy.deadline:.0f}s after submit "
            f"(task {job.provider_task_id}, {job.polls} polls{last})",
            code="deadline_exceeded",
            provider_code=job.provider_status,
        )
    try:
        outcome = get_provider(job.provider).poll(job)
    except RateWait as wait:
        # The result endpoint is busy: come back after the token we were told of, spread over
        # up to one poll interval so that the refused polls do not all race for the same one.
        return job, wait.delay + random.uniform(0.0, policy.next_delay(max(job.polls, 1)))
    status = None if outcome.status is None else str(outcome.status)
    job = job.model_copy(update={"polls": job.polls + 1, "provider_status": status or job.provider_status})
    if not outcome.done:
        log.debug("%s: poll %d: %s", job.label(), job.polls, outcome.detail)
        return job, policy.next_delay(job.polls)
    if outcome.error is not None:
        raise outcome.error
    return job, None


# --- fetch ---------------------------------------------------------------------------------


def fetch(job: Job) -> Job:
    """Get the full result and park it, with its raw payload and artifacts, in the work area."""
    fetched = get_provider(job.provider).fetch(job)
    result = fetched.result.model_copy(update={"artifacts": sorted(fetched.artifacts)})
    if job.submitted_at:
        result.submitted_at = datetime.fromtimestamp(job.submitted_at, timezone.utc)
    client = storage.s3_client()
    bucket = get_settings().staging_bucket
    prefix = work_prefix(job)
    for name, data in fetched.artifacts.items():
        client.put_object(Bucket=bucket, Key=prefix + name, Body=data)
    client.put_object(Bucket=bucket, Key=prefix + "raw.json", Body=json.dumps(fetched.raw, ensure_ascii=False).encode())
    client.put_object(Bucket=bucket, Key=prefix + "result.json", Body=result.model_dump_json(indent=2).encode())
    jobs.record(get_runtime().redis, job.job_id, state="fetched", stage="fetch")
    return job


# --- archive -------------------------------------------------------------------------------


def archive(job: Job) -> Job:
    """Copy the work area into the archive; ``result.json`` goes last and only if absent."""
    rt = get_runtime()
    settings = get_settings()
    final = storage.finished(job.provider, job.job_id)
    if final is None:
        client = storage.s3_client()
        src_prefix = work_prefix(job)
        dst_prefix = storage.archive_prefix(job.provider, job.job_id)
        names = [o["Key"][len(src_prefix) :] for o in storage.list_objects(settings.staging_bucket, src_prefix)]
        if "result.json" not in names:
            raise DocpipeError(f"{job.label()}: nothing fetched to archive", code="work_area_missing")
        for name in sorted(n for n in names if n != "result.json"):
            client.copy_object(
                Bucket=settings.results_bucket,
                Key=dst_prefix + name,
                CopySource={"Bucket": settings.staging_bucket, "Key": src_prefix + name},
            )
        body = storage.read_object(settings.staging_bucket, src_prefix + "result.json")
        if storage.put_bytes(dst_prefix + "result.json", body, "application/json", only_if_absent=True):
            final = "result.json"
        else:
            final = storage.finished(job.provider, job.job_id)
            log.info("%s: archive already committed by another delivery", job.label())
        for name in names:
            client.delete_object(Bucket=settings.staging_bucket, Key=src_prefix + name)
    jobs.record(rt.redis, job.job_id, state="done" if final == "result.json" else "failed", stage="archive")
    get_provider(job.provider).finished(job)
    return job


# --- failure -------------------------------------------------------------------------------


def fail(job: Job, stage_name: str, exc: BaseException) -> JobError:
    """End a document with an explanation in ``error.json``, unless it already has a result."""
    if isinstance(exc, DocpipeError):
        code, message, retryable = exc.code, exc.message, exc.retryable
        provider_code = None if exc.provider_code is None else str(exc.provider_code)
        provider_message = exc.provider_message
    elif isinstance(exc, ValidationError):  # never its str(): that quotes the input, which may hold a token
        code, message, retryable = "malformed_answer", f"{job.label()}: {_reason(exc)}", True
        provider_code = provider_message = None
    else:
        code, message, retryable = "internal", f"{job.label()}: {type(exc).__name__}: {exc}", True
        provider_code = provider_message = None
    rt = get_runtime()
    task_id = job.provider_task_id or jobs.read(rt.redis, job.job_id).get("provider_task_id")
    error = JobError(
        job_id=job.job_id,
        provider=job.provider,
        source=job.source,
        stage=stage_name,  # type: ignore[arg-type]
        code=code,
        message=message,
        retryable=retryable,
        provider_code=provider_code,
        provider_message=provider_message,
        provider_task_id=task_id,
    )
    prefix = storage.archive_prefix(job.provider, job.job_id)
    final = storage.finished(job.provider, job.job_id)
    if final is None:
        storage.put_json(prefix + "error.json", error.model_dump(mode="json"), only_if_absent=True)
    jobs.record(
        rt.redis,
        job.job_id,
        state="done" if final == "result.json" else "failed",
        stage=stage_name,
        error=message,
    )
    if task_id is None:
        # Nothing runs at the provider. A task that does keeps its slot until its callback
        # comes or its lease expires: the provider still counts it.
        get_provider(job.provider).finished(job)
    return error
