"""The Celery application: ``celery -A workers worker -Q docpipe.baidu`` starts a worker."""

import sys

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

# Workers run thread pools of I/O-bound tasks. Between a rate token granted by Redis and the
# request leaving the socket, a thread may wait for the GIL; at the default 5 ms switch
# interval several busy threads can stretch that to tens of ms, which eats the limiter's
# margin against the provider's clock. 1 ms keeps the hand-off short.
sys.setswitchinterval(0.001)

app = Celery("docpipe", include=["workers.tasks"])
app.config_from_object("celeryconfig")


@worker_init.connect
@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Build clients and keys before the first task (threads pool: the worker; prefork: each child)."""
    from pipeline.warmup import warm_up

    warm_up()
