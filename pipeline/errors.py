"""The few kinds of failure the chain tells apart.

A provider's own codes are mapped onto these by each provider module; the stages only
ever look at the class, which decides what happens next:

* ``RateLimited``: the provider said "too fast" — wait and try again, spending a token.
* ``Transient``: a 5xx, an internal error, a dropped connection — retry with backoff.
* ``AuthExpired``: the shared credential is stale — refresh it once, then retry.
* ``Permanent``: the document or the request is wrong — retrying cannot help.
* ``BadInput``: found at ``stage``, before any provider request.

Messages never carry a URL, a token or a key: they end up in logs, Flower and error.json.
"""

from __future__ import annotations

import errno


class DocpipeError(Exception):
    """Base class: ``code`` is ours, ``provider_code`` and ``provider_message`` are the provider's."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        provider_code: str | int | None = None,
        provider_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.provider_code = provider_code
        self.provider_message = provider_message

    def __reduce__(self):  # keep pickling/celery serialisation of keyword arguments working
        return (_rebuild, (type(self), self.message, self.code, self.provider_code, self.provider_message))


def _rebuild(cls, message, code, provider_code, provider_message):
    return cls(message, code=code, provider_code=provider_code, provider_message=provider_message)


class Cancelled(DocpipeError):
    """The job was cancelled (``docpipe cancel``) while a step ran: it ends quietly, with no archive,
    so that a later ingest sends it."""

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, code=kwargs.pop("code", "cancelled"), **kwargs)


class Superseded(Cancelled):
    """The step's job was handed to another message while it ran (its worker was taken for dead):
    this run ends quietly and the other one carries the job on."""

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, code=kwargs.pop("code", "superseded"), **kwargs)


class AlreadyArchived(Cancelled):
    """A document enqueued from a listing turned out to be archived already: its job ends, counted
    as done (or failed) and skipped, and nothing is sent again."""

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, code=kwargs.pop("code", "already_archived"), **kwargs)


class ProviderError(DocpipeError):
    """Anything the provider answered (or failed to answer)."""


class RateLimited(ProviderError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs) -> None:
        super().__init__(message, code=kwargs.pop("code", "rate_limited"), **kwargs)
        self.retry_after = retry_after


class Transient(ProviderError):
    retryable = True


class AuthExpired(ProviderError):
    retryable = True


class Permanent(ProviderError):
    retryable = False


class BadInput(DocpipeError):
    """The document itself cannot be sent: empty, corrupt, unsupported, too big."""

    retryable = False


class OutcomeUnknown(DocpipeError):
    """A submit left and no answer came back: the provider may have the task. Not sent again
    automatically (that could bill it twice); a retry by hand can help."""

    retryable = True


class DeadlineExceeded(DocpipeError):
    retryable = True


def is_outage(exc: BaseException) -> bool:
    """Redis, the broker or S3 refused or could not be reached: the document did nothing wrong.

    Such failures are waited out (retried with backoff for as long as they last) instead of
    counting against the document: a 30 s S3 outage or a Redis refusing writes must delay
    documents, not fail them, and never lose one.
    """
    import redis
    from botocore.exceptions import ClientError, ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
    from kombu.exceptions import OperationalError

    if isinstance(exc, (redis.RedisError, OperationalError, EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError, ConnectionError)):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in OUTAGE_CODES or int(status or 0) >= 500
    # The worker's own disk full (a large result or highlight PDF is spooled to a temporary file
    # before its upload): the host's trouble, gone once space is freed; counted as the document's
    # failures, it ended documents as "unexpected error" after a few minutes.
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

# S3's answers that mean "not now", not "not this request".
OUTAGE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"})


class RateWait(Exception):
    """Raised by the limiter when a token is further away than a worker should sleep.

    The task catches it and re-schedules itself ``delay`` seconds later; a caller that queues for
    its send time keeps ``turn``, its place in the queue, for its next try. ``spread`` adds up to
    half a second: refused tasks re-tried at the same instant would only race for the same token
    again; a slot's waiters (``LeaseSemaphore``) do not race, they block in line.
    """

    def __init__(self, key: str, delay: float, *, turn: float | None = None, spread: bool = True) -> None:
        super().__init__(f"rate limit {key}: next token in {delay:.2f}s")
        self.key = key
        self.delay = delay
        self.turn = turn
        self.spread = spread
