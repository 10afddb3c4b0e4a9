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
import mimetypes
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from pipeline import jobs, liveness, sniff, storage
from pipeline.config import get_settings
from pipeline.errors import AlreadyArchived, BadInput, Cancelled, DeadlineExceeded, DocpipeError, Permanent, RateWait, Superseded, is_outage
from pipeline.models import DocumentInfo, Job, JobError
from pipeline.polling import LearnedSchedule, Lateness, Observation, PollPolicy, observed_processing
from pipeline.providers import get_provider
from pipeline.providers.base import Download, Fetched
from pipeline.runtime import get_runtime
from pipeline.submission import Submission

log = logging.getLogger(__name__)

STAGES = ("stage", "submit", "await", "fetch", "archive")
# Redis broker priority per stage (0 is served first): finish started documents before starting new ones.
# Every other level is left free: a step re-driven after a fault (a killed worker's, one found
# stalled) goes one level ahead of the fresh messages of its stage, so the documents a fault
# delayed are not also queued behind the whole backlog.
STAGE_PRIORITY = {"archive": 0, "fetch": 2, "await": 4, "submit": 6, "stage": 8}


def priority(step: str, *, redriven: bool = False) -> int:
    return max(0, STAGE_PRIORITY[step] - (1 if redriven else 0))


def work_key(job: Job) -> str:
    """Where ``fetch`` leaves a large normalized result for ``archive`` to commit (in the staging bucket)."""
    return f"_work/{job.provider}/{job.job_id}/result.json"


# A normalized result up to this size waits for ``archive`` in Redis, not in the work area: it
# waits there seconds, and the work area cost three S3 requests (PUT, GET, DELETE) of the
# thirteen each document took (bench.overhead), where S3 was the bound. Larger ones, rare
# (whole pages of text), go to S3 as before, so Redis never holds much of them.
PARK_IN_REDIS_MAX = 64 * 1024
PARKED_TTL = 24 * 3600  # a backstop: archive deletes it


def parked_key(job: Job) -> str:
    return f"docpipe:parked:{job.job_id}"


# --- stage ---------------------------------------------------------------------------------


def stage(job: Job) -> Job:
    """Learn what the document really is and refuse it here, before any provider request.

    A local file's enqueuer measured the bytes it uploaded (``Job.document``, pinned to the
    ETag S3 gave them): that is not read again. Anything else is read from S3 here.
    """
    if not job.archive_checked:
        _end_if_archived(job)
    document = job.document or _measure(job)
    get_provider(job.provider).check(document, job)
    # Where the bytes are, for the receiver's document links (they never name the bucket).
    jobs.record(
        get_runtime().redis,
        job.job_id,
        state="staged",
        stage="stage",
        doc_bucket=document.bucket,
        doc_key=document.key,
        doc_etag=document.etag,
        doc_format=document.format,
    )
    return job.model_copy(update={"document": document})


def _measure(job: Job) -> DocumentInfo:
    bucket, key = storage.parse_s3_uri(job.location)
    try:
        found = storage.read_head(bucket, key, sniff.HEAD_BYTES, etag=job.source_etag)
    except storage.SourceChanged:
        raise BadInput(
            f"{job.label()}: s3://{bucket}/{key} was replaced after it was enqueued; enqueue it again to process the new version",
            code="source_changed",
        ) from None
    if found is None:
        raise BadInput(f"{job.label()}: the document is not in s3://{bucket}/{key} (deleted after it was listed?)", code="not_found")
    head, meta = found
    etag = meta["etag"]
    return describe(job, bucket, key, head, int(meta["size"]), etag, lambda start, end: storage.read_range(bucket, key, start, end, etag))


