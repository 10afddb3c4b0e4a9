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


def test_warm_up_builds_the_providers_http_client_and_a_redis_connection_per_thread(stack):
    stack.activate()  # a runtime of its own, built afresh
    rt = get_runtime()
    assert rt.http_client is None  # built on first use, by default
    warm_up(threads=3)
    assert rt.http_client is not None
    pool = rt.redis.connection_pool
    assert len(pool._available_connections) >= 3  # open, waiting for the threads' first commands


def test_the_receiver_builds_what_its_first_download_and_callback_need_before_it_serves(stack):
    """Its lifespan's warm-up: the S3 client and link key every document link needs, the providers'
    keys, and the Redis connections; a download no longer builds them under the receiver's GIL.
    Not the providers' HTTP client: the receiver sends no provider request."""
    from pipeline import callbacks, links, storage

    stack.activate()  # every per-process cache cleared
    assert not storage._client._built and not links._secret._built
    callbacks._warm_up()
    assert storage._client._built and links._secret._built
    assert get_runtime().http_client is None
