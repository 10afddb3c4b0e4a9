"""The Celery application: ``celery -A workers worker -Q docpipe.baidu -P threads`` starts a worker."""

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_init, worker_shutdown

# Workers run thread pools of I/O-bound tasks. Between a rate token granted by Redis and the
# request leaving the socket, a thread may wait for the GIL; at the default 5 ms switch
# interval several busy threads can stretch that to tens of ms, which eats the limiter's
# margin against the provider's clock. 1 ms keeps the hand-off short.
sys.setswitchinterval(0.001)

app = Celery("docpipe", include=["workers.tasks"])
app.config_from_object("celeryconfig")
log = logging.getLogger(__name__)
_background: list[Any] = []


@worker_init.connect
def _start(**_: Any) -> None:
    """Build clients and keys before the first task, then beat a heartbeat and run the reconciler.

    One heartbeat and one reconciler per worker process (docpipe runs thread pools; the
    reconcilers of all workers take turns under a Redis lock).
    """
    from pipeline.liveness import Heartbeat
    from pipeline.reconcile import Reconciler, ReconcilerThread
    from pipeline.runtime import get_runtime
    from pipeline.warmup import warm_up
    from workers.tasks import publish

    warm_up()
    rt = get_runtime()
    _background.append(Heartbeat(rt.redis).start())
    reconciler = Reconciler(rt.redis, rt.ledger, publish, backlog_grace=rt.settings.backlog_grace)
    _background.append(ReconcilerThread(rt.redis, reconciler, every=rt.settings.reconcile_every).start())


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    """A clean stop hands nothing over: Celery puts back the messages it holds, which stay valid."""
    for thread in reversed(_background):
        thread.stop()


@task_received.connect
def _held(request: Any = None, **_: Any) -> None:
    """Note each message this worker receives, countdown ones included: if the worker dies
    holding them, the reconciler re-drives them within seconds instead of the broker after its
    visibility timeout."""
    from pipeline.liveness import hold
    from pipeline.runtime import get_runtime

    try:
        payload = request.args[0]
        hold(get_runtime().redis, payload["job_id"], request.id)
    except Exception as exc:  # noqa: BLE001 - never refuse a message over bookkeeping; the overdue scan still covers it
        log.warning("could not note a received message (%s)", type(exc).__name__)
