"""Global rate limits: one sliding-window log per provider endpoint, kept in Redis, shared by every process.

Why a sliding-window log in one Lua script: the providers promise "N requests per second",
and the emulators (like Baidu's error 18) count any 1-second window. The log admits a
request only while fewer than N were granted in the last window, so no window a provider
can look at ever holds more than N. A GCRA spaces tokens exactly 1/N apart and loses every
token nobody claims at its instant: with polls arriving at random it spent 0.88 of Baidu's
get_result rate. The log loses only the moment between a slot's expiry and the next
claim, once per window rather than once per token. A minimum spacing (half the
documented interval) keeps a backlog from leaving in one burst.

The script runs atomically in Redis and reads Redis' own clock, so any number of workers
on any number of machines share one log, and a refused caller takes nothing and learns
exactly how long to wait. Nothing is granted early.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from pipeline.errors import RateWait

log = logging.getLogger(__name__)

# KEYS[1] = grant log (newest first, Redis times in µs); ARGV[1] = requests per window,
# ARGV[2] = window (µs), ARGV[3] = least spacing between two grants (µs).
# Returns {wait, now}: wait is 0 when the request was granted, else the µs until it may be;
# now is Redis' clock (µs), so callers can tell exactly when their grant was made.
_SLIDING_LOG_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local wait = 0
local newest = redis.call('LINDEX', KEYS[1], 0)
if newest then
  wait = math.max(wait, tonumber(newest) + tonumber(ARGV[3]) - now)
end
local oldest = redis.call('LINDEX', KEYS[1], limit - 1)
if oldest then
  wait = math.max(wait, tonumber(oldest) + window - now)
end
if wait > 0 then
  return {wait, now}
end
redis.call('LPUSH', KEYS[1], string.format('%.0f', now))
redis.call('LTRIM', KEYS[1], 0, limit - 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
return {0, now}
"""


@dataclass(frozen=True)
class Rate:
    """``count`` requests in any ``per`` seconds, as a provider documents it."""

    count: int
    per: float = 1.0

    def interval(self) -> float:
        """The documented pace: seconds between two requests when they are evenly spread."""
        return self.per / self.count


