"""What a provider module gives the chain: its limits as data and the same few verbs.

A fourth provider is one subclass of ``Provider`` (plus its emulator); the stages and the
Celery tasks never change for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, NoReturn

import logging
import time

import httpx

from pipeline import metrics
from pipeline.errors import DocpipeError, OutcomeUnknown, RateLimited, Transient
from pipeline.limits import Rate
from pipeline.models import DocumentInfo, Job, NormalizedResult
from pipeline.runtime import Runtime
from pipeline.storage import SourceUnreadable

if TYPE_CHECKING:
    from pipeline.submission import Submission


@dataclass
class PollOutcome:
    """``done``: the provider finished (``error`` set when it finished by failing).

    ``status`` is the provider's own word for where the task stands, kept as it was sent
    (a value the seed does not list included), so that a document that never finishes
    ends with a reason naming it.
    """

    done: bool
    error: DocpipeError | None = None
    detail: str = ""
    status: str | int | None = None
    # The provider's own account of how long the task took, as an interval of seconds (durations
    # it gives to the second); it teaches the poll schedule (``pipeline.polling``).
    reported: tuple[float, float] | None = None
    # When the answer that says "done" is the whole result (one endpoint for both), it is kept
    # here and ``fetch`` parses it instead of asking the provider a second time.
    answer: Any = None


@dataclass(frozen=True)
class Download:
    """An artifact read from the provider while it is written to the archive: a highlighted
    export is about as large as the document, and a worker holding it whole would need that
    much memory. ``open`` starts the download and yields its body as a file."""

    open: Callable[[], AbstractContextManager[BinaryIO]]


@dataclass
class Fetched:
    """Everything ``archive`` writes: the normalized result, the raw payload, extra artifacts."""

    result: NormalizedResult
    raw: dict[str, Any]
    artifacts: dict[str, bytes | Download] = field(default_factory=dict)

log = logging.getLogger(__name__)


class Provider(ABC):
    name: ClassVar[str]
    # Endpoint name -> documented rate, per account.
    limits: ClassVar[dict[str, Rate]]
    # The provider's own advice for the first poll after a submit.
    first_poll_delay: ClassVar[float] = 5.0
    # Results arrive by callback (``docpipe callbacks``) instead of by polling the provider.
    uses_callbacks: ClassVar[bool] = False

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings

    def warm_up(self) -> None:
        """Build what the first request would (keys, clients), so that it does not wait for it."""

    def account(self) -> str:
        """A non-secret name for the account whose limits apply (limits are per account)."""
        return "default"

    def max_in_flight(self) -> int | None:
        """Tasks the account may have at the provider at once; None when only rates are limited."""
        return None

    def lease_key(self) -> str:
        return f"{self.name}:{self.account()}"

    def open_callback(self, body: bytes) -> Callback:
        """Verify and parse a callback body; raise ``CallbackRejected`` (forged or malformed)."""
        raise CallbackRejected(404, f"{self.name} does not call back")

    def take_token(
        self,
        endpoint: str,
        max_wait: float | None = None,
        *,
        alone: bool = False,
        before_send: Callable[[], None] | None = None,
        turn: float | None = None,
    ) -> tuple[str, Rate, float] | None:
        """Every request to a limited endpoint goes through here first, retries included; the
        grant (limiter key, rate, send time) is returned for ``RateLimiter.left_at``.

        A token at most ``max_wait`` away (default ``max_inline_wait``) is waited for in the
        worker thread; one further away raises ``RateWait`` and the task re-schedules itself
        instead of holding the thread. Polls pass a short wait and ``alone``: one thread per
        process waits for a poll token, so a freed slot is taken at once, and the others
        re-schedule, since a thread waiting for a poll token is a thread not submitting.
        Submits pass their ``turn`` and queue (``RateLimiter.acquire``).
        """
        if not self.takes_token(endpoint):
            if before_send is not None:
                before_send()
            return None
        key, rate = f"{self.name}:{self.account()}:{endpoint}", self.limits[endpoint]
        if self.settings.rate_scale != 1.0:
            rate = scaled(rate, self.settings.rate_scale)
        at = self.rt.limiter.acquire(
            key, rate, max_wait=self.settings.max_inline_wait if max_wait is None else max_wait, alone=alone, before_send=before_send,
            turn=turn,
        )
        return key, rate, at

    def takes_token(self, endpoint: str) -> bool:
        """Whether requests to ``endpoint`` wait for a rate token of the shared limiter."""
        return self.settings.global_limits and endpoint in self.limits

    def take_slot(self, job: Job, *, attempt: Callable[[], bool] | None = None) -> None:
        """Hold one of the account's in-flight slots for ``job`` (a lease with a short grace).

        Taken as late as possible, right before the request that creates the provider task,
        so that a freed slot is filled by a request already built and signed. ``attempt``, when
        given, takes the lease with a write of its own (``LeaseSemaphore.acquire``).
        """
        limit = self.max_in_flight()
        if limit:
            settings = self.settings
            self.rt.leases.acquire(
                self.lease_key(), job.job_id, limit, settings.lease_grace, max_wait=settings.lease_max_wait, attempt=attempt
            )

    def send(
        self,
        endpoint: str,
        request: httpx.Request,
        *,
        max_wait: float | None = None,
        alone: bool = False,
        submission: Submission | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Take a rate token (and, for a ``submission``, a slot first), then send.

        A submission is told right before the request leaves, and whether it got an answer:
        a request whose connection was refused never left; one that timed out or lost its
        connection after leaving may have been taken by the provider. Transport failures
        become ``Transient`` without the URL in the message. A ``stream`` answer's body is read
        as it arrives, and closing it is the caller's.
        """
        marked = submission.take_slot(marking=not self.takes_token(endpoint)) if submission is not None else False
        # A submit records that it leaves between its grant and its send time, not after: a
        # Redis round trip after the send time would make the request leave late, and a late
        # request can share a provider's window with one sent a window after it. One that waits
        # for no token was recorded with its slot. Every other send of a submission records again,
        # a second request of one step included: skipped there, idp's resend under the other path
        # prefix never left (bench.polling: no idp task made in 20 minutes, the step re-run forever).
        before_send = submission.sending if submission is not None and not marked else None
        turn = submission.turn if submission is not None else None  # submits queue for their send time
        while True:
            try:
                grant = self.take_token(endpoint, max_wait, alone=alone, before_send=before_send, turn=turn)
            except BaseException:
                if submission is not None:
                    submission.not_sent()  # refused a send time (or the marker): the request never left
                raise
            before_send = None  # a submit marked as leaving stays marked while it asks again
            departure = _Departure(self.rt.limiter, grant, self._record_departure)
            request.extensions["trace"] = departure.trace
            try:
                response = self.rt.http.send(request, stream=stream)
            except _LateDeparture as late:
                # The machine held this thread past its send time before a byte left: not sent,
                # and sending now could crowd the next window. The slot goes back; ask again.
                if grant is not None:
                    self.rt.limiter.give_back(grant[0], grant[2])
                metrics.REQUESTS.labels(self.name, endpoint, "held_back_late").inc()
                log.info("%s %s: held up %.0f ms past its send time before leaving; asking again", self.name, endpoint, late.by * 1000)
                continue
            except httpx.TransportError as exc:
                metrics.REQUESTS.labels(self.name, endpoint, type(exc).__name__).inc()
                self._transport_failed(endpoint, exc, submission)
            except SourceUnreadable as exc:
                # S3 failed us midway through the body: the provider never had the whole request.
                metrics.REQUESTS.labels(self.name, endpoint, "source_unreadable").inc()
                if submission is not None:
                    submission.not_sent()
                raise (exc.__cause__ or exc) from None
            break
        metrics.REQUESTS.labels(self.name, endpoint, str(response.status_code)).inc()
        if submission is not None:
            submission.answered = True
        if stream and (response.status_code == 429 or response.status_code >= 500):
            response.close()
        if response.status_code == 429:
            raise RateLimited(f"{self.name} {endpoint}: HTTP 429", retry_after=_retry_after(response), provider_code=429)
        if response.status_code >= 500:
            raise Transient(f"{self.name} {endpoint}: HTTP {response.status_code}", code="http_5xx", provider_code=response.status_code)
        return response

    def _record_departure(self, grant: tuple[str, Rate, float], left: float) -> None:
        """Tell the limiter when the request really left; a Redis blip here costs only the correction."""
        key, rate, at = grant
        try:
            self.rt.limiter.left_at(key, rate, at, left)
        except Exception as exc:  # noqa: BLE001 - the request is out; its answer matters more than this bookkeeping
            log.warning("%s: could not record a late departure on %s (%s)", self.name, key, type(exc).__name__)

    def _transport_failed(self, endpoint: str, exc: httpx.TransportError, submission: Submission | None) -> NoReturn:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            if submission is not None:
                submission.not_sent()
            raise Transient(f"{self.name} {endpoint}: could not connect ({type(exc).__name__})", code="connection") from None
        if isinstance(exc, httpx.TimeoutException):
            raise Transient(f"{self.name} {endpoint}: timed out ({type(exc).__name__})", code="timeout") from None
        raise Transient(f"{self.name} {endpoint}: no answer ({type(exc).__name__})", code="no_answer") from None

    # -- the verbs -------------------------------------------------------------------------

    @abstractmethod
    def check(self, document: DocumentInfo, job: Job) -> None:
        """Raise ``BadInput`` when the document breaks one of the provider's documented limits.

        A limit measured on the bytes reads them with ``storage.iter_object``, which serves a
        document the stage has just read whole (a small one) from memory."""

    @abstractmethod
    def submit(self, job: Job, submission: Submission) -> str:
        """Send the document (through ``send(..., submission=submission)``); return the provider's task id.

        ``submission.accepted(task_id)`` is called as soon as the raw answer names a task,
        before the answer is verified or validated: from that moment the provider has the task
        (and bills it), so whatever fails afterwards must fail the document, never send it again.
        """

    def unknown_outcome(self, job: Job, since: float) -> str | None:
        """A submit of ``job`` left at ``since`` and no answer came back (a worker killed while it
        was out, a timeout, a dropped connection): the provider may have the task.

        Return its task id if the provider can tell, raise ``RateWait`` to look again later;
        by default the document fails rather than be sent (and billed) a second time.
        """
        raise OutcomeUnknown(
            f"{job.label()}: a submit sent at {time.strftime('%H:%M:%S', time.gmtime(since))} UTC got no answer; {self.name} "
            "may have the task, so the document is not sent again (retry it once you know it is not there)",
            code="submit_outcome_unknown",
        )

    def task_lifetime(self, job: Job) -> float:
        """Seconds the provider may keep an accepted task: its concurrency slot is held this long at most."""
        return float(job.options.get("deadline", self.settings.job_deadline))

    @abstractmethod
    def poll(self, job: Job) -> PollOutcome:
        """Ask once whether the provider is done with the task."""

    @abstractmethod
    def fetch(self, job: Job, answer: Any = None) -> Fetched:
        """Get the full result and artifacts, parsed and normalized; ``answer`` is the poll's
        ``PollOutcome.answer`` when it carried the result already."""

    def overdue_at(self, job: Job) -> float | None:
        """When a document waiting at this provider must be looked at, whatever the poll schedule
        says (a callback provider: when its callback is overdue and the document ends); None when
        the schedule alone decides."""
        return None

    def finished(self, job: Job) -> None:
        """The document reached its end (archived or failed): release what the provider held."""
        self.finished_at_provider(job.job_id)

    def finished_at_provider(self, job_id: str) -> None:
        """The provider is done with the job's task (its callback came): free its in-flight slot."""
        if self.max_in_flight():
            self.rt.leases.release(self.lease_key(), job_id)


