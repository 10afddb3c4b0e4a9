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
from collections.abc import Callable
from dataclasses import dataclass

import redis

from pipeline import metrics
from pipeline.errors import RateWait

log = logging.getLogger(__name__)

MIN_RETRY = 0.05  # seconds: the soonest a refused caller is told to ask again
LATE_ENOUGH_TO_RECORD = 0.010  # seconds: later than this (the lateness a grant tolerates), a request's real departure replaces its send time

# KEYS[1] = log of scheduled send times (newest first, Redis times in µs; every one of the last
# window, however many: see the trimming below); ARGV[1] = requests per
# window, ARGV[2] = window (µs), ARGV[3] = least spacing between two sends (µs), ARGV[4] = the
# caller's lead (µs): how long after this script runs its request can leave at the earliest,
# ARGV[5] = how much later than that the caller is ready to wait for its send time (µs),
# ARGV[6] = the caller's place in the queue of refused callers (µs): -1 when it does not queue,
# 0 when it queues and has no turn yet, else the turn it was given; KEYS[2] = the queue's last
# turn handed out (µs). Without a queue the next free send time goes to the first who asks (first
# come, first served, whatever each caller's lead). A queueing caller refused is given a turn, one
# interval after the last one; it is served when its turn comes within half an interval of the
# next free send time, and a newcomer is served only when the queue has been served by then. A
# send time already due and still free goes to whoever asks: its turn's holder comes back ahead
# of it, so it is late or dead (a killed worker's), and the queue must not stall on it. Returns
# {wait, now, at, turn}: wait is 0 when a send time was granted (at, by Redis' clock), else the µs
# to wait before asking again; now is Redis' clock (µs) when the script ran; turn the caller's.
_SLIDING_LOG_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local lead = tonumber(ARGV[4])
local at = now + lead
local newest = redis.call('LINDEX', KEYS[1], 0)
if newest then
  at = math.max(at, tonumber(newest) + tonumber(ARGV[3]))
end
local oldest = redis.call('LINDEX', KEYS[1], limit - 1)
if oldest then
  at = math.max(at, tonumber(oldest) + window)
end
local turn = tonumber(ARGV[6])
if turn >= 0 and at > now + lead then
  local interval = math.floor(window / limit)
  if turn == 0 then
    local last = tonumber(redis.call('GET', KEYS[2]) or '0')
    if last + interval > at or at > now + lead + tonumber(ARGV[5]) then
      turn = math.max(at, last + interval)
      redis.call('SET', KEYS[2], string.format('%.0f', turn), 'PX', math.ceil((turn - now + window) / 1000) + 1000)
      return {turn - now - lead, now, 0, turn}
    end
  elseif turn > at + interval / 2 then
    return {turn - now - lead, now, 0, turn}
  end
end
if at > now + lead + tonumber(ARGV[5]) then
  return {at - now - lead, now, 0, math.max(turn, 0)}
end
redis.call('LPUSH', KEYS[1], string.format('%.0f', at))
-- Trimmed by age, not to the limit's count: an entry bounds every grant less than a window after
-- it, and the grant that pushed it out of a count can be given back (its request never left).
-- Trimmed to the count, the next caller then found a log without it and was granted a send
-- time a spacing after the second-newest: three requests in one provider second.
local oldest_kept = now - window
local tail = redis.call('LINDEX', KEYS[1], -1)
while tail and tonumber(tail) <= oldest_kept do
  redis.call('RPOP', KEYS[1])
  tail = redis.call('LINDEX', KEYS[1], -1)
end
-- The log lives until a window after its furthest send time: a grant made up to the horizon
-- ahead must still be in the log for the whole window that follows it. (It lived a window from
-- *now*: a send time granted 2 s ahead outlived its log, the next caller found it empty, and
-- three requests went out within a second.)
redis.call('PEXPIRE', KEYS[1], math.ceil((at - now + window) / 1000) + 1000)
return {0, now, at, 0}
"""


# KEYS[1] = the log; ARGV[1] = a send time it holds (µs), ARGV[2] = when that request really left
# (µs, Redis clock), ARGV[3] = the window (µs). Moves the entry to the real time, keeping the log
# newest first: the grants that follow count from when the request left. The log then lives
# until a window after its furthest entry.
_RESCHEDULE_LUA = """
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
local found = false
for i, v in ipairs(entries) do
  if v == ARGV[1] then entries[i] = ARGV[2]; found = true; break end
