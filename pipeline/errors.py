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


class DeadlineExceeded(DocpipeError):
    retryable = True


class RateWait(Exception):
    """Raised by the limiter when a token is further away than a worker should sleep.

    The task catches it and re-schedules itself ``delay`` seconds later.
    """

    def __init__(self, key: str, delay: float) -> None:
        super().__init__(f"rate limit {key}: next token in {delay:.2f}s")
        self.key = key
        self.delay = delay