@dataclass(frozen=True)
class Callback:
    """A verified callback: which task, which job it says it is for (echoed from the submit), when and
    with what nonce the provider signed it, and the payload itself."""

    task_id: str
    job_id: str | None
    timestamp: float | None
    nonce: str | None
    payload: dict[str, Any]


class CallbackRejected(Exception):
    """A callback that is stored nowhere: ``status`` is the HTTP answer (400 malformed, 403 forged)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def json_object(response: httpx.Response, where: str) -> dict[str, Any]:
    """An answer's JSON object; anything else (a proxy's HTML, a body cut short) is a transient failure."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise Transient(f"{where}: HTTP {response.status_code} answer is not a JSON object", code="malformed_answer")
    return body


def scaled(rate: Rate, scale: float) -> Rate:
    """``rate`` times ``scale``, rounded down, never above it. The window stays as documented
    (a count that grows, not a window that shrinks): the limiter's margins are fractions of
    its window, and a window of milliseconds would leave none."""
    count = rate.count * scale
    return Rate(int(count), per=rate.per) if count >= 1 else Rate(1, per=rate.per / count)


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.1, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


class _LateDeparture(Exception):
    def __init__(self, by: float) -> None:
        super().__init__(f"{by * 1000:.0f} ms late")
        self.by = by


class _Departure:
    """Watches a granted request on its way out (httpcore's trace of the connection).

    Right before its headers go out, a request later than its grant tolerates is stopped (the
    grant was checked before the send, but a loaded machine can hold the thread between that
    check and the socket). Once they are out, the moment goes to ``record`` at once, before the
    body and the answer: a late departure moves the request's place in the limiter's log, and
    told only with the answer (a document's upload and the provider's work later), the move
    came after grants it should have pushed back.
    """

    def __init__(
        self, limiter: Any, grant: tuple[str, Rate, float] | None, record: Callable[[tuple[str, Rate, float], float], None]
    ) -> None:
        self._limiter, self._grant, self._record = limiter, grant, record
        self.left: float | None = None

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if self._grant is None:
            return
        if event.endswith("send_request_headers.started"):
            _, rate, at = self._grant
            late = self._limiter.late_by(at)
            if late > self._limiter.tolerance(rate):
                raise _LateDeparture(late)
        elif event.endswith("send_request_headers.complete") and self.left is None:
            self.left = time.time()
            self._record(self._grant, self.left)
