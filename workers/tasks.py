"""Thin Celery tasks: ``docpipe.<provider>.<stage>`` for every provider and stage.

Each task turns the JSON job into a ``Job``, calls the stage function from
``pipeline.stages`` and decides only what Celery must: re-schedule (a rate token or a
poll that is not due yet, a transient failure), or end the document with ``error.json``
and stop the chain. Names carry provider and stage so that Flower shows both.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from pipeline import stages
from pipeline.config import get_settings
from pipeline.errors import AuthExpired, DocpipeError, RateLimited, RateWait, Transient
from pipeline.models import Job
from pipeline.providers import provider_names
from workers.app import app

log = logging.getLogger(__name__)

# Failures worth retrying the same stage for; others end the document (error.json says
# whether re-running the whole document could help).
RETRY_IN_PLACE = (Transient, RateLimited, AuthExpired)

StageFn = Callable[[Job], tuple[Job, float | None]]


class DocumentFailed(Exception):
    """The document ended with an ``error.json``; raising it stops the rest of the chain."""


def _once(fn: Callable[[Job], Job]) -> StageFn:
    return lambda job: (fn(job), None)


STAGE_FUNCTIONS: dict[str, StageFn] = {
    "stage": _once(stages.stage),
    "submit": _once(stages.submit),
    "await": stages.await_result,
    "fetch": _once(stages.fetch),
    "archive": _once(stages.archive),
}


def _backoff(attempt: int) -> float:
    return min(60.0, 2.0**attempt) * random.uniform(0.5, 1.0)


def run_stage(task: Task, stage_name: str, payload: dict[str, Any]) -> dict[str, Any]:
    job = Job.model_validate(payload)
    settings = get_settings()
    if stage_name != "archive" and stages.already_final(job):
        # A duplicate delivery (late ack after a crash, or a second chain): the archive is final.
        raise Ignore()

    def again(next_job: Job, countdown: float) -> Exception:
        # Capped so the message comes back before Redis' visibility timeout would re-deliver it.
        countdown = min(max(0.0, countdown), settings.visibility_timeout / 3)
        return task.retry(
            args=(next_job.model_dump(mode="json"),),
            countdown=countdown,
            max_retries=None,
            priority=stages.STAGE_PRIORITY[stage_name],
        )

    try:
        job, delay = STAGE_FUNCTIONS[stage_name](job)
    except RateWait as wait:
        # Spread the re-tries: waking every refused task at the same instant only refuses them again.
        raise again(job, wait.delay + random.uniform(0.0, 0.5)) from None
    except DocpipeError as exc:
        if isinstance(exc, RETRY_IN_PLACE) and job.attempts < _retry_cap(exc, settings.transient_retries):
            retried = job.model_copy(update={"attempts": job.attempts + 1})
            countdown = exc.retry_after * random.uniform(1.0, 1.5) if isinstance(exc, RateLimited) else _backoff(job.attempts)
            log.warning("%s: %s at %s; retry %d in %.1fs", job.label(), exc.code, stage_name, retried.attempts, countdown)
            raise again(retried, countdown) from None
        return _end(task, job, stage_name, exc)
    except Exception as exc:  # a bug or an outage we did not foresee: retry, then explain
        if job.attempts < settings.transient_retries:
            log.exception("%s: unexpected error at %s", job.label(), stage_name)
            raise again(job.model_copy(update={"attempts": job.attempts + 1}), _backoff(job.attempts)) from None
        return _end(task, job, stage_name, exc)
    job = job.model_copy(update={"attempts": 0})  # the stage made progress: its failures start again
    if delay is not None:
        raise again(job, delay)
    return job.model_dump(mode="json")


def _retry_cap(exc: DocpipeError, transient_retries: int) -> int:
    # A provider's "too fast" is expected under shared accounts: allow many more of those.
    return transient_retries * 10 if isinstance(exc, RateLimited) else transient_retries


def _end(task: Task, job: Job, stage_name: str, exc: BaseException) -> dict[str, Any]:
    try:
        error = stages.fail(job, stage_name, exc)
    except Exception:  # S3 or Redis is down: the explanation must land, so try again later
        log.exception("%s: could not record its failure at %s; retrying", job.label(), stage_name)
        raise task.retry(countdown=_backoff(min(job.attempts, 5)), max_retries=None) from None
    log.warning("%s: failed at %s: %s", job.label(), stage_name, error.message)
    raise DocumentFailed(f"failed at {stage_name} ({error.code}): {error.message}")


def _make_task(provider: str, stage_name: str) -> Task:
    def run(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_stage(self, stage_name, payload)

    run.__name__ = f"{provider}_{stage_name}"
    run.__doc__ = f"{stage_name} for {provider} documents (see pipeline.stages)."
    return app.task(
        name=f"docpipe.{provider}.{stage_name}",
        bind=True,
        max_retries=None,
        acks_late=True,
        throws=(DocumentFailed,),
    )(run)


TASKS = {
    (provider, stage_name): _make_task(provider, stage_name)
    for provider in provider_names()
    for stage_name in stages.STAGES
}
