"""The reconciler: finds every job whose record stopped moving and re-drives it from its last recorded step.

A job stops moving when the one message that may move it is gone or stuck:
- its holder died (killed worker): the messages it had received are named in its held set,
  and its heartbeat is gone;
- it was never delivered (a publish Redis acknowledged and then lost, a message popped while
  Redis refused to record it as unacked, a reserved message a worker dropped when its broker
  connection did): it is past its due time by ``grace``, nobody claimed it, and its lane (its
  provider's queue at its priority: one Redis list, first in first out) is empty or was read
  past it: a worker received a message of the lane sent more than ``grace`` after this one was
  due (``jobs.RECEIVED``). A worker's held set does not say it will still run a message: a
  worker whose connection to Redis dropped forgets the messages it had reserved;
- its step has run for longer than ``stall`` under a live holder (a thread stuck for good).

A message waiting its turn behind a backlog is not lost however long it waits: a batch of a
million documents at a provider's two per second waits for days, and taking its messages for
lost after some minutes re-published every one of them again and again (a volume run re-drove
490 in one pass). It is looked at again later instead, less often the longer it has waited
(after ``grace``, then twice its wait, up to ``backlog_grace``), so that the waiting ones do
not fill every pass ahead of the jobs that did stop.

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

from pipeline import stages
from pipeline.jobs import ACTIVE, HELD_PREFIX, HOLDERS, RECEIVED, WORKER_PREFIX, JobLedger, held_key, key, lane

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
    """Messages waiting in a provider's queue, over all its priority lists (its lanes)."""
    pipe = client.pipeline(transaction=False)
    for priority in range(10):
        pipe.llen(lane(provider, priority))
    return sum(pipe.execute())


@dataclass(frozen=True)
class Lane:
    """One Redis list of a provider's queue: how many messages it holds, and the send time of the
    latest one a worker received from it (None: none since Redis started)."""

    length: int
    read_to: float | None

    def passed(self, due: float, grace: float) -> bool:
        """Would a message due at ``due`` have left this list by now (it is first in, first out)?"""
        return self.length == 0 or (self.read_to is not None and self.read_to > due + grace)


def look_again_in(late: float, grace: float, longest: float) -> float:
    """Seconds until the next look at a message waiting its turn ``late`` seconds past its due
    time: its wait so far, at least ``grace`` and at most ``longest``. The looks double the wait
    between them, so a message waiting for days costs a few dozen looks, not one every pass."""
    return min(longest, max(grace, late))


RECORD_FIELDS = ("msg", "holder", "claimed_at", "due", "provider", "step", "ahead")


class Reconciler:
    def __init__(
        self, client: redis.Redis, ledger: JobLedger, publish: Publish, *, backlog_grace: float = 600.0, page: int = 500, pages: int = 10
    ) -> None:
        self._redis = client
        self._ledger = ledger
        self._publish = publish
        self._backlog_grace = backlog_grace
        self._page = page  # overdue jobs read per round trip ...
        self._pages = pages  # ... and at most this many rounds per pass
        self._scanned = False  # the first pass also scans for held sets no heartbeat registered

    def run_once(self) -> Reconciled:
        done = Reconciled()
        self._dead_holders(done)
        self._overdue(done)
        return done

    def _redrive(self, job_id: str, msg: str, reason: str, done: Reconciled) -> None:
        new_msg = str(uuid.uuid4())
        handed = self._ledger.redrive(job_id, msg, new_msg, ahead=True)
        if handed is None:
            return  # the job moved on meanwhile
        step, payload = handed
        self._publish(step, payload, new_msg, 0.0)
        done.redriven.append((job_id, reason))
        log.warning("job %s re-driven at %s (%s)", job_id, step, reason)

    def _dead_holders(self, done: Reconciled) -> None:
        """Hand on what every dead holder held. The holders are the registered ones (``HOLDERS``);
        a process's first pass also scans the keyspace once, for held sets of workers that ran
        before holders were registered."""
        holders = {raw.decode() for raw in self._redis.smembers(HOLDERS)}
        if not self._scanned:
            holders |= {raw.decode()[len(HELD_PREFIX) :] for raw in self._redis.scan_iter(f"{HELD_PREFIX}*", count=1000)}
            self._scanned = True
        for holder in holders:
            if self._redis.exists(f"{WORKER_PREFIX}{holder}"):
                continue
            for member in self._redis.smembers(held_key(holder)):
                job_id, _, msg = member.decode().partition(" ")
                self._redrive(job_id, msg, "worker died", done)
            self._redis.delete(held_key(holder))
            self._redis.srem(HOLDERS, holder)

    def _overdue(self, done: Reconciled) -> None:
        now = time.time()
        lanes: dict[str, Lane] = {}
        for _ in range(self._pages):
            overdue = [raw.decode() for raw in self._redis.zrangebyscore(ACTIVE, "-inf", now, start=0, num=self._page)]
            if not overdue:
                return
            pipe = self._redis.pipeline(transaction=False)
            for job_id in overdue:
                pipe.hmget(key(job_id), RECORD_FIELDS)
            records = [[v.decode() if v else "" for v in fields] for fields in pipe.execute()]
            later: list[tuple[str, str, float]] = []
            for job_id, (msg, holder, claimed_at, due, provider, step, ahead) in zip(overdue, records):
                if not msg:
                    self._redis.zrem(ACTIVE, job_id)  # finished, or its record is gone
                elif holder:
                    if not self._redis.exists(f"{WORKER_PREFIX}{holder}"):
                        self._redrive(job_id, msg, "worker died", done)
                    elif now - float(claimed_at or now) > self._ledger.stall:
                        self._redrive(job_id, msg, "step stuck", done)
                else:
                    due_at = float(due or now)
                    its_lane = self._lane(lanes, provider, step, ahead == msg)
                    if its_lane is None or its_lane.passed(due_at, self._ledger.grace):
                        self._redrive(job_id, msg, "message lost", done)
                    else:  # waiting its turn
                        later.append((job_id, msg, now + look_again_in(now - due_at, self._ledger.grace, self._backlog_grace)))
            if later:
                self._ledger.look_later(later)
            if len(overdue) < self._page:
                return

    def _lane(self, lanes: dict[str, Lane], provider: str, step: str, ahead: bool) -> Lane | None:
        """The lane a job's message is in (read once per pass); None for a record that cannot say."""
        if not provider or step not in stages.STAGE_PRIORITY:
            return None
        name = lane(provider, stages.priority(step, redriven=ahead))
        if name not in lanes:
            length, read_to = self._redis.pipeline(transaction=False).llen(name).zscore(RECEIVED, name).execute()
            lanes[name] = Lane(int(length), None if read_to is None else float(read_to))
        return lanes[name]


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