end
if not found then return 0 end
table.sort(entries, function(a, b) return tonumber(a) > tonumber(b) end)
redis.call('DEL', KEYS[1])
redis.call('RPUSH', KEYS[1], unpack(entries))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(entries[1]) - now + tonumber(ARGV[3])) / 1000) + 1000)
return 1
"""


# KEYS[1] = the log; ARGV[1] = a send time it holds (µs). A grant whose request never left is
# taken out, so the slot it held is free again for whoever asks next (its caller, asking again).
_GIVE_BACK_LUA = """
return redis.call('LREM', KEYS[1], 1, ARGV[1])
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
    """Redis' clock as this process sees it, and how long its answers take to reach us.

    The offset is taken from the fastest of the recent round trips (the filter NTP uses): the
    faster the round trip, the less its asymmetry can mislead. The lead is the recent 90th
    percentile of the time from the script running in Redis to its answer being here: asking
    for send times at least that far ahead, a caller almost always gets its answer in time.
    """

    def __init__(self, samples: int = 32) -> None:
        self._lock = threading.Lock()
        self._trips: deque[tuple[float, float]] = deque(maxlen=samples)  # (round trip, offset)
        self._lateness: deque[float] = deque(maxlen=samples * 2)

    def observe(self, asked: float, answered: float, redis_now: float) -> None:
        with self._lock:
            self._trips.append((answered - asked, redis_now - (asked + answered) / 2))
            offset = min(self._trips)[1]
            self._lateness.append(max(0.0, answered - (redis_now - offset)))

    def local(self, redis_time: float) -> float:
        """A Redis timestamp on this process' wall clock."""
        with self._lock:
            offset = min(self._trips)[1] if self._trips else 0.0
        return redis_time - offset

    def lead(self) -> float:
        with self._lock:
            ordered = sorted(self._lateness)
        return (ordered[int(0.9 * (len(ordered) - 1))] if ordered else 0.0) + 0.002

    def calibrate(self, client: redis.Redis, trips: int = 5) -> None:
        """Measure a few plain round trips before the first grant: the very first calls also open
        the connection and load the script, so their round trips are lopsided and would put the
        offset out by a whole round trip."""
        with self._lock:
            if len(self._trips) >= trips:
                return
        for _ in range(trips):
            asked = time.time()
            seconds, micros = client.time()
            self.observe(asked, time.time(), seconds + micros / 1_000_000)


