"""Thin Celery tasks: ``docpipe.<provider>.<stage>`` for every provider and stage.

Each task hands its JSON job and its own message id to ``pipeline.driver.run_step``, which
claims the job, runs the stage and publishes the job's next message through ``publish``
before the task returns (so its message is acknowledged only once its successor exists).
Names carry provider and stage so that Flower shows both.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from pipeline import driver, jobs, stages
from pipeline.liveness import holder_id
from pipeline.models import document_label
from pipeline.providers import provider_names
from workers.app import app


def publish(step: str, payload: dict[str, Any], msg: str, countdown: float, *, redriven: bool = False) -> None:
    """Send a job's next message: the step's task on the provider's queue, later stages first."""
    provider = payload["provider"]
    priority = stages.priority(step, redriven=redriven)
    app.send_task(
        f"docpipe.{provider}.{step}",
        args=(payload,),
        task_id=msg,
        queue=f"docpipe.{provider}",
        priority=priority,
        countdown=countdown or None,
        headers=jobs.sent_headers(provider, priority),
        **_shown_as(document_label(provider, payload["job_id"], payload.get("source", ""))),
    )


def _shown_as(label: str) -> dict[str, str]:
    """How a message's arguments show in Flower and the workers' logs: the document's label.

    Left to Celery, each publish walked the whole job with ``saferepr`` to show it (1.6 ms of
    the enqueuer's 12 ms per document under cProfile, and as much in every step's publish),
    and Flower showed a dict cut off at 1024 characters."""
    return {"argsrepr": repr((label,)), "kwargsrepr": "{}"}


def publish_redriven(step: str, payload: dict[str, Any], msg: str, countdown: float) -> None:
    """What the reconciler publishes: ahead of the fresh messages of the same stage."""
    publish(step, payload, msg, countdown, redriven=True)


def publish_dispatch(provider: str, firsts: list[tuple[dict[str, Any], str]]) -> None:
    """Send the first steps of many jobs as one message (``pipeline.enqueue.enqueue_listed``)."""
    priority = stages.priority("stage")  # the lane of the first steps it carries
    app.send_task(
        f"docpipe.{provider}.dispatch",
        args=(firsts,),
        queue=f"docpipe.{provider}",
        priority=priority,
        headers=jobs.sent_headers(provider, priority),
        **_shown_as(f"{len(firsts)} {provider} documents from a listing"),
    )


def _make_dispatch(provider: str) -> Task:
    def run(self: Task, firsts: list[tuple[dict[str, Any], str]]) -> int:
        return driver.dispatch(firsts, publish=publish)

    run.__name__ = f"{provider}_dispatch"
    run.__doc__ = f"Publishes the first steps of {provider} documents enqueued from a listing (see pipeline.driver.dispatch)."
    return app.task(name=f"docpipe.{provider}.dispatch", bind=True, acks_late=True)(run)


def _make_task(provider: str, stage_name: str) -> Task:
    def run(self: Task, payload: dict[str, Any]) -> str:
        return driver.run_step(stage_name, payload, self.request.id, publish=publish, holder=holder_id())

    run.__name__ = f"{provider}_{stage_name}"
    run.__doc__ = f"{stage_name} for {provider} documents (see pipeline.stages)."
    return app.task(name=f"docpipe.{provider}.{stage_name}", bind=True, acks_late=True)(run)


TASKS = {
    (provider, stage_name): _make_task(provider, stage_name)
    for provider in provider_names()
    for stage_name in stages.STAGES
}
DISPATCH = {provider: _make_dispatch(provider) for provider in provider_names()}
