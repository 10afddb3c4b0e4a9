"""Run one step of a job: claim it, run its stage, then hand the job to its next message or end it.

docpipe links a document's steps itself instead of leaving it to a Celery chain. A chain
publishes its next task after the task body has returned, outside the task: when that publish
fails (Redis refusing writes, a broker blip) Celery records a failure and acknowledges the
message, and the document is gone without a trace. Here the next message is published before
the step returns, and a publish that fails is retried for as long as it fails, so the step's
own message stays unacknowledged (and comes back if this worker dies) until its successor
exists. Retries, polls and waits for a rate token are next messages like any other; a next
stage that is due at once is run by the same step instead (``run_inline``).

Every step first claims the job (``JobLedger.claim``): a stale or duplicate message does
nothing, so no step runs twice at once or after the job moved on. Nothing here needs Celery:
``publish`` is given by the caller.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline import jobs, logs, metrics, stages
from pipeline.config import get_settings
from pipeline.errors import AuthExpired, Cancelled, DocpipeError, RateLimited, RateWait, Transient, is_outage
from pipeline.models import Job
from pipeline.runtime import get_runtime

log = logging.getLogger(__name__)

T = TypeVar("T")
Publish = Callable[[str, dict[str, Any], str, float], None]  # (step, payload, message id, countdown)

# Failures worth retrying the same step for; others end the document (error.json says
# whether re-running the whole document could help).
RETRY_IN_PLACE = (Transient, RateLimited, AuthExpired)
StageFn = Callable[[Job], tuple[Job, float | None]]


def _once(fn: Callable[[Job], Job]) -> StageFn:
    return lambda job: (fn(job), None)


STAGE_FUNCTIONS: dict[str, StageFn] = {
    "stage": _once(stages.stage),
    "submit": _once(stages.submit),
    "await": stages.await_result,
    "fetch": _once(stages.fetch),
    "archive": _once(stages.archive),
}
FOLLOWING = dict(zip(stages.STAGES, stages.STAGES[1:]))


@dataclass(frozen=True)
class Next:
    """The job's next message: which step, with what job, how many seconds from now."""

    stage: str
    job: Job
    countdown: float = 0.0


def backoff(attempt: int, cap: float = 60.0) -> float:
    return min(cap, 2.0**attempt) * random.uniform(0.5, 1.0)


def through_outage(action: Callable[[], T], what: str) -> T:
    """Run ``action`` until Redis, the broker and S3 let it: an outage delays, it never loses the step."""
    attempt = 0
    while True:
        try:
            return action()
        except Exception as exc:
            if not is_outage(exc):
                raise
            attempt += 1
            delay = backoff(attempt, cap=15.0)
            log.warning("%s: %s (%s); again in %.1fs", what, type(exc).__name__, str(exc)[:120], delay)
            time.sleep(delay)


def run_step(stage_name: str, payload: dict[str, Any], msg: str, *, publish: Publish, holder: str) -> str:
    """Claim, run, hand on. Returns what happened, for logs and Flower: ``stale``/``busy``/``running``
    for a message dropped, else the stages run and their end (``stage+submit+await: next await``)."""
    job = Job.model_validate(payload)
    ledger = get_runtime().ledger
    token = uuid.uuid4().hex  # the same for every retry of this claim
    verdict = through_outage(lambda: ledger.claim(job.job_id, msg, holder, token), f"{job.label()}: claim")
    metrics.STEPS.labels(job.provider, stage_name, verdict).inc()
    if verdict != "ok":
        log.info("%s: %s message %s for %s dropped", job.label(), verdict, msg, stage_name)
        if verdict != "running":  # the thread running it keeps its held entry
            through_outage(lambda: ledger.release(job.job_id, msg, holder), f"{job.label()}: drop")
        return verdict
    claimed = jobs.claimed_msg.set(msg)
    try:
        return _run_claimed(stage_name, job, msg, publish=publish, holder=holder)
    except BaseException:
        try:
            ledger.unclaim(job.job_id, msg, holder)
        except Exception:  # noqa: BLE001 - Redis away: the reconciler finds the step by its stall time
            log.warning("%s: could not give back the claim of %s", job.label(), stage_name)
        raise
    finally:
        jobs.claimed_msg.reset(claimed)


