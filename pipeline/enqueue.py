"""Programmatic use: ``enqueue(source, provider=...)`` returns a handle to wait on.

A local file is streamed into the staging bucket here, on the caller's machine, because
the workers may run anywhere; an ``s3://`` source is read where it is. The job id is
derived from provider, source, content and options, so enqueueing the same document
twice is one job, and a document already archived is not sent again. ``enqueue_many``
does the same for a batch, several documents at a time: each one costs a few S3 and Redis
round trips, and done one after another they, not the providers, would pace a big batch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from botocore.exceptions import ClientError
from kombu.exceptions import KombuError

from pipeline import jobs, sniff, stages, storage
from pipeline.errors import BadInput
from pipeline.models import Job, JobError, NormalizedResult, document_label
from pipeline.providers import provider_class
from pipeline.runtime import get_runtime


class DocumentFailedError(RuntimeError):
    """Raised by ``JobHandle.wait`` when the document ended with an ``error.json``."""

    def __init__(self, error: JobError) -> None:
        super().__init__(f"{document_label(error.provider, error.job_id, error.source)} failed at {error.stage}: {error.message}")
        self.error = error


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    provider: str
    source: str
    skipped: bool = False  # already archived when enqueued: nothing was sent

    @property
    def archive_uri(self) -> str:
        return storage.archive_uri(self.provider, self.job_id)

    def state(self) -> str | None:
        """``queued``/``staged``/``submitted``/``fetched``/``done``/``failed``, from the Redis record."""
        return jobs.read(get_runtime().redis, self.job_id).get("state")

    def wait(self, timeout: float = 600.0, interval: float = 0.25) -> NormalizedResult:
        """Block until the document is archived; return its result or raise ``DocumentFailedError``."""
        deadline = time.monotonic() + timeout
        checks = 0
        while True:
            state = self.state()
            # The Redis record is the cheap signal; the archive is the truth (and survives a Redis
            # restart). A record that says how it ended names the file to read: no listing first.
            named = {"done": "result.json", "failed": "error.json"}.get(state or "")
            final = self._read_final(named) if named else None
            if final is None and (named or (state is None and checks == 0) or checks % 20 == 19):
                final = storage.finished(self.provider, self.job_id)
                final = self._read_final(final) if final else None
            if isinstance(final, NormalizedResult):
                return final
            if isinstance(final, JobError):
                raise DocumentFailedError(final)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{document_label(self.provider, self.job_id, self.source)} not finished after {timeout:.0f}s (state {state})")
            checks += 1
            time.sleep(interval)

    def _read_final(self, name: str) -> NormalizedResult | JobError | None:
        """The archive's final file ``name`` (``result.json`` or ``error.json``); None when it is not there."""
        raw = storage.read_if_present(storage.get_settings().results_bucket, storage.archive_prefix(self.provider, self.job_id) + name)
        if raw is None:
            return None
        body = json.loads(raw)
        return NormalizedResult.model_validate(body) if name == "result.json" else JobError.model_validate(body)


def prepare(source: str | Path, provider: str, options: dict[str, Any] | None = None) -> tuple[Job, Path | None]:
    """Make the job for a source: its id and where the workers will read its bytes.

    Returns the local file still to be staged there too (None for an ``s3://`` source):
    it is uploaded only once we know the document must be sent, so re-running a batch
    that is already archived costs one request per document and no upload.
    """
    provider_class(provider)  # unknown provider: fail here, not in a worker
    options = dict(options or {})
    source_str = str(source)
    if source_str.startswith("s3://"):
        bucket, key = storage.parse_s3_uri(source_str)
        meta = storage.head(bucket, key)
        if meta is None:
            raise FileNotFoundError(f"{source_str}: no such object")
        content_id = str(meta.get("ETag", "")).strip('"')
        job_id = jobs.make_job_id(provider, source_str, content_id, options)
        job = Job(job_id=job_id, provider=provider, source=source_str, location=source_str, options=options, source_etag=content_id or None)
        return job, None
    path = Path(source_str).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    job_id = jobs.make_job_id(provider, str(path), storage.sha256_file(path), options)
    staging = get_runtime().settings.staging_bucket
    location = f"s3://{staging}/{provider}/{job_id}/{path.name}"
    return Job(job_id=job_id, provider=provider, source=str(path), location=location, options=options), path


def stage_local_file(job: Job, path: Path) -> Job:
    """Upload a local file to its staging key. A small one is read once and measured from the bytes
    that went up (``Job.document``, pinned to the ETag S3 gave them), so that its stage step need
    not read them back; a large one goes up in parts and is measured by its stage step.

    Only a document that passes is measured here: one that does not is left to the stage step,
    which reads it from S3 and says why in the document's ``error.json``, as for any source.
    """
    bucket, key = storage.parse_s3_uri(job.location)
    if path.stat().st_size >= storage.multipart_threshold():
        storage.upload_file(path, bucket, key)
        return job
    data = path.read_bytes()
    etag = storage.put_small(bucket, key, data)

    def read_range(start: int, end: int) -> bytes:
        return data[start:] if start < 0 else data[start : end + 1]

    try:
        document = stages.describe(job, bucket, key, data[: sniff.HEAD_BYTES], len(data), etag, read_range)
    except BadInput:
        return job
    return job.model_copy(update={"document": document})


