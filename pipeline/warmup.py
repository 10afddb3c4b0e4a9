"""Build what every task needs before a worker takes its first task.

Why: a worker's threads all start on the first batch at once. Built lazily, the S3 client,
the providers' HTTP client (its TLS context: tens of ms of CPU reading the CA bundle, while
every other thread waits for it behind a lock), the providers' RSA keys and one Redis
connection per thread were built at that moment under one GIL, and the first documents of
every batch (and every restart) waited for them while the provider's slots stood empty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import redis

from pipeline import storage
from pipeline.providers import get_provider, provider_names
from pipeline.runtime import get_runtime

log = logging.getLogger(__name__)


def warm_up(
    providers: Iterable[str] | None = None,
    *,
    threads: int = 1,
    http: bool = True,
    also: Iterable[tuple[str, Callable[[], object]]] = (),
) -> None:
    """Build the runtime, a Redis connection for each of ``threads``, the providers' HTTP client
    (unless ``http`` is False: the receiver sends no provider request), the S3 client, each
    provider and what ``also`` names; each one apart, so that an outage of one is logged and the
    rest are still built."""
    rt = get_runtime()
    builds: list[tuple[str, Callable[[], object]]] = [("redis", lambda: open_connections(rt.redis, threads))]
    if http:
        builds.append(("http client", lambda: rt.http))  # built on first use; here, before the first use is a submit
    builds.append(("s3 client", storage.s3_client))
    for name in providers if providers is not None else provider_names():
        builds.append((name, lambda name=name: get_provider(name).warm_up()))
    builds.extend(also)
    for what, build in builds:
        try:
            build()
        except Exception as exc:  # the first task will meet the same outage and retry; do not kill the worker
            log.warning("warm-up of the %s incomplete (%s); the first tasks will build it", what, type(exc).__name__)


def open_connections(client: redis.Redis, count: int) -> int:
    """Connect ``count`` of the client's pooled connections at once, and put them back: each
    thread's first command then finds one open instead of connecting (and greeting) under load."""
    pool = client.connection_pool
    taken = []
    try:
        for _ in range(count):
            taken.append(pool.get_connection())
    finally:
        for connection in taken:
            pool.release(connection)
    return len(taken)