def dispatch(firsts: list[tuple[dict[str, Any], str]], *, publish: Publish) -> int:
    """Publish the first step of each job a listing enqueued: (payload, message id) each.

    Not fenced and need not be: each message id is the one its job's record names, so a copy
    published twice (this message delivered again after a worker died midway) is claimed once
    and dropped as stale or busy the other time. A dispatch lost altogether leaves records
    whose message never comes: the reconciler re-drives them once they are overdue and their
    lane is empty or was read past them.

    They are due from now, not from their start: the dispatch message may have waited its turn
    for minutes, and until now nothing could read them from their lane."""
    ledger = get_runtime().ledger
    through_outage(lambda: ledger.resent([(payload["job_id"], msg) for payload, msg in firsts]), f"dispatch of {len(firsts)}")
    for payload, msg in firsts:
        through_outage(lambda: publish("stage", payload, msg, 0.0), f"dispatch {msg}")  # noqa: B023 - called at once
    return len(firsts)


def _run_claimed(stage_name: str, job: Job, msg: str, *, publish: Publish, holder: str) -> str:
    ledger = get_runtime().ledger
    ran, step = run_inline(stage_name, job)
    done = "+".join(ran)
    if step is None:
        through_outage(lambda: ledger.finish(job.job_id, msg, holder), f"{job.label()}: finish")
        return f"{done}: ended"
    next_msg = str(uuid.uuid4())
    countdown = min(max(0.0, step.countdown), get_settings().visibility_timeout / 3)  # a longer wait re-schedules again
    body = step.job.model_dump(mode="json")
    handed = through_outage(
        lambda: ledger.advance(job.job_id, msg, next_msg, step.stage, body, time.time() + countdown, holder),
        f"{job.label()}: hand on",
    )
    if not handed:
        log.info("%s: the job moved on while %s ran; %s not published", job.label(), done, step.stage)
        return f"{done}: stale"
    through_outage(lambda: publish(step.stage, body, next_msg, countdown), f"{job.label()}: publish {step.stage}")
    return f"{done}: next {step.stage}"


def run_inline(stage_name: str, job: Job) -> tuple[list[str], Next | None]:
    """Run the stage, and each following stage that is due at once, in this thread under the
    claim already held; the stages run and what comes next (None: the document ended).

    A step whose successor is due now used to publish it and return: the successor then cost
    a broker message, a claim, a hand-on and a validation of its job, for work the same
    thread could do at once (bench.overhead: five messages and some 157 Redis commands per
    document). Only forward moves run inline (stage, submit, the first look of await, fetch,
    archive), so it ends within the five stages; a retry, a wait for a token or a poll
    later is published as before.

    Nothing is handed on between the inline stages, so a worker that dies midway leaves the
    job with the message it claimed: that message comes back and runs the same stages
    again, each of which is idempotent (stage measures; submit reuses the task id its record
    names or its ``sending_at`` settles; a poll looks; fetch parks; archive commits once).
    """
    ran = [stage_name]
    with logs.step_context(job.job_id, job.provider, stage_name):
        step = execute(stage_name, job)
    while step is not None and _runs_inline(ran[-1], step):
        ran.append(step.stage)
        with logs.step_context(job.job_id, job.provider, step.stage):
            through_outage(lambda: get_runtime().ledger.running(job.job_id, ran[-1]), f"{job.label()}: note {ran[-1]}")
            step = execute(step.stage, step.job)
    return ran, step


def _runs_inline(current: str, step: Next) -> bool:
    return step.countdown <= 0 and stages.STAGES.index(step.stage) > stages.STAGES.index(current)


