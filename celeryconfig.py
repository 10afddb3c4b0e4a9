"""Celery configuration for docpipe: one queue per provider, JSON only, late acks.

Why these settings:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker dies is delivered
  again instead of lost; every stage is idempotent, so running twice is harmless.
- ``worker_prefetch_multiplier = 1``: a worker reserves as many messages as it has threads (plus
  the countdown tasks it holds), so a stalled worker strands little and the queues stay fair.
- ``visibility_timeout`` (DOCPIPE_VISIBILITY_TIMEOUT): how long Redis waits for an ack before
  re-delivering. It is only the backstop: a killed worker's jobs are re-driven by the reconciler
  seconds after its heartbeat stops (``pipeline.reconcile``), and a copy the broker re-delivers
  later is stale and does nothing (``pipeline.jobs``). A task that waits with a countdown holds
  its message unacked, so every countdown is kept under a third of it.
- socket timeouts on every broker connection: a Redis that vanished without closing the socket
  fails a publish after seconds (and is retried) instead of hanging a worker thread for good.
- events on, so Flower sees every task; task names are ``docpipe.<provider>.<stage>``.
"""

from kombu import Queue

from pipeline.config import get_settings
from pipeline.providers import provider_names

_settings = get_settings()

broker_url = _settings.redis_url
broker_transport = "workers.transport:Transport"  # kombu's Redis transport, safe when Redis drops the connection
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout,
    "socket_keepalive": True,
    "socket_timeout": _settings.redis_socket_timeout,
    "socket_connect_timeout": _settings.redis_connect_timeout,
    "retry_on_timeout": True,
    # Priorities on Redis (0 is the highest): later stages go first, so a deep backlog of
    # new documents never starves the polls and archives of documents already submitted.
    "priority_steps": list(range(10)),
    "sep": ":",
    "queue_order_strategy": "priority",
}

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

task_queues = [Queue(f"docpipe.{name}") for name in provider_names()]
task_routes = {f"docpipe.{name}.*": {"queue": f"docpipe.{name}"} for name in provider_names()}
task_default_queue = f"docpipe.{provider_names()[0]}"

worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = True

# Only the benchmark's baseline sets these: Celery's rate_limit is per worker, so it cannot
# hold a provider's account-wide limit once there are several workers (the global limiter does).
task_annotations = {name: {"rate_limit": limit} for name, limit in _settings.celery_rate_limits.items()}
