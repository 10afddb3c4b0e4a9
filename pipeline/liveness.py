"""Which worker processes (and whether a callback receiver) are alive, by a heartbeat in Redis.

Why our own heartbeat: when a worker is killed, the messages it had received (running, or
waiting for their countdown in its memory) stay unacknowledged in Redis until the broker's
visibility timeout, 300 s later, and kombu's sweep can add another 100 s (409 s measured).
A key that every live worker process refreshes every few seconds lets the reconciler tell
within seconds that a holder is gone, and hand its jobs to live workers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from functools import cache

import redis

from pipeline.jobs import HOLDERS, WORKER_PREFIX

log = logging.getLogger(__name__)

BEAT_EVERY = 3.0  # seconds between two heartbeats
BEAT_TTL = 15.0  # a worker silent this long is taken for dead
# One key every callback receiver keeps alive: a callback provider's submits wait while it is gone.
# A receiver that stops deletes it (the gate closes at once); any other receiver writes it again
# at its next beat, and one killed outright leaves it to expire after its heartbeat's lifetime.
RECEIVER_KEY = "docpipe:receivers:alive"


@cache
def holder_id() -> str:
    """This process, as job records name the worker holding a step (host and pid: a restart is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(client: redis.Redis, holder: str) -> bool:
    return bool(client.exists(f"{WORKER_PREFIX}{holder}"))


class Heartbeat:
    """A daemon thread that keeps this process' heartbeat key alive until ``stop``: written every
    ``every`` seconds, it lives ``ttl`` seconds (``DOCPIPE_HEARTBEAT_EVERY`` / ``_TTL``)."""

    def __init__(
        self, client: redis.Redis, holder: str | None = None, *, every: float = BEAT_EVERY, ttl: float = BEAT_TTL, key: str | None = None
    ) -> None:
        self._redis = client
        self.holder = holder or holder_id()
        self.key = key or f"{WORKER_PREFIX}{self.holder}"
        self.every, self.ttl = every, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="docpipe-heartbeat", daemon=True)

    def start(self, *, tolerate_outage: bool = False) -> Heartbeat:
        """Beat now, then every ``every`` seconds. A first beat that Redis refuses raises, unless
        ``tolerate_outage``: then it is logged and the thread beats once Redis is back."""
        try:
            self.beat()
        except redis.RedisError as exc:
            if not tolerate_outage:
                raise
            log.warning("heartbeat not written (%s); beating on until Redis takes it", type(exc).__name__)
        self._thread.start()
        return self

    def beat(self) -> None:
        """A worker's beat also (re)registers it among the holders the reconciler looks at: again at
        every beat, since a worker taken for dead while it was only starved is removed there."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self.key, str(time.time()), px=int(self.ttl * 1000))
        if self.key == f"{WORKER_PREFIX}{self.holder}":
            pipe.sadd(HOLDERS, self.holder)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis away or refusing writes: the next beat tries again
                log.warning("heartbeat not written (%s)", type(exc).__name__)

    def stop(self) -> None:
        """Stop beating and remove the key: the held set stays, for the reconciler to hand over at once."""
        self._stop.set()
        self._thread.join(self.every + 1)
        try:
            self._redis.delete(self.key)
        except redis.RedisError:
            pass


def receiver_alive(client: redis.Redis) -> bool:
    """Whether a callback receiver beat within its heartbeat's lifetime (``RECEIVER_KEY``)."""
    return bool(client.exists(RECEIVER_KEY))
