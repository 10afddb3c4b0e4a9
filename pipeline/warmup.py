"""Build what every task needs before a worker takes its first task.

Why: a worker's threads all start on the first batch at once. Built lazily, the S3 client,
the HTTP client's TLS context and the providers' RSA keys were built at that moment under
one GIL, and the first documents of every batch (and every restart) waited seconds for
them while the provider's slots stood empty.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pipeline import storage
from pipeline.providers import get_provider, provider_names
from pipeline.runtime import get_runtime

log = logging.getLogger(__name__)


def warm_up(providers: Iterable[str] | None = None) -> None:
    """Build the runtime, the S3 client and each provider; an outage here is logged, not fatal."""
    try:
        get_runtime().redis.ping()
        storage.s3_client()
        for name in providers if providers is not None else provider_names():
            get_provider(name).warm_up()
    except Exception as exc:  # the first task will meet the same outage and retry; do not kill the worker
        log.warning("warm-up incomplete (%s); the first tasks will build what is missing", type(exc).__name__)
