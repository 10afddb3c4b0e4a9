"""Prometheus metrics of docpipe itself, in two places, each counting what it alone can see.

- Every worker process serves its own counters (``DOCPIPE_METRICS_PORT``; with several
  workers on one machine each takes the next free port): requests and their outcomes per
  provider endpoint, provider error codes, limiter grants and waits, stage durations. These
  happen inside one process, so they are counted there, without a Redis round trip, and
  Prometheus sums them over the workers.
- ``docpipe metrics`` serves what only Redis knows, read at each scrape: documents by state
  and failures by reason (kept by the same scripts that change a job's state, see
  ``pipeline.jobs``), concurrency leases in use, messages waiting per queue. One exporter for
  the whole deployment, so these gauges are not counted once per worker.

Metric names are documented in the README ("Metrics").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "docpipe_provider_requests_total",
    "HTTP requests sent to a provider, by endpoint and outcome (HTTP status, or the transport failure)",
    ["provider", "endpoint", "outcome"],
)
PROVIDER_ERRORS = Counter(
    "docpipe_provider_errors_total",
    "Errors a provider answered with, by its own code (baidu error_code, tuputech code, idp status)",
    ["provider", "stage", "code"],
)
LIMITER_GRANTS = Counter("docpipe_limiter_grants_total", "Send times granted by the global rate limiter", ["key"])
LIMITER_WAIT = Histogram(
    "docpipe_limiter_wait_seconds",
    "Time a request waited in its worker for its send time",
    ["key"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
LIMITER_DEFERRALS = Counter(
    "docpipe_limiter_deferrals_total", "Requests whose send time was too far away: the step was re-scheduled instead", ["key"]
)
STAGE_SECONDS = Histogram(
    "docpipe_stage_duration_seconds",
    "Time one run of a stage took in a worker (a poll that finds the task running counts as one run)",
    ["provider", "stage", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
STEPS = Counter("docpipe_steps_total", "Messages a worker took, by what became of them", ["provider", "stage", "verdict"])


@contextmanager
def timed_stage(provider: str, stage: str) -> Iterator[dict[str, str]]:
    """Time a stage run; the caller sets ``outcome`` in the yielded dict (ok, retry, failed, wait)."""
    labels = {"outcome": "ok"}
    started = time.perf_counter()
    try:
        yield labels
    except BaseException:
        labels["outcome"] = "error"
        raise
    finally:
        STAGE_SECONDS.labels(provider, stage, labels["outcome"]).observe(time.perf_counter() - started)


def serve_worker_metrics(first_port: int, tries: int = 20) -> int | None:
    """Serve this process' metrics on ``first_port`` or the next free one; the port, or None."""
    for port in range(first_port, first_port + tries):
        try:
            start_http_server(port)
        except OSError:
            continue
        log.info("metrics on :%d/metrics", port)
        return port
    log.warning("no free port for metrics in %d-%d", first_port, first_port + tries - 1)
    return None


class RedisCollector(Collector):
    """The deployment-wide gauges, read from Redis at each scrape (a handful of commands)."""

    def __init__(self, client, providers: list[str]) -> None:
        self._redis = client
        self._providers = providers

    def collect(self):
        from pipeline.jobs import FAILURES, STATES
        from pipeline.reconcile import queue_backlog

        now_ms = time.time() * 1000  # lease expiries are Redis times in ms; an expired one is not in use
        lease_keys = {
            provider: [k for k in self._redis.scan_iter(f"docpipe:lease:{provider}:*", count=100) if not k.endswith(b":freed")]
            for provider in self._providers
        }
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(STATES)
        pipe.hgetall(FAILURES)
        for provider in self._providers:
            for lease_key in lease_keys[provider]:
                pipe.zcount(lease_key, now_ms, "+inf")
        states, failures, *counts = pipe.execute()
        leases = []
        for provider in self._providers:
            mine, counts = counts[: len(lease_keys[provider])], counts[len(lease_keys[provider]) :]
            leases.append(sum(mine))
        documents = GaugeMetricFamily("docpipe_documents", "Documents by their current state", labels=["state"])
        for state, count in sorted(states.items()):
            documents.add_metric([state.decode()], float(count))
        yield documents
        failed = GaugeMetricFamily(
            "docpipe_failures_by_reason", "Failed documents by stage:code[:provider code], since Redis was last emptied", labels=["reason"]
        )
        for reason, count in sorted(failures.items()):
            failed.add_metric([reason.decode()], float(count))
        yield failed
        in_use = GaugeMetricFamily("docpipe_leases_in_use", "Concurrency slots held at a provider", labels=["provider"])
        for provider, count in zip(self._providers, leases):
            in_use.add_metric([provider], float(count))
        yield in_use
        waiting = GaugeMetricFamily("docpipe_queue_messages", "Messages waiting in a provider's queue", labels=["provider"])
        for provider in self._providers:
            waiting.add_metric([provider], float(queue_backlog(self._redis, provider)))
        yield waiting


def serve_exporter(port: int, host: str = "0.0.0.0") -> None:
    """``docpipe metrics``: serve the Redis-derived gauges until stopped."""
    from pipeline.providers import provider_names
    from pipeline.runtime import get_runtime

    registry = CollectorRegistry()
    registry.register(RedisCollector(get_runtime().redis, list(provider_names())))
    start_http_server(port, addr=host, registry=registry)