def describe(
    job: Job, bucket: str, key: str, head: bytes, size: int, etag: str | None, read_range: Callable[[int, int], bytes]
) -> DocumentInfo:
    """What the bytes are, from their first ``sniff.HEAD_BYTES`` (``head``), their size, and the
    ranges ``read_range(start, end)`` gives (``storage.read_range``'s); ``BadInput`` naming the
    document when they are not a document a provider takes."""
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
    if fmt == "pdf" and not sniff.pdf_looks_complete(tail if tail is not None else read_range(-1024, 0)):
        raise BadInput(f"{job.label()}: the PDF is corrupt or truncated (no %%EOF at its end)", code="corrupt")
    if fmt in sniff.IMAGE_FORMATS:
        dims = sniff.image_size(head)
        if dims is None and size > len(head):
            dims = sniff.image_size(read_range(0, 4 * 1024 * 1024 - 1))
        if dims is None:
            raise BadInput(f"{job.label()}: the {fmt} image header is corrupt", code="corrupt")
        width, height = dims
    return DocumentInfo(bucket=bucket, key=key, filename=key.rsplit("/", 1)[-1], size=size, format=fmt, etag=etag, width=width, height=height)


def _end_if_archived(job: Job) -> None:
    """The look-up ``enqueue`` makes one document at a time, made here for a document enqueued
    from a listing (``enqueue_listed``): a worker's one LIST instead of the listing's."""
    final = storage.finished(job.provider, job.job_id)
    if final is None:
        return
    fields: dict[str, Any] = {"state": "done", "stage": "archive"}
    if final == "error.json":
        fields = failure_fields(JobError.model_validate(storage.get_json(storage.archive_prefix(job.provider, job.job_id) + final)))
    jobs.record(get_runtime().redis, job.job_id, skipped=1, **fields)
    raise AlreadyArchived(f"{job.label()}: already archived ({final}); not sent again")


def failure_fields(error: JobError) -> dict[str, Any]:
    """What a failed job's record says of its ``error.json``: where, why, and whether to retry."""
    return {"state": "failed", "stage": error.stage, "error": error.message, "reason": error.reason(), "retryable": int(error.retryable)}


# --- submit --------------------------------------------------------------------------------


# Seconds between two looks for a live callback receiver, for a callback provider's submit.
RECEIVER_WAIT = 5.0


def submit(job: Job) -> Job:
    """Send the document once (see ``pipeline.submission`` for how an attempt is recorded).

    A task id already recorded (an earlier attempt, or a callback that named it) is reused. A
    request that left without an answer makes the outcome unknown: the provider module says
    what is known (``Provider.unknown_outcome``), and by default the document fails rather
    than be billed twice. An accepted task whose answer is unusable fails the document with
    its task id, its slot kept until the provider is done with it.
    """
    rt = get_runtime()
    provider = get_provider(job.provider)
    record = jobs.read(rt.redis, job.job_id)
    task_id = record.get("provider_task_id")
    if not task_id and record.get("sending_at"):
        task_id = provider.unknown_outcome(job, float(record["sending_at"]))
    if task_id:
        log.info("%s: already accepted as %s; not submitting again", job.label(), task_id)
        submitted_at = float(record.get("submitted_at") or record.get("sending_at") or time.time())
        jobs.record(rt.redis, job.job_id, state="submitted", stage="submit", provider_task_id=task_id, submitted_at=submitted_at)
        return job.model_copy(update={"provider_task_id": task_id, "submitted_at": submitted_at})
    if provider.uses_callbacks and not liveness.receiver_alive(rt.redis):
        # Sent now, its result would be posted to nobody: after the provider's retries the task
        # would end as callback_missing. It waits for a receiver instead.
        log.info("%s: no callback receiver is alive; the submit waits for one", job.label())
        raise RateWait(f"{provider.name}:receiver", RECEIVER_WAIT)
    attempt = Submission(job, provider, rt)
    try:
        task_id = provider.submit(job, attempt)
    except Superseded:
        raise  # nothing sent; the record, its marker and the slot belong to the message that holds the job now
    except Cancelled:
        attempt.refused()  # nothing sent: the slot goes back
        raise
    except Exception as exc:
        if attempt.task_id is not None:
            if is_outage(exc):
                raise  # Redis or S3 away after the task id was recorded: the step runs again and goes on from it
            raise Permanent(
                f"{job.label()}: the provider accepted task {attempt.task_id} but its answer is unusable "
                f"({_reason(exc)}); not sending the document again",
                code="accepted_answer_invalid",
            ) from None
        if attempt.outcome_unknown:
            attempt.hold_slot()  # it may be running at the provider; the next attempt decides
        else:
            attempt.refused()
        raise
    if attempt.task_id is None:  # a provider module that returned without reporting the acceptance
        attempt.accepted(task_id)
    return job.model_copy(update={"provider_task_id": task_id, "submitted_at": attempt.accepted_at, "polls": 0, "rate_turn": None})


