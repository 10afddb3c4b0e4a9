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
from collections import deque
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


class _RedisClock:
    """Redis' clock as this process sees it, and how late grants reach us.

    The offset is taken from the fastest of the recent round trips (the filter NTP uses): the
    faster the round trip, the less its asymmetry can mislead. Lateness is how long after its
    grant (by Redis' clock) an answer reaches this process; its recent 90th percentile is the
    delay every grant is held to, so that all requests leave the same time after their grants.
    """

    def __init__(self, samples: int = 32) -> None:
        self._lock = threading.Lock()
        self._trips: deque[tuple[float, float]] = deque(maxlen=samples)  # (round trip, offset)
        self._lateness: deque[float] = deque(maxlen=samples * 2)

    def observe(self, asked: float, answered: float, redis_now: float) -> None:
        with self._lock:
            self._trips.append((answered - asked, redis_now - (asked + answered) / 2))

    def local(self, redis_time: float) -> float:
        """A Redis timestamp on this process' wall clock."""
        with self._lock:
            offset = min(self._trips)[1] if self._trips else 0.0
        return redis_time - offset

    def hold(self, lateness: float) -> float:
        """Record one grant's lateness; return the delay after its grant at which a request leaves."""
        with self._lock:
            self._lateness.append(max(0.0, lateness))
            ordered = sorted(self._lateness)
        return ordered[int(0.9 * (len(ordered) - 1))] + 0.002


class RateLimiter:
    """Grants requests from Redis-held sliding-window logs, one log per key.

    ``safety`` < 1 widens each window a little (1 s / 0.97 = 1.031 s), a margin for the
    spread between our grants and the provider's arrival stamps; ``spacing`` is the least gap
    between two grants, as a fraction of the documented interval.

    Why requests leave a fixed delay after their grant: with Redis a network hop away, a grant
    reaches its caller a round trip later, and round trips vary. What the provider sees is the
    grant times shifted by each request's delay, so only the *spread* of those delays eats the
    margin. Every request is therefore held until its grant time (by Redis' clock, translated
    to ours) plus the usual lateness; a grant that arrives later than that by more than a third
    of the margin is given up and asked again. The usual lateness follows the network, so at
    any distance nearly every grant is used: the limiter slows down with Redis, never stops.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "docpipe:ratelog", safety: float = 1.0, spacing: float = 0.5) -> None:
        self._redis = client
        self._prefix = prefix
        self._safety = safety
        self._spacing = spacing
        self._script = client.register_script(_SLIDING_LOG_LUA)
        self._gates: dict[str, threading.Lock] = {}
        self._clock = _RedisClock()
        self.late_grants = 0  # grants given up because they reached us too late (a metric, not an error)

    def try_acquire(self, key: str, rate: Rate) -> tuple[float, float]:
        """Take a grant if one is due now: return (0, grant time), else (seconds to wait, Redis time)."""
        window_us = max(1, int(rate.per / self._safety * 1_000_000))
        spacing_us = int(rate.interval() * self._spacing * 1_000_000)
        asked = time.time()
        wait_us, now_us = self._script(keys=[f"{self._prefix}:{key}"], args=[rate.count, window_us, spacing_us])
        self._clock.observe(asked, time.time(), int(now_us) / 1_000_000)
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
            wait, now = self.try_acquire(key, rate)
            if wait <= 0:
                granted = self._clock.local(now)
                leave = granted + self._clock.hold(time.time() - granted)
                early = leave - time.time()
                if early > 0:
                    time.sleep(early)
                    early = leave - time.time()
                if -early <= self.tolerance(rate):
                    return now
                self.late_grants += 1
                log.info("rate limit %s: grant reached us %.0f ms late; asking again", key, -early * 1000)
                continue
            if time.monotonic() + wait > deadline:
                raise RateWait(key, wait)
            time.sleep(wait)

    def tolerance(self, rate: Rate) -> float:
        """How far a request may leave behind its schedule: a third of the margin the widened window adds
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