def publish_first(job: Job, msg: str) -> None:
    """Send the job's first message (``stage``) on its provider's queue."""
    from workers.tasks import publish  # the Celery app is only needed to send; keep pipeline importable without it

    publish("stage", job.model_dump(mode="json"), msg, 0.0)


def enqueue(
    source: str | Path,
    provider: str = "baidu",
    options: dict[str, Any] | None = None,
    *,
    retry_failed: bool = False,
    batch: str = "",
) -> JobHandle:
    """Send one document down its provider's steps; return a handle whose ``wait()`` gives the result.

    Already archived: nothing is sent and the handle answers at once. With ``retry_failed``
    a document whose archive holds an ``error.json`` is sent again. A document whose steps
    are still running is not sent twice: the handle follows the running job.
    """
    job, local_file = prepare(source, provider, options)
    rt = get_runtime()
    final = storage.finished(provider, job.job_id)
    if final == "result.json" or (final == "error.json" and not retry_failed):
        if batch:
            reason = ""
            if final == "error.json":
                reason = JobError.model_validate(storage.get_json(storage.archive_prefix(provider, job.job_id) + final)).reason()
            rt.ledger.join(job.job_id, batch, state="done" if final == "result.json" else "failed", reason=reason, skipped=True)
        return JobHandle(job.job_id, provider, job.source, skipped=True)
    if local_file is not None:
        # The key is derived from the content, so a copy left by an earlier attempt holds the same bytes.
        job = stage_local_file(job, local_file)
    msg = str(uuid.uuid4())
    payload = job.model_dump(mode="json")
    started = rt.ledger.start(
        job.job_id, msg, "stage", payload, force=final == "error.json", batch=batch, provider=provider, source=job.source,
        options=json.dumps(job.options, sort_keys=True),
    )
    if not started:
        return JobHandle(job.job_id, provider, job.source)  # its steps are still running: one chain per job
    if final == "error.json":
        storage.s3_client().delete_object(
            Bucket=rt.settings.results_bucket, Key=storage.archive_prefix(provider, job.job_id) + "error.json"
        )
    try:
        publish_first(job, msg)
    except Exception:
        rt.ledger.abandon(job.job_id, msg)  # not sent: leave no record that would pass for a running job
        raise
    return JobHandle(job.job_id, provider, job.source)


# What one document can raise without saying anything about the others: its own problems, and
# a broker or Redis that refused this one publish (the next document may well get through).
DOCUMENT_ERRORS = (OSError, ValueError, ClientError, KombuError, redis.RedisError)


@dataclass(frozen=True)
class Enqueued:
    """One source of a batch: its handle, or why it was not sent (``source`` names the document, ``error`` the reason)."""

    source: str
    handle: JobHandle | None = None
    error: str | None = None


