"""What a provider module gives the chain: its limits as data and the same few verbs.

A fourth provider is one subclass of ``Provider`` (plus its emulator); the stages and the
Celery tasks never change for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from pipeline.errors import DocpipeError, RateLimited, Transient
from pipeline.limits import Rate
from pipeline.models import DocumentInfo, Job, NormalizedResult
from pipeline.runtime import Runtime


@dataclass
class PollOutcome:
    """``done``: the provider finished (``error`` set when it finished by failing)."""

    done: bool
    error: DocpipeError | None = None
    detail: str = ""


@dataclass
class Fetched:
    """Everything ``archive`` writes: the normalized result, the raw payload, extra artifacts."""

    result: NormalizedResult
    raw: dict[str, Any]
    artifacts: dict[str, bytes] = field(default_factory=dict)


class Provider(ABC):
    name: ClassVar[str]
    # Endpoint name -> documented rate, per account.
    limits: ClassVar[dict[str, Rate]]
    # The provider's own advice for the first poll after a submit.
    first_poll_delay: ClassVar[float] = 5.0

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings

    @property
    def queue(self) -> str:
        return f"docpipe.{self.name}"

    def account(self) -> str:
        """A non-secret name for the account whose limits apply (limits are per account)."""
        return "default"

    def take_token(self, endpoint: str) -> None:
        """Every request to a limited endpoint goes through here first, retries included."""
        self.rt.limiter.acquire(
            f"{self.name}:{self.account()}:{endpoint}", self.limits[endpoint], max_wait=self.settings.max_inline_wait
        )

    def send(self, endpoint: str, request: httpx.Request) -> httpx.Response:
        """Take a token, then send; transport failures become ``Transient`` without the URL in the message."""
        self.take_token(endpoint)
        try:
            response = self.rt.http.send(request)
        except httpx.TimeoutException as exc:
            raise Transient(f"{self.name} {endpoint}: timed out ({type(exc).__name__})", code="timeout") from None
        except httpx.TransportError as exc:
            raise Transient(f"{self.name} {endpoint}: connection failed ({type(exc).__name__})", code="connection") from None
        if response.status_code == 429:
            raise RateLimited(f"{self.name} {endpoint}: HTTP 429", retry_after=_retry_after(response), provider_code=429)
        if response.status_code >= 500:
            raise Transient(f"{self.name} {endpoint}: HTTP {response.status_code}", code="http_5xx", provider_code=response.status_code)
        return response

    # -- the verbs -------------------------------------------------------------------------

    @abstractmethod
    def check(self, document: DocumentInfo, job: Job) -> None:
        """Raise ``BadInput`` when the document breaks one of the provider's documented limits."""

    @abstractmethod
    def submit(self, job: Job) -> str:
        """Send the document; return the provider's task id."""

    @abstractmethod
    def poll(self, job: Job) -> PollOutcome:
        """Ask once whether the provider is done with the task."""

    @abstractmethod
    def fetch(self, job: Job) -> Fetched:
        """Get the full result and artifacts, parsed and normalized."""

    def finished(self, job: Job) -> None:
        """The document reached its end (archived or failed): release what the provider held."""


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.1, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0
