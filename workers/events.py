"""Task events (what Flower shows) published from a thread of their own, not from the worker's event loop.

Celery buffers task events and flushes the buffer from the consumer's event loop right after
each one: a blocking publish to Redis per received message. The loop is also where messages
are received, so with Redis 20 ms away it spent a third of its time publishing events, and
the worker's threads waited for work (baidu's submits fell to 0.6 of the limit). Here the
loop only buffers; a daemon thread publishes the buffer every ``every`` seconds, one message
for all the events of that moment. Flower sees each task at most that much later.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)


class EventsFlushedOffTheLoop(bootsteps.StartStopStep):
    """A consumer step after Celery's ``Events``: runs again each time the consumer reconnects
    (and Celery builds a new dispatcher)."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c: Any, every: float = 0.25, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.every = every
        self._stop: threading.Event | None = None

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None or not c.hub:
            return  # no buffering without the event loop: Celery publishes each event as it comes
        dispatcher.on_send_buffered = None
        self._stop = stop = threading.Event()
        threading.Thread(target=self._run, args=(c, stop), name="docpipe-events", daemon=True).start()

    def _run(self, c: Any, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            self._flush(c)

    def _flush(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None:
            return
        try:
            dispatcher.flush()
        except Exception as exc:  # noqa: BLE001 - the buffer stays; the next flush sends it
            log.debug("task events not published yet (%s)", type(exc).__name__)

    def stop(self, c: Any) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self._flush(c)

    shutdown = stop
