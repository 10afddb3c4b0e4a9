"""A worker builds what its first tasks need before it takes them (``pipeline.warmup``)."""

from __future__ import annotations

import redis

from pipeline.config import get_settings
from pipeline.runtime import get_runtime
from pipeline.warmup import open_connections, warm_up


def _named_connections(client: redis.Redis, name: str) -> int:
    return sum(1 for entry in client.client_list() if entry.get("name") == name)


def test_open_connections_leaves_that_many_connections_open_in_the_pool(stack):
    stack.activate()
    name = "docpipe-warmup-test"
    pooled = redis.Redis.from_url(get_settings().redis_url, client_name=name)
    observer = redis.Redis.from_url(get_settings().redis_url)
    try:
        assert _named_connections(observer, name) == 0
        assert open_connections(pooled, 5) == 5
        assert _named_connections(observer, name) == 5
    finally:
        pooled.close()
        observer.close()


def test_warm_up_builds_the_providers_http_client_before_the_first_submit(stack):
    stack.activate()  # a runtime of its own, built afresh
    assert get_runtime().http_client is None  # built on first use, by default
    warm_up(threads=2)
    assert get_runtime().http_client is not None
