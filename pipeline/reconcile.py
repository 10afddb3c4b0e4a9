"""The reconciler: finds every job whose record stopped moving and re-drives it from its last recorded step.

A job stops moving when the one message that may move it is gone or stuck:
- its holder died (killed worker): the messages it had received are named in its held set,
  and its heartbeat is gone;
- it was never delivered (a publish Redis acknowledged and then lost, a message popped while
  Redis refused to record it as unacked): it is past its due time by ``grace``, nobody claimed
  it, and its provider's queue is empty (with a backlog it may just be waiting its turn; it
  is re-driven anyway once it is late by ``backlog_grace``);
- its step has run for longer than ``stall`` under a live holder (a thread stuck for good).

Re-driving gives the job's recorded step and payload to a new message id (``JobLedger.redrive``),
so the old message, should it come back, is stale and does nothing. Every worker runs this
every few seconds under a Redis lock (one at a time); ``docpipe reconcile`` runs it once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.jobs import ACTIVE, HELD_PREFIX, WORKER_PREFIX, JobLedger, key

log = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any], str, float], None]  # (step, payload, message id, countdown)
LOCK = "docpipe:reconciler"


@dataclass
class Reconciled:
    """What one pass did: (job id, reason) per job re-driven."""

    redriven: list[tuple[str, str]] = field(default_factory=list)

    def count(self, reason: str) -> int:
        return sum(1 for _, why in self.redriven if why == reason)


def queue_backlog(client: redis.Redis, provider: str) -> int:
    """Messages waiting in a provider's queue, over all its priority lists (kombu names them ``queue:N``)."""
    name = f"docpipe.{provider}"
    pipe = client.pipeline(transaction=False)
    pipe.llen(name)
    for priority in range(1, 10):
        pipe.llen(f"{name}:{priority}")
    return sum(pipe.execute())


class Reconciler:
    def __init__(self, client: redis.Redis, ledger: JobLedger, publish: Publish, *, backlog_grace: float = 600.0) -> None:
        self._redis = client
        self._ledger = ledger
        self._publish = publish
        self._backlog_grace = backlog_grace

    def run_once(self) -> Reconciled:
        done = Reconciled()
        self._dead_holders(done)
        self._overdue(done)
        return done

    def _redrive(self, job_id: str, msg: str, reason: str, done: Reconciled) -> None:
        new_msg = str(uuid.uuid4())
        handed = self._ledger.redrive(job_id, msg, new_msg)
        if handed is None:
            return  # the job moved on meanwhile
        step, payload = handed
        self._publish(step, payload, new_msg, 0.0)
        done.redriven.append((job_id, reason))
        log.warning("job %s re-driven at %s (%s)", job_id, step, reason)

    def _dead_holders(self, done: Reconciled) -> None:
        for held in self._redis.scan_iter(f"{HELD_PREFIX}*", count=100):
            holder = held.decode()[len(HELD_PREFIX) :]
            if self._redis.exists(f"{WORKER_PREFIX}{holder}"):
                continue
            for member in self._redis.smembers(held):
                job_id, _, msg = member.decode().partition(" ")
                self._redrive(job_id, msg, "worker died", done)
            self._redis.delete(held)

    def _overdue(self, done: Reconciled, batch: int = 500) -> None:
        now = time.time()
        backlog: dict[str, int] = {}
        for raw_id, _ in self._redis.zrangebyscore(ACTIVE, "-inf", now, start=0, num=batch, withscores=True):
            job_id = raw_id.decode()
            msg, holder, claimed_at, due, provider = (
                v.decode() if v else "" for v in self._redis.hmget(key(job_id), "msg", "holder", "claimed_at", "due", "provider")
            )
            if not msg:
                self._redis.zrem(ACTIVE, job_id)  # finished, or its record is gone
            elif holder:
                if not self._redis.exists(f"{WORKER_PREFIX}{holder}"):
                    self._redrive(job_id, msg, "worker died", done)
                elif now - float(claimed_at or now) > self._ledger.stall:
                    self._redrive(job_id, msg, "step stuck", done)
            else:
                if provider not in backlog:
                    backlog[provider] = queue_backlog(self._redis, provider)
                late = now - float(due or now)
                if backlog[provider] == 0 or late > self._backlog_grace:
                    self._redrive(job_id, msg, "message lost", done)


class ReconcilerThread:
    """Runs ``Reconciler.run_once`` every ``every`` seconds in a daemon thread, one process at a time.

    After a pass that met a Redis error, dead-holder detection waits a heartbeat's lifetime:
    while Redis refused writes no heartbeat could be written, and live workers must have
    beaten again before their silence is taken for death.
    """

    def __init__(self, client: redis.Redis, reconciler: Reconciler, *, every: float = 5.0, quiet_after_error: float = 20.0) -> None:
        self._redis = client
        self._reconciler = reconciler
        self._every = every
        self._quiet = quiet_after_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="docpipe-reconciler", daemon=True)
        self._resume_at = 0.0

    def start(self) -> ReconcilerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._every + 1)

    def _run(self) -> None:
        token = str(uuid.uuid4())
        while not self._stop.wait(self._every):
            if time.monotonic() < self._resume_at:
                continue
            try:
                if not self._redis.set(LOCK, token, nx=True, px=int(self._every * 2000)):
                    continue
                try:
                    self._reconciler.run_once()
                finally:
                    if self._redis.get(LOCK) == token.encode():
                        self._redis.delete(LOCK)
            except Exception as exc:  # noqa: BLE001 - an outage must not end the thread; the next pass retries
                log.warning("reconciler pass failed (%s: %s)", type(exc).__name__, exc)
                self._resume_at = time.monotonic() + self._quiet
