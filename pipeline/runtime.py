"""What a process needs to talk to Redis and the providers, built once per process.

Built lazily so that a Celery prefork child creates its own connections after the fork.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
import redis
import redis.asyncio

from pipeline.config import Settings, get_settings
from pipeline.jobs import JobLedger
from pipeline.limits import LeaseSemaphore, RateLimiter
from pipeline.polling import ProcessingTimes

# httpx logs every request URL at INFO, and some providers put the access token in the
# query string: keep that logger quiet so no token reaches a log line.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


T = TypeVar("T")


class BuiltOnce(Generic[T]):
    """A per-process cache whose build runs in one thread only (``functools.lru_cache`` lets every
    thread that misses build its own).

    Why it matters: a worker's threads all start on the first batch at once, and each built
    its own boto3 client (not thread-safe to build from one session, ~0.2 s of CPU each) and
    TLS context under one GIL; the first documents of a batch took 1-1.6 s to stage, not 30 ms.
    """

    _every: list[BuiltOnce[Any]] = []

    def __init__(self, build: Callable[..., T]) -> None:
        self._build = build
        self._built: dict[tuple[Any, ...], T] = {}
        self._lock = threading.RLock()
        functools.update_wrapper(self, build)
        BuiltOnce._every.append(self)

    def __call__(self, *args: Any) -> T:
        try:
            return self._built[args]
        except KeyError:
            pass
        with self._lock:
            if args not in self._built:
                self._built[args] = self._build(*args)
            return self._built[args]

    def cache_clear(self) -> None:
        with self._lock:
            self._built.clear()


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    limiter: RateLimiter
    leases: LeaseSemaphore
    ledger: JobLedger
    processing: ProcessingTimes
    http_client: httpx.Client | None = None  # the providers' client; built on first use unless given
    _building: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def http(self) -> httpx.Client:
        """The client every provider call goes through, built on first use: building one makes an
        SSL context (about 25 ms of CPU reading the CA bundle), and most processes that read the
        runtime never call a provider (the CLI, an enqueuer, the callback receiver)."""
        if self.http_client is None:
            with self._building:
                if self.http_client is None:
                    limits = httpx.Limits(max_connections=20, keepalive_expiry=PROVIDER_KEEPALIVE_S)
                    self.http_client = httpx.Client(timeout=self.settings.http_timeout, limits=limits)
        return self.http_client


# How long an idle connection to a provider is kept for the next request: under the 5 s after
# which common servers close one (uvicorn's and Apache's default). At httpx's default, also 5 s,
# a request sent on a connection just as the server closed it fails with a ReadError
# (``python -m bench.keepalive``), and a submit that fails so is ``submit_outcome_unknown``.
PROVIDER_KEEPALIVE_S = 4.0


def redis_client(settings: Settings) -> redis.Redis:
    """Every docpipe Redis connection has socket timeouts: a Redis that vanished (a failover, a
    dropped NAT entry) fails the command after seconds instead of hanging a thread for good."""
    return redis.Redis.from_url(settings.redis_url, **_connection_options(settings))


def async_redis_client(settings: Settings) -> redis.asyncio.Redis:
    """The same, for code on an event loop (the callback receiver's path to a freed slot): its
    connections belong to the loop that first uses them."""
    return redis.asyncio.Redis.from_url(settings.redis_url, **_connection_options(settings))


def _connection_options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


@BuiltOnce
def get_runtime() -> Runtime:
    settings = get_settings()
    client = redis_client(settings)
    return Runtime(
        settings=settings,
        redis=client,
        limiter=RateLimiter(client, safety=settings.limit_safety),
        leases=LeaseSemaphore(client),
        ledger=JobLedger(client, grace=settings.step_grace, stall=settings.step_stall),
        processing=ProcessingTimes(client),
    )


def reset_runtime() -> None:
    """Forget the process' settings and everything built from them: connections, clients,
    providers, keys (tests and tools that point a process at another stack)."""
    get_settings.cache_clear()
    for cache in BuiltOnce._every:
        cache.cache_clear()
