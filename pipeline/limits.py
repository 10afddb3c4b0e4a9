"""Global rate limits: one GCRA per provider endpoint, kept in Redis, shared by every process.

Why GCRA in one Lua script rather than a per-worker bucket: the script runs atomically
in Redis and reads Redis' own clock, so any number of workers on any number of machines
see one schedule, and a caller that is refused learns exactly how long to wait. The
limiter never lends tokens early; a refused caller takes nothing.

The state per key is one number, the theoretical arrival time (TAT) in microseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from pipeline.errors import RateWait

# KEYS[1] = limiter key; ARGV[1] = emission interval (µs); ARGV[2] = burst (tokens).
# Returns {wait, now}: wait is 0 when a token was taken, else the microseconds until one may
# be; now is Redis' clock (µs), so callers can tell exactly when their token was granted.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {allow_at - now, now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {0, now}
"""


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``per`` seconds, as a provider documents it; ``burst`` extra are never assumed."""

    count: float
    per: float = 1.0
    burst: int = 1

    def interval(self, safety: float = 1.0) -> float:
        """Seconds between two tokens; ``safety`` < 1 spaces them a little wider than documented."""
        return self.per / (self.count * safety)


class RateLimiter:
    """Takes tokens from Redis-held GCRA schedules, one schedule per key."""

    def __init__(self, client: redis.Redis, *, prefix: str = "docpipe:rate", safety: float = 1.0) -> None:
        self._redis = client
        self._prefix = prefix
        self._safety = safety
        self._script = client.register_script(_GCRA_LUA)

    def try_acquire(self, key: str, rate: Rate) -> tuple[float, float]:
        """Take a token if one is due now: return (0, grant time), else (seconds to wait, Redis time)."""
        interval_us = max(1, int(rate.interval(self._safety) * 1_000_000))
        wait_us, now_us = self._script(keys=[f"{self._prefix}:{key}"], args=[interval_us, rate.burst])
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000

    def acquire(self, key: str, rate: Rate, *, max_wait: float) -> float:
        """Block until a token is taken, sleeping at most ``max_wait`` in all; return when (Redis clock).

        When the next token is further away than what is left of ``max_wait``, raise
        ``RateWait`` so that the caller re-schedules instead of holding its worker.
        """
        deadline = time.monotonic() + max_wait
        while True:
            wait, now = self.try_acquire(key, rate)
            if wait <= 0:
                return now
            if time.monotonic() + wait > deadline:
                raise RateWait(key, wait)
            time.sleep(wait)


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