def execute(stage_name: str, job: Job) -> Next | None:
    """Run the stage; say what comes next, or None when the document has ended (archived or failed)."""
    with metrics.timed_stage(job.provider, stage_name) as outcome:
        step = _execute(stage_name, job)
        outcome["outcome"] = "ended" if step is None else ("next" if step.stage != stage_name else "again")
    return step


def _execute(stage_name: str, job: Job) -> Next | None:
    settings = get_settings()
    try:
        job, delay = STAGE_FUNCTIONS[stage_name](job)
    except Cancelled as stopped:  # cancelled, or superseded by another message: no archive, no error
        log.info("%s: %s at %s", job.label(), stopped.code, stage_name)
        return None
    except RateWait as wait:
        if wait.turn:  # queued: the turns are spread already, and a late return wastes the slot
            return Next(stage_name, job.model_copy(update={"rate_turn": wait.turn}), wait.delay)
        # Spread the re-tries: waking every refused task at the same instant only refuses them again.
        return Next(stage_name, job, wait.delay + (random.uniform(0.0, 0.5) if wait.spread else 0.0))
    except DocpipeError as exc:
        if exc.provider_code is not None:
            metrics.PROVIDER_ERRORS.labels(job.provider, stage_name, str(exc.provider_code)).inc()
        if isinstance(exc, RETRY_IN_PLACE) and job.attempts < _retry_cap(exc, settings.transient_retries, stage_name):
            retried = job.model_copy(update={"attempts": job.attempts + 1})
            countdown = (
                exc.retry_after * random.uniform(1.0, 1.5) if isinstance(exc, RateLimited) else backoff(job.attempts, cap=settings.retry_max_delay)
            )
            log.warning("%s: %s at %s; retry %d in %.1fs", job.label(), exc.code, stage_name, retried.attempts, countdown)
            return Next(stage_name, retried, countdown)
        return _end(job, stage_name, exc)
    except Exception as exc:
        if is_outage(exc):  # not the document's fault: wait it out, without counting an attempt
            log.warning("%s: %s at %s (%s); the step waits", job.label(), type(exc).__name__, stage_name, str(exc)[:120])
            return Next(stage_name, job, backoff(3, cap=30.0))
        if job.attempts < settings.transient_retries:  # a bug or a failure we did not foresee: retry, then explain
            log.exception("%s: unexpected error at %s", job.label(), stage_name)
            return Next(stage_name, job.model_copy(update={"attempts": job.attempts + 1}), backoff(job.attempts, cap=settings.retry_max_delay))
        return _end(job, stage_name, exc)
    job = job.model_copy(update={"attempts": 0})  # the stage made progress: its failures start again
    if delay is not None:
        return Next(stage_name, job, delay)
    following = FOLLOWING.get(stage_name)
    if following == "fetch" and job.parked:  # the poll that saw it done carried the result
        following = "archive"
    return None if following is None else Next(following, job)


def _retry_cap(exc: DocpipeError, transient_retries: int, stage_name: str) -> int:
    if isinstance(exc, RateLimited):  # a provider's "too fast" is expected under shared accounts
        return transient_retries * 10
    if stage_name in ("await", "fetch") and exc.code != "malformed_answer":
        # The provider holds the task, billed: a failed look at it costs nothing, and giving up
        # throws the task away. A bad patch of errors is waited out longer (the job's deadline
        # still ends it): with a third of the answers failing, six failed looks in a row ended a
        # document. An answer of the wrong shape is not an outage: it is the same answer next
        # time, and the document's error should say so within minutes, not after eighteen tries.
        return transient_retries * 3
    return transient_retries


def _end(job: Job, stage_name: str, exc: BaseException) -> None:
    error = through_outage(lambda: stages.fail(job, stage_name, exc), f"{job.label()}: record its failure")
    log.warning("%s: failed at %s: %s", job.label(), stage_name, error.message)
    return None
