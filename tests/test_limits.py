"""The global limiter against a real redis-server: several processes hammer one key."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import redis

from emulators.common import max_in_window
from pipeline.errors import RateWait
from pipeline.limits import Rate, RateLimiter
from pipeline.polling import PollPolicy

RATE = Rate(5, per=1.0)


def _hammer(url: str, key: str, seconds: float, out: mp.Queue) -> None:
    limiter = RateLimiter(redis.Redis.from_url(url), safety=0.99)
    grants = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        grants.append(limiter.acquire(key, RATE, max_wait=5.0))
    out.put(grants)


def test_several_processes_never_exceed_the_rate_and_still_use_it(stack):
    url = stack.env["DOCPIPE_REDIS_URL"]
    key = f"test:hammer:{time.time()}"
    out: mp.Queue = mp.get_context("spawn").Queue()
    ctx = mp.get_context("spawn")
    seconds = 4.0
    procs = [ctx.Process(target=_hammer, args=(url, key, seconds, out)) for _ in range(6)]
    for p in procs:
        p.start()
    grants = sorted(g for _ in procs for g in out.get(timeout=60))
    for p in procs:
        p.join(10)

    assert len({round(g, 6) for g in grants}) == len(grants)
    # By Redis' own clock, no 1-second window holds more than the rate...
    assert max_in_window(grants, 1.0) <= RATE.count
    # ...and the processes together got (nearly) every grant the rate allows: the
    # window is 1/0.99 s, so a full log gives 5 grants per 1.0101 s.
    span = grants[-1] - grants[0]
    assert len(grants) >= RATE.count * (span / (1 / 0.99)) - 1
    assert len(grants) >= seconds * RATE.count * 0.8


def test_a_slot_nobody_claimed_on_time_is_still_there_later_in_its_window(stack):
    limiter = RateLimiter(redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"]))
    key = f"test:credit:{time.time()}"
    first = limiter.acquire(key, RATE, max_wait=0.1)
    time.sleep(0.5)  # idle: an evenly spaced schedule would have lost two grants here
    later = [limiter.acquire(key, RATE, max_wait=0.5) for _ in range(RATE.count - 1)]
    assert later[-1] - first < 1.0  # all five inside one window
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert min(gaps) >= RATE.interval() / 2 - 1e-4  # yet never closer than half the documented pace
    wait, now = limiter.try_acquire(key, RATE)
    assert wait > 0 and abs((now + wait) - (first + RATE.per)) < 1e-3  # the sixth: exactly when the first leaves


def test_only_one_thread_per_process_sleeps_for_a_key_when_alone(stack):
    limiter = RateLimiter(redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"]))
    key = f"test:alone:{time.time()}"
    rate = Rate(2, per=1.0)
    limiter.acquire(key, rate, max_wait=0.1)
    limiter.acquire(key, rate, max_wait=1.0)  # the window is full for ~1 s now
    outcome: dict[str, object] = {}

    def waiter() -> None:
        outcome["waiter"] = limiter.acquire(key, rate, max_wait=1.5, alone=True)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)  # the waiter is asleep, holding the gate
    started = time.monotonic()
    try:
        limiter.acquire(key, rate, max_wait=1.5, alone=True)
    except RateWait as refused:
        assert 0 < refused.delay <= 1.0
    else:
        raise AssertionError("a second thread must not sleep for the same key")
    assert time.monotonic() - started < 0.1  # refused at once, its thread free for other work
    thread.join(3)
    assert isinstance(outcome.get("waiter"), float)  # the one waiter got the freed slot


def test_a_far_token_raises_ratewait_instead_of_sleeping(stack):
    limiter = RateLimiter(redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"]))
    slow = Rate(1, per=30.0)
    key = f"test:slow:{time.time()}"
    limiter.acquire(key, slow, max_wait=0.1)
    started = time.monotonic()
    try:
        limiter.acquire(key, slow, max_wait=0.5)
    except RateWait as wait:
        assert 29.0 < wait.delay <= 30.0
    else:
        raise AssertionError("a token 30 s away must not be granted")
    assert time.monotonic() - started < 0.5


def test_refused_callers_take_nothing(stack):
    limiter = RateLimiter(redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"]))
    key = f"test:refused:{time.time()}"
    rate = Rate(2, per=1.0)
    assert limiter.try_acquire(key, rate)[0] == 0
    refusals = [limiter.try_acquire(key, rate)[0] for _ in range(50)]
    assert all(0 < wait <= 0.5 for wait in refusals)
    time.sleep(max(refusals[-1], 0) + 0.01)
    assert limiter.try_acquire(key, rate)[0] == 0  # 50 refusals did not push the schedule back


def test_poll_policy_backs_off_with_jitter_and_caps():
    policy = PollPolicy(first_delay=30, base_delay=2, multiplier=2, max_delay=60, deadline=3600)
    assert policy.next_delay(0) == 30
    delays = [policy.next_delay(n) for n in range(1, 12)]
    assert all(d <= 60 for d in delays)
    assert 1.5 <= delays[0] <= 2 and delays[-1] >= 45
    assert policy.expired(0, 3601) and not policy.expired(0, 3599)