class RateLimiter:
    """Grants requests from Redis-held sliding-window logs, one log per key.

    ``safety`` < 1 widens each window a little (1 s / 0.97 = 1.031 s), a margin for the
    time between our grant and the provider's arrival stamp; ``spacing`` is the least gap
    between two grants, as a fraction of the documented interval.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "docpipe:ratelog", safety: float = 1.0, spacing: float = 0.5) -> None:
        self._redis = client
        self._prefix = prefix
        self._safety = safety
        self._spacing = spacing
        self._script = client.register_script(_SLIDING_LOG_LUA)
        self._gates: dict[str, threading.Lock] = {}

    def try_acquire(self, key: str, rate: Rate) -> tuple[float, float]:
        """Take a grant if one is due now: return (0, grant time), else (seconds to wait, Redis time)."""
        window_us = max(1, int(rate.per / self._safety * 1_000_000))
        spacing_us = int(rate.interval() * self._spacing * 1_000_000)
        wait_us, now_us = self._script(keys=[f"{self._prefix}:{key}"], args=[rate.count, window_us, spacing_us])
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000

    def acquire(self, key: str, rate: Rate, *, max_wait: float, alone: bool = False) -> float:
        """Block until a token is taken, sleeping at most ``max_wait`` in all; return when (Redis clock).

        When the next token is further away than what is left of ``max_wait``, raise
        ``RateWait`` so that the caller re-schedules instead of holding its worker. With
        ``alone``, at most one thread of this process sleeps for ``key`` at a time; the
        others are refused at once. Polls use it: one waiter per process is always there to
        take a slot the moment it frees, and the other threads stay free for other work.
        """
        if not alone:
            return self._acquire(key, rate, max_wait)
        gate = self._gates.setdefault(key, threading.Lock())
        if not gate.acquire(blocking=False):
            return self._acquire(key, rate, 0.0)
        try:
            return self._acquire(key, rate, max_wait)
        finally:
            gate.release()

    def _acquire(self, key: str, rate: Rate, max_wait: float) -> float:
        deadline = time.monotonic() + max_wait
        while True:
            asked = time.monotonic()
            wait, now = self.try_acquire(key, rate)
            if wait <= 0:
                if time.monotonic() - asked <= self.stale_after(rate):
                    return now
                # The answer came back late (a slow Redis, or this thread waited for a CPU):
                # the request would leave well after its grant and could land in the same
                # provider window as grants made after it. Spend the grant, ask again.
                log.info("rate limit %s: grant reached us %.0f ms late; not used", key, (time.monotonic() - asked) * 1000)
                continue
            if time.monotonic() + wait > deadline:
                raise RateWait(key, wait)
            time.sleep(wait)

    def stale_after(self, rate: Rate) -> float:
        """The longest a grant may take to reach us: a third of the margin the widened window adds
        (the rest is for the way from here to the provider's clock)."""
        return rate.per * (1 / self._safety - 1) / 3 if self._safety < 1 else float("inf")


# --- concurrency leases ----------------------------------------------------------------------

# KEYS[1] = lease set (member: lease id, score: expiry in ms by Redis' clock).
# ARGV[1] = lease id, ARGV[2] = limit, ARGV[3] = ttl ms. Returns 1 when the lease is held.
# A lease already held is only ever lengthened here (GT), so a re-delivered task cannot
# shorten a lease its first delivery extended.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', 'GT', now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
"""

# Sets a lease's expiry to now + ttl whatever it was; the lease is (re)added even over the
# limit, because it stands for a task the provider has already accepted.
_EXTEND_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' then
  return redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

_COUNT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class LeaseSemaphore:
    """At most ``limit`` leases per key, shared by every process, each with an expiry.

    Why leases and not a counter: a counter leaks a slot whenever its holder dies; a lease
    expires. A lease is taken with a short TTL just before a submit (a worker that dies
    before sending frees it within seconds), lengthened to the document's deadline once the
    provider accepts, and released when the provider is done. A release wakes one waiter.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "docpipe:lease") -> None:
        self._redis = client
        self._prefix = prefix
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._extend = client.register_script(_EXTEND_LUA)
        self._count = client.register_script(_COUNT_LUA)

    def _keys(self, key: str) -> tuple[str, str]:
        return f"{self._prefix}:{key}", f"{self._prefix}:{key}:freed"

    def try_acquire(self, key: str, lease_id: str, limit: int, ttl: float) -> bool:
        leases, _ = self._keys(key)
        return bool(self._acquire(keys=[leases], args=[lease_id, limit, int(ttl * 1000)]))

    def acquire(self, key: str, lease_id: str, limit: int, ttl: float, *, max_wait: float) -> None:
        """Take a lease, waiting up to ``max_wait`` for a release; then ``RateWait`` to re-schedule."""
        leases, freed = self._keys(key)
        deadline = time.monotonic() + max_wait
        while not self.try_acquire(key, lease_id, limit, ttl):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RateWait(key, 1.0)
            # Woken by a release; the timeout also catches leases that simply expired.
            self._redis.blpop([freed], timeout=min(left, 0.5))

    def extend(self, key: str, lease_id: str, ttl: float, *, only_if_held: bool = False) -> None:
        """Set the lease to expire ``ttl`` from now; ``only_if_held`` never re-adds a released one."""
        leases, _ = self._keys(key)
        self._extend(keys=[leases], args=[lease_id, int(ttl * 1000), "1" if only_if_held else "0"])

    def release(self, key: str, lease_id: str) -> bool:
        leases, freed = self._keys(key)
        removed = bool(self._redis.zrem(leases, lease_id))
        if removed:
            pipe = self._redis.pipeline()
            pipe.lpush(freed, "1")
            pipe.ltrim(freed, 0, 99)
            pipe.expire(freed, 3600)
            pipe.execute()
        return removed

    def held(self, key: str) -> int:
        leases, _ = self._keys(key)
        return int(self._count(keys=[leases]))