class _Durations:
    """Recent durations of one step (the 90th percentile of the last few), to start it that far ahead."""

    def __init__(self, samples: int = 32, first_guess: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._seen: deque[float] = deque(maxlen=samples)
        self._first_guess = first_guess

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seen.append(seconds)

    def p90(self) -> float:
        with self._lock:
            ordered = sorted(self._seen)
        return ordered[int(0.9 * (len(ordered) - 1))] if ordered else self._first_guess


class RateLimiter:
    """Grants send times from Redis-held sliding-window logs, one log per key.

    ``safety`` < 1 widens each window a little (1 s / 0.97 = 1.031 s), a margin for the
    spread between our send times and the provider's arrival stamps; ``spacing`` is the least
    gap between two sends, as a fraction of the documented interval.

    Why the log holds *send* times: with Redis a network hop away, a grant reaches its caller a
    round trip later, and round trips vary; what the provider counts is when requests arrive.
    So each caller asks for a send time far enough ahead to have its answer by then (its
    recent answer delay, the "lead"), and sleeps until that time, translated from Redis' clock
    to its own. Every request leaves at the time the log holds for it, whichever process sent
    it and however far its Redis is; only a send that is late by more than a third of the
    margin is given up and asked again. The lead follows the network, so at any distance nearly
    every grant is used: the limiter slows down with Redis, never stops.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "docpipe:ratelog", safety: float = 1.0, spacing: float = 0.5) -> None:
        self._redis = client
        self._prefix = prefix
        self._safety = safety
        self._spacing = spacing
        self._script = client.register_script(_SLIDING_LOG_LUA)
        self._reschedule = client.register_script(_RESCHEDULE_LUA)
        self._give_back = client.register_script(_GIVE_BACK_LUA)
        self._before_send_takes: dict[str, _Durations] = {}
        self._gates: dict[str, threading.Lock] = {}
        self._clock = _RedisClock()
        self.late_sends = 0  # send times given up because they reached us too late (a metric, not an error)

    def _ask(self, key: str, rate: Rate, lead: float, horizon: float, turn: float | None = None) -> tuple[float, float, float, float]:
        """One try: (seconds to wait, Redis time, send time or 0, the caller's turn or 0)."""
        window_us = max(1, int(rate.per / self._safety * 1_000_000))
        spacing_us = int(rate.interval() * self._spacing * 1_000_000)
        asked = time.time()
        wait_us, now_us, at_us, turn_us = self._script(
            keys=[f"{self._prefix}:{key}", f"{self._prefix}:{key}:turns"],
            args=[
                rate.count, window_us, spacing_us, int(lead * 1_000_000), int(max(0.0, horizon) * 1_000_000),
                -1 if turn is None else round(turn * 1_000_000),
            ],
        )
        self._clock.observe(asked, time.time(), int(now_us) / 1_000_000)
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000, int(at_us) / 1_000_000, int(turn_us) / 1_000_000

    def try_acquire(self, key: str, rate: Rate, lead: float = 0.0) -> tuple[float, float]:
        """Take a send time ``lead`` from now if one is free: (0, send time), else (seconds to wait, Redis time)."""
        wait, now, at, _ = self._ask(key, rate, lead, 0.0)
        return (0.0, at) if at else (wait, now)

    def acquire(
        self,
        key: str,
        rate: Rate,
        *,
        max_wait: float,
        alone: bool = False,
        before_send: Callable[[], None] | None = None,
        turn: float | None = None,
    ) -> float:
        """Block until this process' request may leave, sleeping at most ``max_wait`` in all; return its
        send time (Redis clock).

        When the next send time is further away than what is left of ``max_wait``, raise
        ``RateWait`` so that the caller re-schedules instead of holding its worker. With
        ``alone``, at most one thread of this process sleeps for ``key`` at a time; the
        others are refused at once. Polls use it: one waiter per process is always there to
        take a slot the moment it frees, and the other threads stay free for other work.

        ``before_send`` runs once a send time is granted and before sleeping until it (a submit
        records that it is about to leave): what it costs is asked for ahead, so the request
        still leaves on time. Whatever it raises, the grant is given up unused.

        ``turn`` (not None) makes the caller queue: refused, it is given a turn in the queue of
        refused callers (``RateWait.turn``), and comes back with it (0.0 before it has one).
        Submits queue: a backlog of documents racing for each send time held a worker thread
        about a second per try, nine tries per document at baidu's 2/s, and the threads it
        held were the ones due polls waited for. Queued, a document tries twice: once to join,
        once when its turn comes.
        """
        if not alone:
            return self._acquire(key, rate, max_wait, before_send, turn)
        gate = self._gates.setdefault(key, threading.Lock())
        if not gate.acquire(blocking=False):
            return self._acquire(key, rate, 0.0, before_send)
        try:
            return self._acquire(key, rate, max_wait, before_send)
        finally:
            gate.release()

    def _acquire(
        self, key: str, rate: Rate, max_wait: float, before_send: Callable[[], None] | None = None, turn: float | None = None
    ) -> float:
        started = time.monotonic()
        deadline = started + max_wait
        self._clock.calibrate(self._redis)
        # What runs between grant and send (a submit recording that it leaves: Redis round trips)
        # is timed, and started that far ahead of the send time; the grant is asked for that much
        # further ahead, so the request still leaves on time however far Redis is.
        prep = self._before_send_takes.setdefault(key, _Durations(first_guess=2 * self._clock.lead())) if before_send else None
        while True:
            lead = self._clock.lead() + (prep.p90() + 0.002 if prep is not None and before_send is not None else 0.0)
            reach = min(deadline - time.monotonic(), self.reach(rate))
            wait, _, at, given = self._ask(key, rate, lead, reach, turn)
            if turn is not None and not at:
                turn = given
            if at:
                if before_send is not None and prep is not None:
                    early = self._clock.local(at) - time.time() - prep.p90() - 0.002
                    if early > 0:
                        time.sleep(early)
                    begun = time.monotonic()
                    try:
                        before_send()
                    except BaseException:
                        self.give_back(key, at)
                        raise
                    prep.add(time.monotonic() - begun)
                    before_send = None
                early = self._clock.local(at) - time.time()
                if early > 0:
                    time.sleep(early)
                    early = self._clock.local(at) - time.time()
                if -early <= self.tolerance(rate):
                    metrics.LIMITER_GRANTS.labels(key).inc()
                    metrics.LIMITER_WAIT.labels(key).observe(time.monotonic() - started)
                    return at
                self.late_sends += 1
                self.give_back(key, at)
                log.info("rate limit %s: send time reached us %.0f ms late; given back, asking again", key, -early * 1000)
                continue
            if time.monotonic() + wait > deadline:
                metrics.LIMITER_DEFERRALS.labels(key).inc()
                # Come back when the slot is within reach, not when it is due: the first caller
                # back takes it and sleeps until it, so it is used on time. Told to come back when
                # it was due, every caller came back after it (a re-schedule takes a broker round
                # trip and some spread), and the slot went by unused.
                raise RateWait(key, max(MIN_RETRY, wait - min(max_wait, self.reach(rate))), turn=turn)
            time.sleep(max(MIN_RETRY, wait - reach))

    @staticmethod
    def reach(rate: Rate) -> float:
        """How far ahead of its send time a grant may be made: half a window.

        A request that leaves late moves its log entry to when it really left (``left_at``), so
        the grants that follow count a whole window from its departure, but only those granted
        after the move. The grant a window after it is made at most half a window ahead, so the
        late request has left, and said so, half a window before. Granted up to ``max_wait``
        (2 s) ahead, a grant could be made before an earlier request had even left."""
        return rate.per / 2

    def give_back(self, key: str, granted: float) -> None:
        """Take the send time ``granted`` (Redis clock) out of the log: its request never left (a
        thread held past it, a step before the send that failed), so the slot is free again.
        A Redis blip here only costs the slot."""
        try:
            self._give_back(keys=[f"{self._prefix}:{key}"], args=[f"{round(granted * 1_000_000)}"])
        except redis.RedisError as exc:
            log.info("rate limit %s: could not give back an unused send time (%s)", key, type(exc).__name__)

    def late_by(self, granted: float) -> float:
        """Seconds since the send time ``granted`` (Redis clock), by this process' clock (< 0: early)."""
        return time.time() - self._clock.local(granted)

    def left_at(self, key: str, rate: Rate, granted: float, left: float) -> bool:
        """The request granted ``granted`` (Redis clock) really left at ``left`` (this process' clock,
        taken as its headers went out). A request that left late (a thread the machine's load
        held up between its send time and its socket) has its entry in the log moved to when it
        left, so the grants that follow keep a whole window from it. True when moved."""
        late = left - self._clock.local(granted)
        if late <= LATE_ENOUGH_TO_RECORD:
            return False
        window_us = max(1, int(rate.per / self._safety * 1_000_000))
        moved = self._reschedule(
            keys=[f"{self._prefix}:{key}"], args=[f"{round(granted * 1_000_000)}", f"{round((granted + late) * 1_000_000)}", window_us]
        )
        if moved:
            self.late_sends += 1
            log.info("rate limit %s: a request left %.0f ms after its send time; the log counts from then", key, late * 1000)
        return bool(moved)

    def tolerance(self, rate: Rate) -> float:
        """How far a request may leave behind its send time: a third of the margin the widened window
        adds (the rest is for the way from here to the provider's clock)."""
        return rate.per * (1 / self._safety - 1) / 3 if self._safety < 1 else float("inf")


# --- concurrency leases ----------------------------------------------------------------------

def take_lease_lua(leases: str, lease_id: str, limit: str, ttl_ms: str) -> str:
    """Lua that takes a lease when fewer than ``limit`` are held (or lengthens one already held),
    setting ``held`` to 1; the arguments are Lua expressions. A lease already held is only ever
    lengthened here (GT), so a re-delivered task cannot shorten a lease its first delivery
    extended. Shared by the acquire script and the submit's (``jobs.mark_sending_in_slot``),
    which takes the slot and records that the request leaves in one round trip."""
    return f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', {leases}, '-inf', now)
if redis.call('ZSCORE', {leases}, {lease_id}) then
  redis.call('ZADD', {leases}, 'XX', 'GT', now + tonumber({ttl_ms}), {lease_id})
  held = 1
elseif redis.call('ZCARD', {leases}) < tonumber({limit}) then
  redis.call('ZADD', {leases}, now + tonumber({ttl_ms}), {lease_id})
  held = 1
end
"""


# KEYS[1] = lease set (member: lease id, score: expiry in ms by Redis' clock).
# ARGV[1] = lease id, ARGV[2] = limit, ARGV[3] = ttl ms. Returns 1 when the lease is held.
_ACQUIRE_LUA = "local held = 0" + take_lease_lua("KEYS[1]", "ARGV[1]", "ARGV[2]", "ARGV[3]") + "return held"

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



def free_slot_lua(leases: str, freed: str, lease_id: str) -> str:
    """Lua that frees a lease and wakes one waiter, setting ``freed`` to 1 when the lease was held;
    the arguments are the Lua expressions of the lease set, the list waiters block on and the
    lease id. Shared by the release script and the callback receiver's (which frees the slot in
    the round trip that keeps the result): the waiter it wakes is the path that refills the slot."""
    return f"""
if redis.call('ZREM', {leases}, {lease_id}) == 1 then
  redis.call('LPUSH', {freed}, '1')
  redis.call('LTRIM', {freed}, 0, 99)
  redis.call('EXPIRE', {freed}, 3600)
  freed = 1
end
"""


# KEYS[1] = lease set, KEYS[2] = the "freed" list waiters block on; ARGV[1] = lease id.
_RELEASE_LUA = "local freed = 0" + free_slot_lua("KEYS[1]", "KEYS[2]", "ARGV[1]") + "return freed"

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
        self._release = client.register_script(_RELEASE_LUA)

    def keys(self, key: str) -> tuple[str, str]:
        """The lease set of ``key`` and the list its waiters block on."""
        return f"{self._prefix}:{key}", f"{self._prefix}:{key}:freed"

    def try_acquire(self, key: str, lease_id: str, limit: int, ttl: float) -> bool:
        leases, _ = self.keys(key)
        return bool(self._acquire(keys=[leases], args=[lease_id, limit, int(ttl * 1000)]))

    def acquire(
        self, key: str, lease_id: str, limit: int, ttl: float, *, max_wait: float, attempt: Callable[[], bool] | None = None
    ) -> None:
        """Take a lease, waiting up to ``max_wait`` for a release; then ``RateWait`` to re-schedule.

        ``attempt`` replaces ``try_acquire`` for a caller that takes the lease together with a
        write of its own in one script (True once the lease is held).

        The re-scheduled task is due at once: ``max_wait`` is there to give the thread back to the
        queue (where the later stages of other documents go first), not to keep the document out
        of line. Away for a second, it let slots stand empty when it was the last one waiting:
        the end of every batch that waits longer than ``max_wait``.
        """
        leases, freed = self.keys(key)
        deadline = time.monotonic() + max_wait
        take = attempt or (lambda: self.try_acquire(key, lease_id, limit, ttl))
        while not take():
            left = deadline - time.monotonic()
            if left <= 0:
                raise RateWait(key, 0.0, spread=False)
            # Woken by a release; the timeout also catches leases that simply expired.
            self._redis.blpop([freed], timeout=min(left, 0.5))

    def extend(self, key: str, lease_id: str, ttl: float, *, only_if_held: bool = False) -> None:
        """Set the lease to expire ``ttl`` from now; ``only_if_held`` never re-adds a released one."""
        leases, _ = self.keys(key)
        self._extend(keys=[leases], args=[lease_id, int(ttl * 1000), "1" if only_if_held else "0"])

    def release(self, key: str, lease_id: str) -> bool:
        leases, freed = self.keys(key)
        return bool(self._release(keys=[leases, freed], args=[lease_id]))

    def held(self, key: str) -> int:
        leases, _ = self.keys(key)
        return int(self._count(keys=[leases]))
