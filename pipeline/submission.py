"""One attempt to hand a document to its provider, and what is known of its outcome.

A submit is the one request that must never be repeated once the provider has taken it: the
provider bills every task it accepts. So the attempt records, in the job's record:
- ``sending_at`` right before the request leaves (after its rate token and slot): from then
  on the provider may have the task, whatever happens to this worker;
- the provider's task id the moment the raw answer names it (``accepted``), before the answer
  is verified or validated, and only then lengthens the concurrency lease;
- nothing more when an answer says the provider refused, or the request never left (the
  marker is cleared and the slot freed, so sending again is safe).

A worker killed while its request was out, or an answer that never came (a read timeout, a
connection reset), leaves ``sending_at`` without a task id: the outcome is unknown, and the
next attempt asks the provider module what to do (``Provider.unknown_outcome``) instead of
sending the document a second time.
"""

from __future__ import annotations

import logging
import time

import redis

from pipeline import jobs
from pipeline.errors import Cancelled, Superseded
from pipeline.models import Job
from pipeline.providers.base import Provider
from pipeline.runtime import Runtime

log = logging.getLogger(__name__)


class Submission:
    def __init__(self, job: Job, provider: Provider, rt: Runtime) -> None:
        self.job = job
        self.provider = provider
        self.rt = rt
        self.task_id: str | None = None
        self.accepted_at: float | None = None
        self.sent = False  # the request may have reached the provider
        self.answered = False  # an HTTP answer came back, whatever it said
        self.turn = job.rate_turn or 0.0  # its place in the queue for a send time (0.0: none yet)

    def take_slot(self, *, marking: bool = False) -> bool:
        """Hold one of the account's in-flight slots (where the provider has a limit), right before
        sending; True when the ``sending`` record was written with it.

        ``marking``: the request leaves as soon as it holds the slot (it waits for no rate token),
        so the slot and the ``sending`` record are taken in one round trip. That round trip is on
        the path that refills a freed slot: callback, waiting submit woken, request accepted.
        """
        self.provider.take_slot(self.job, attempt=self._take_slot_marked if marking else None)
        return bool(marking and self.provider.max_in_flight())  # a slot taken that way was taken marked

    def _take_slot_marked(self) -> bool:
        leases, _ = self.rt.leases.keys(self.provider.lease_key())
        limit, ttl = self.provider.max_in_flight(), self.provider.settings.lease_grace
        answer = jobs.mark_sending_in_slot(self.rt.redis, self.job.job_id, leases, limit, ttl)
        if answer == jobs.NO_SLOT:
            return False
        self._marked(answer)
        return True

    def sending(self) -> None:
        """The request leaves now. Recorded first: if the record cannot be written, nothing is sent;
        if the job was cancelled meanwhile, nothing is sent either."""
        self._marked(jobs.mark_sending(self.rt.redis, self.job.job_id))

    def _marked(self, answer: int) -> None:
        if answer == 0:
            raise Cancelled(f"{self.job.label()}: cancelled before its submit left")
        if answer < 0:
            raise Superseded(f"{self.job.label()}: handed to another message while this submit waited; that one sends it")
        self.sent = True

    def not_sent(self) -> None:
        """The request never reached the provider (the connection was refused): as if never sent."""
        self.sent = False

    def accepted(self, task_id: str) -> None:
        """The raw answer names a task: record it, insisting (losing it would bill the document twice),
        then lengthen the slot to the time the provider may keep the task."""
        self.task_id, self.accepted_at = task_id, time.time()
        self._insist(
            lambda: jobs.record(
                self.rt.redis, self.job.job_id, state="submitted", stage="submit", provider_task_id=task_id, submitted_at=self.accepted_at
            )
        )
        # The rest is bookkeeping about a task that is safely recorded: a Redis outage here
        # delays it, it must not turn a good answer into a failed document.
        self._insist(lambda: self.rt.redis.hdel(jobs.key(self.job.job_id), "sending_at"))
        self._insist(self.hold_slot)

    def hold_slot(self) -> None:
        """Keep the slot for as long as the provider may hold the task (its callback can free it sooner)."""
        if self.provider.max_in_flight():
            self.rt.leases.extend(self.provider.lease_key(), self.job.job_id, self.provider.task_lifetime(self.job))

    def refused(self) -> None:
        """The provider answered without taking the task, or the request never left: free the slot and
        the marker, insisting. A marker left behind by an outage reads as a request that may have been
        taken (``outcome_unknown``), and the document would fail without ever having been sent (seen
        when Redis was killed while a submit, marked as leaving, asked for its send time again)."""
        self._insist(lambda: self.rt.redis.hdel(jobs.key(self.job.job_id), "sending_at"), "clearing its submit marker")
        if self.provider.max_in_flight():
            self._insist(lambda: self.rt.leases.release(self.provider.lease_key(), self.job.job_id), "freeing its slot")

    @property
    def outcome_unknown(self) -> bool:
        return self.sent and not self.answered and self.task_id is None

    def _insist(self, write, doing: str = "recording the task the provider accepted", patience: float = 120.0) -> None:
        deadline = time.monotonic() + patience
        delay = 0.2
        while True:
            try:
                write()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: Redis refuses %s; retrying", self.job.label(), doing)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