def enqueue_many(
    sources: Iterable[str | Path],
    provider: str = "baidu",
    options: dict[str, Any] | None = None,
    *,
    retry_failed: bool = False,
    concurrency: int = 8,
    batch: str = "",
) -> Iterator[Enqueued]:
    """Enqueue a batch ``concurrency`` documents at a time; yield one ``Enqueued`` per source, in order.

    A document that cannot be read or staged is reported and the others go on. Sources
    are consumed lazily and at most a few times ``concurrency`` are in the air, so a
    listing of a million keys never becomes a million futures.
    """
    provider_class(provider)  # an unknown provider fails once, here, not once per document
    get_runtime()  # built once before the threads share it
    window: deque[tuple[str, Future[JobHandle]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="enqueue") as pool:
        for source in sources:
            window.append((str(source), pool.submit(enqueue, source, provider, options, retry_failed=retry_failed, batch=batch)))
            if len(window) >= 4 * concurrency:
                yield _outcome(*window.popleft())
        while window:
            yield _outcome(*window.popleft())


# Documents of a listing enqueued per round trip: one dispatch message carries their first
# messages (about 100 KB).
LISTED_CHUNK = 250
# How a chunk rides out a Redis (and broker) that refuses it: sent again this many times, after
# these pauses (about 15 s in all), before its documents are reported as not enqueued.
CHUNK_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def enqueue_listed(
    listed: Iterable[tuple[str, str | None]], provider: str = "baidu", options: dict[str, Any] | None = None, *, batch: str = ""
) -> Iterator[Enqueued]:
    """Enqueue the objects of an S3 listing, ``(s3 URI, ETag)`` pairs, a chunk at a time.

    One by one, a document costs a HEAD, a LIST of its archive, a Lua start and a publish, and
    a listing enqueued at about 120 documents/s (``bench.listing``). Here a chunk costs no S3
    request, one Redis pipeline of starts and one ``dispatch`` message, which a worker fans out
    into the documents' first steps. The listing's ETag pins the version instead of a HEAD; a
    job Redis remembers as finished (its record lives a week) is skipped by its start script;
    whether the archive holds a document Redis has no record of is asked by its stage step
    (``Job.archive_checked``): one LIST by a worker instead of by the listing. So Redis, not
    the archive, answers "already done" here for a week: a document whose archive was deleted
    to have it processed again is sent with ``docpipe submit`` (one by one, archive first).
    A pair without an ETag goes the one-by-one way.
    """
    provider_class(provider)
    options = dict(options or {})
    chunk: list[tuple[str, str]] = []
    for source, etag in listed:
        if not etag or not source.startswith("s3://"):
            yield from enqueue_many([source], provider, options, batch=batch)
            continue
        chunk.append((source, etag))
        if len(chunk) >= LISTED_CHUNK:
            yield from _enqueue_chunk(chunk, provider, options, batch)
            chunk = []
    if chunk:
        yield from _enqueue_chunk(chunk, provider, options, batch)


def _enqueue_chunk(chunk: list[tuple[str, str]], provider: str, options: dict[str, Any], batch: str) -> list[Enqueued]:
    rt = get_runtime()
    listed = [
        Job(
            job_id=jobs.make_job_id(provider, source, etag, options),
            provider=provider,
            source=source,
            location=source,
            options=options,
            source_etag=etag,
            archive_checked=False,
        )
        for source, etag in chunk
    ]
    msgs = {job.job_id: str(uuid.uuid4()) for job in listed}
    payloads = {job.job_id: job.model_dump(mode="json") for job in listed}
    fields = {"provider": provider, "options": json.dumps(options, sort_keys=True)}
    starts = [(job.job_id, msgs[job.job_id], "stage", payloads[job.job_id], {**fields, "source": job.source}) for job in listed]
    # The starts are sent again, whole, while Redis refuses some: with the same message ids each
    # job answers as it did (its own start again is 1), so a lost answer costs nothing.
    answers: list[int | Exception] = []
    for delay in (*CHUNK_RETRY_DELAYS, None):
        try:
            answers = rt.ledger.start_many(starts, batch=batch)
        except DOCUMENT_ERRORS as exc:
            answers = [exc] * len(starts)
        if delay is None or not any(isinstance(answer, Exception) for answer in answers):
            break
        time.sleep(delay)
    started = [job for job, answer in zip(listed, answers) if answer == 1]
    unsent = _dispatch(provider, [(payloads[job.job_id], msgs[job.job_id]) for job in started])
    if unsent is not None:
        answers = [unsent if answer == 1 and _abandoned(job.job_id, msgs[job.job_id]) else answer for job, answer in zip(listed, answers)]
    return [
        Enqueued(job.source, error=f"not enqueued: {type(answer).__name__}: {answer}")
        if isinstance(answer, Exception)
        else Enqueued(job.source, handle=JobHandle(job.job_id, provider, job.source, skipped=answer == 2))
        for job, answer in zip(listed, answers)
    ]


def _dispatch(provider: str, firsts: list[tuple[dict[str, Any], str]]) -> Exception | None:
    """Publish the chunk's first steps, again while the broker refuses (a copy that did get
    through is fenced by its message id); the last error when it never did."""
    if not firsts:
        return None
    error: Exception | None = None
    for delay in (*CHUNK_RETRY_DELAYS, None):
        try:
            publish_dispatch(provider, firsts)
            return None
        except DOCUMENT_ERRORS as exc:
            error = exc
        if delay is not None:
            time.sleep(delay)
    return error


def _abandoned(job_id: str, msg: str) -> bool:
    """Undo a start whose first step could not be published. False when the job runs all the
    same (a publish that got through though it reported an error, and a worker took it) or
    when Redis refuses the undo too: the record stays, and the reconciler gives the job its
    first step once it is overdue."""
    try:
        return get_runtime().ledger.abandon(job_id, msg)
    except DOCUMENT_ERRORS:
        return False


def publish_dispatch(provider: str, firsts: list[tuple[dict[str, Any], str]]) -> None:
    """Send one message carrying the first steps of many jobs: (payload, message id) each."""
    from workers.tasks import publish_dispatch as publish

    publish(provider, firsts)


def _outcome(source: str, future: Future[JobHandle]) -> Enqueued:
    try:
        return Enqueued(source, handle=future.result())
    except DOCUMENT_ERRORS as exc:
        return Enqueued(source, error=str(exc))