def _reason(exc: BaseException) -> str:
    """What went wrong, in words that quote no input (a pydantic error's text would quote the answer)."""
    if isinstance(exc, DocpipeError):
        return exc.message
    if isinstance(exc, ValidationError):
        return "unexpected answer shape at " + ", ".join(".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)[:3])
    return type(exc).__name__


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


# A document waiting for its first poll under the backoff ladder (nothing learnt yet) looks again
# this often whether a schedule has been learnt meanwhile (no provider call, a message to itself).
RELEARN_EVERY = 5.0
# Two polls of one document never closer than this, whatever the schedule says.
MIN_POLL_GAP = 0.25


def learned_schedule(job: Job) -> tuple[LearnedSchedule, float] | None:
    """The adaptive schedule for this job's provider and the job's predicted processing time, or
    None while too little has been seen (or the policy is ``backoff``)."""
    s = get_settings()
    if s.poll_policy != "adaptive" or job.options.get("first_poll_delay") is not None:
        return None
    schedule = get_runtime().processing.schedule(job.provider, budget=s.poll_call_budget, min_samples=s.poll_learn_after)
    if schedule is None:
        return None
    document = job.document
    predicted = schedule.predict(document.size if document else None, document.pages if document else None)
    return None if predicted is None else (schedule, predicted)


LATENESS = Lateness()


def await_result(job: Job) -> tuple[Job, float | None]:
    """Poll once if it is time; return the job and the seconds until the next poll (None: done)."""
    policy = poll_policy(job.provider, job)
    submitted_at = job.submitted_at or time.time()
    now = time.time()
    if job.poll_asked_for is not None:
        LATENESS.observe(now - job.poll_asked_for)
    provider = get_provider(job.provider)
    learned = learned_schedule(job)
    overdue = provider.overdue_at(job) if learned is not None else None  # read once: it may cost a Redis read
    # A callback provider's poll is a Redis lookup, and the receiver wakes this step when the
    # result comes (``callbacks.wake``): it looks at once; the schedule only spaces the looks.
    if not provider.uses_callbacks:
        early = _not_yet(job, policy, learned, overdue, submitted_at, now)
        if early is not None:
            return early
    if policy.expired(submitted_at, now):
        last = f", last status {job.provider_status}" if job.provider_status else ""
        raise DeadlineExceeded(
            f"{job.label()}: the provider has not finished {policy.deadline:.0f}s after submit "
            f"(task {job.provider_task_id}, {job.polls} polls{last})",
            code="deadline_exceeded",
            provider_code=job.provider_status,
        )
    try:
        outcome = provider.poll(job)
    except RateWait as wait:
        # The result endpoint is busy: come back after the token we were told of, spread a little
        # so that the refused polls do not all race for the same one.
        return _again_at(job, now + wait.delay + random.uniform(0.0, min(0.5, policy.next_delay(max(job.polls, 1)))), now)
    status = None if outcome.status is None else str(outcome.status)
    job = job.model_copy(update={"polls": job.polls + 1, "provider_status": status or job.provider_status})
    if not outcome.done:
        log.debug("%s: poll %d: %s", job.label(), job.polls, outcome.detail)
        job = job.model_copy(update={"last_polled_at": now})
        if learned is not None:
            schedule, predicted = learned
            due = _no_later_than(overdue, max(submitted_at + schedule.poll_at(job.polls, predicted), now + MIN_POLL_GAP))
            return _again_at(job, min(due - LATENESS.typical(), now + policy.max_delay), time.time())
        return _again_at(job, time.time() + policy.next_delay(job.polls), time.time())
    if outcome.error is not None:
        raise outcome.error
    _learn(job, submitted_at, outcome.reported)
    if outcome.answer is not None:  # the answer is the result: parse and park it now, no second call
        try:
            job = _park(job, provider.fetch(job, outcome.answer)).model_copy(update={"parked": True})
        except RateWait:
            # An artifact waits for its token (idp's highlight export, 2/s). Re-run, this step
            # polled again for an answer it had: 1.76 result calls per idp document where the
            # polls were 1.31. The answer is kept as the archive's raw.json, which it becomes
            # anyway, and fetch reads it from there.
            _put_raw(job, outcome.answer)
            job = job.model_copy(update={"answer_kept": True})
    return job.model_copy(update={"poll_asked_for": None}), None


def _no_later_than(overdue: float | None, due: float) -> float:
    """The learnt schedule spaces the looks at a document further apart the longer it takes (poll
    k at predicted x growth^k): a tuputech document whose callback never came was looked at again
    hundreds of seconds after its bound (28 s) had passed, and ended that late. ``overdue`` is the
    provider's ``overdue_at``."""
    return due if overdue is None else min(due, overdue + MIN_POLL_GAP)


def _not_yet(
    job: Job, policy: PollPolicy, learned: tuple[LearnedSchedule, float] | None, overdue: float | None, submitted_at: float, now: float
) -> tuple[Job, float | None] | None:
    """The step again later, when the schedule says the next poll is not due yet; None to poll now."""
    if learned is not None:
        schedule, predicted = learned
        due = _no_later_than(overdue, submitted_at + schedule.poll_at(job.polls, predicted))
        if job.last_polled_at is not None:
            due = max(due, job.last_polled_at + MIN_POLL_GAP)
        ask = due - LATENESS.typical()
        return _again_at(job, ask, now) if now < ask else None
    if job.polls == 0 and now < submitted_at + _cold_first_delay(policy, job):
        return _again_at(job, now + min(submitted_at + _cold_first_delay(policy, job) - now, RELEARN_EVERY), now)
    return None


def _cold_first_delay(policy: PollPolicy, job: Job) -> float:
    """The first poll while nothing is learnt. The provider's advice (baidu: 30 s) is written for a
    client that never learns; the adaptive policy, which needs processing times to learn from,
    probes from the ladder's base delay instead (a few calls more, once per deployment). A first
    delay set by the job or the settings is kept as given."""
    s = get_settings()
    advised = job.options.get("first_poll_delay") is None and s.poll_first_delay is None
    if s.poll_policy == "adaptive" and advised:
        return min(policy.first_delay, policy.base_delay)
    return policy.first_delay


def _again_at(job: Job, at: float, now: float) -> tuple[Job, float]:
    """Poll again at ``at``, remembering when that was asked for."""
    at = max(at, now)
    return job.model_copy(update={"poll_asked_for": at}), at - now


def _learn(job: Job, submitted_at: float, reported: tuple[float, float] | None) -> None:
    """Teach the adaptive schedule how long this document took (a Redis blip only costs the lesson)."""
    seconds, uncertainty = observed_processing(submitted_at, job.last_polled_at, time.time(), reported)
    document = job.document
    size, pages = (document.size, document.pages) if document else (None, None)
    try:
        get_runtime().processing.observe(job.provider, Observation(seconds, size, pages, uncertainty))
    except Exception as exc:  # noqa: BLE001 - the poll's news matters more than the statistics
        log.info("%s: processing time not recorded (%s)", job.label(), type(exc).__name__)


# --- fetch ---------------------------------------------------------------------------------


def fetch(job: Job) -> Job:
    """Get the full result and park it, with its raw payload and artifacts, in the work area
    (done already when the poll that saw the task finish carried the result)."""
    if job.parked:
        return job
    answer = storage.get_json(storage.archive_prefix(job.provider, job.job_id) + "raw.json") if job.answer_kept else None
    return _park(job, get_provider(job.provider).fetch(job, answer))


def _park(job: Job, fetched: Fetched) -> Job:
    """The raw payload and the artifacts go straight to their archive keys: they are written the
    same by any delivery of this step, and no reader counts a document archived until its
    ``result.json`` is there. The result itself waits in the work area for ``archive``."""
    result = fetched.result.model_copy(update={"artifacts": sorted(fetched.artifacts)})
    if job.submitted_at:
        result.submitted_at = datetime.fromtimestamp(job.submitted_at, timezone.utc)
    prefix = storage.archive_prefix(job.provider, job.job_id)
    for name, artifact in fetched.artifacts.items():
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if isinstance(artifact, Download):
            with artifact.open() as body:
                storage.put_stream(prefix + name, body, content_type)
        else:
            storage.put_bytes(prefix + name, artifact, content_type)
    _put_raw(job, fetched.raw)
    body = result.model_dump_json(indent=2).encode()
    rt = get_runtime()
    if len(body) <= PARK_IN_REDIS_MAX:
        rt.redis.set(parked_key(job), body, ex=PARKED_TTL)
    else:
        storage.s3_client().put_object(Bucket=get_settings().staging_bucket, Key=work_key(job), Body=body)
    jobs.record(rt.redis, job.job_id, state="fetched", stage="fetch")
    return job


def _put_raw(job: Job, raw: Any) -> None:
    key = storage.archive_prefix(job.provider, job.job_id) + "raw.json"
    storage.put_bytes(key, json.dumps(raw, ensure_ascii=False).encode(), "application/json")


# --- archive -------------------------------------------------------------------------------


def archive(job: Job) -> Job:
    """Commit the parked result: ``result.json`` is written last and only if absent, so a second
    delivery, or a document that failed meanwhile, never gets a second or a different final file.

    Two S3 requests for a result parked in Redis: which final file exists (one LIST) and the
    commit (conditional PUT); a large one parked in the work area adds its GET and DELETE.
    Copying a work area of raw payload and artifacts took a LIST and a copy and a delete per file
    besides. A parked result that is nowhere (Redis lost it) is fetched again: the provider's
    result costs a call, not a second bill."""
    rt = get_runtime()
    settings = get_settings()
    final = storage.finished(job.provider, job.job_id)
    in_s3 = True  # a committed archive's work area is cleaned up whatever parked it: a cut-off run may have left it
    if final is None:
        body, in_s3 = _parked(job)
        if body is None:
            log.warning("%s: the fetched result is gone from Redis and the work area; fetching it again", job.label())
            fetch(job.model_copy(update={"parked": False}))
            body, in_s3 = _parked(job)
        if body is None:
            raise DocpipeError(f"{job.label()}: nothing fetched to archive", code="work_area_missing")
        if storage.put_bytes(storage.archive_prefix(job.provider, job.job_id) + "result.json", body, "application/json", only_if_absent=True):
            final = "result.json"
        else:
            final = storage.finished(job.provider, job.job_id)
            log.info("%s: archive already committed by another delivery", job.label())
    rt.redis.delete(parked_key(job))
    if in_s3:
        storage.s3_client().delete_object(Bucket=settings.staging_bucket, Key=work_key(job))
    jobs.record(rt.redis, job.job_id, state="done" if final == "result.json" else "failed", stage="archive")
    get_provider(job.provider).finished(job)
    return job


def _parked(job: Job) -> tuple[bytes | None, bool]:
    """The result ``fetch`` parked, and whether it was looked for in the work area (S3)."""
    body = get_runtime().redis.get(parked_key(job))
    if body is not None:
        return body, False
    return storage.read_if_present(get_settings().staging_bucket, work_key(job)), True


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
    jobs.record(rt.redis, job.job_id, **{**failure_fields(error), "state": "done" if final == "result.json" else "failed"})
    if task_id is None:
        # Nothing runs at the provider. A task that does keeps its slot until its callback
        # comes or its lease expires: the provider still counts it.
        get_provider(job.provider).finished(job)
    return error
