"""What a process needs to talk to Redis and the providers, built once per process.

Built lazily so that a Celery prefork child creates its own connections after the fork.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import httpx
import redis

from pipeline.config import Settings, get_settings
from pipeline.limits import LeaseSemaphore, RateLimiter

# httpx logs every request URL at INFO, and some providers put the access token in the
# query string: keep that logger quiet so no token reaches a log line.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    limiter: RateLimiter
    leases: LeaseSemaphore
    http: httpx.Client


@lru_cache
def get_runtime() -> Runtime:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    return Runtime(
        settings=settings,
        redis=client,
        limiter=RateLimiter(client, safety=settings.limit_safety),
        leases=LeaseSemaphore(client),
        http=httpx.Client(timeout=settings.http_timeout, limits=httpx.Limits(max_connections=20)),
    )


def reset_runtime() -> None:
    """Forget the process' settings and connections (tests that change the environment)."""
    get_settings.cache_clear()
    get_runtime.cache_clear()
