"""The Celery application: ``celery -A workers worker -Q docpipe.baidu -P threads`` starts a worker."""

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_init, worker_shutdown

from workers.events import EventsFlushedOffTheLoop

# Workers run thread pools of I/O-bound tasks. Between a rate token granted by Redis and the
# request leaving the socket, a thread may wait for the GIL; at the default 5 ms switch
# interval several busy threads can stretch that to tens of ms, which eats the limiter's
# margin against the provider's clock. 1 ms keeps the hand-off short.
sys.setswitchinterval(0.001)

app = Celery("docpipe", include=["workers.tasks"])
app.config_from_object("celeryconfig")
app.steps["consumer"].add(EventsFlushedOffTheLoop)
log = logging.getLogger(__name__)
_background: list[Any] = []


@worker_init.connect
def _start(sender: Any = None, **_: Any) -> None:
    """Build clients and keys before the first task, then beat a heartbeat and run the reconciler.

    One heartbeat and one reconciler per worker process (docpipe runs thread pools; the
    reconcilers of all workers take turns under a Redis lock).
    """
    from pipeline.liveness import Heartbeat
    from pipeline.reconcile import Reconciler, ReconcilerThread
    from pipeline.runtime import get_runtime
    from pipeline.warmup import warm_up
    from workers.tasks import publish_redriven

    # A thread pool's threads, plus the heartbeat and the reconciler that start below.
    warm_up(threads=int(getattr(sender, "concurrency", 0) or 1) + 2)
    rt = get_runtime()
    if rt.settings.metrics_port:
        from pipeline.metrics import serve_worker_metrics

        serve_worker_metrics(rt.settings.metrics_port)
    s = rt.settings
    _background.append(Heartbeat(rt.redis, every=s.heartbeat_every, ttl=s.heartbeat_ttl).start())
    reconciler = Reconciler(rt.redis, rt.ledger, publish_redriven, backlog_grace=s.backlog_grace)
    # After a Redis error, a heartbeat's lifetime passes before silence counts as death.
    _background.append(ReconcilerThread(rt.redis, reconciler, every=s.reconcile_every, quiet_after_error=s.heartbeat_ttl + s.heartbeat_every).start())


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """Celery sets up its own handlers: give them docpipe's format (``DOCPIPE_LOG_FORMAT``) and the
    step fields (job id, provider, stage) on every line."""
    from pipeline import logs
    from pipeline.config import get_settings

    logs.configure(get_settings().log_format, logger)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    """A clean stop: the running tasks have finished; the heartbeat goes at once, so that the
    reconciler hands the messages this worker still held (waiting for their countdown) to
    others within seconds."""
    for thread in reversed(_background):
        thread.stop()
