"""When to poll a provider next.

Two policies:

- ``PollPolicy`` (``DOCPIPE_POLL_POLICY=backoff``): a first delay, then exponential backoff with
  jitter, capped, until a deadline. It knows nothing of the documents, so it either polls often
  (many calls per document) or late (a long wait between the provider finishing and us seeing it).
- ``LearnedSchedule`` (the default, ``adaptive``): polls at multiples of the document's predicted
  processing time, the multiples chosen on the processing times docpipe has observed so far for
  that provider (``ProcessingTimes``, kept in Redis and shared by every worker). The prediction
  uses the document's size or page count when the observations say that predicts the time, and
  the provider's overall spread when not. Until enough documents have been seen it is the
  backoff policy.

Why multiples of a prediction: a result call costs the same whenever it is made, and the only
thing that decides whether it is wasted is whether the provider has finished. Polling at the
right quantile of the document's own distribution spends about one call per document and sees
most of them finish within a few percent of their processing time; a fixed ladder of delays
cannot do both for documents of 2 s and of 2 minutes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PollPolicy:
    first_delay: float
    base_delay: float
    multiplier: float
    max_delay: float
    deadline: float  # seconds after submit

    def next_delay(self, polls_done: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before poll number ``polls_done + 1``."""
        if polls_done == 0:
            return self.first_delay
        raw = min(self.max_delay, self.base_delay * self.multiplier ** (polls_done - 1))
        return (rng or random).uniform(0.75, 1.0) * raw

    def expired(self, submitted_at: float, now: float) -> bool:
        return now - submitted_at > self.deadline


class Lateness:
    """How long after the moment it was asked for a poll really runs (the countdown, the broker, a
    free worker thread), kept per process: the adaptive schedule asks that much earlier, so the
    poll happens when the schedule meant it to, not a fraction of a second after."""

    def __init__(self, keep: int = 64) -> None:
        self._lock = threading.Lock()
        self._seen: deque[float] = deque(maxlen=keep)

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._seen.append(min(max(0.0, seconds), 5.0))

    def typical(self) -> float:
        with self._lock:
            return statistics.median(self._seen) if self._seen else 0.0


# --- what was observed ------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One document's processing time at the provider, with what might have predicted it."""

    seconds: float
    size: int | None = None
    pages: int | None = None
    uncertainty: float = 0.0  # standard deviation of ``seconds`` (what we know is an interval around it)


def observed_processing(
    submitted_at: float, not_done_at: float | None, done_at: float, reported: tuple[float, float] | None = None
) -> tuple[float, float]:
    """How long the provider took, and the standard deviation of that figure, from what we know: it
    was not done at our last poll that said so (``not_done_at``), it was done at ``done_at``, and
    the provider may have said how long it took, to within an interval (``reported``: a duration
    given to the second). The middle of what both leave open (of our polls' interval alone when
    the two disagree, clocks apart, or there is no report); the interval's width, as the spread
    of a uniform draw over it, is the uncertainty."""
    low = max(0.0, (not_done_at or submitted_at) - submitted_at)
    high = max(low, done_at - submitted_at)
    spread = math.sqrt(12)  # width / spread: anywhere in our polls' interval, alike
    if reported is not None:
        both = max(low, reported[0]), min(high, reported[1])
        if both[0] <= both[1]:
            # A difference of two stamps to the second is off by a triangular error over (-1, 1):
            # a spread of width / sqrt(24), half the variance of a uniform one.
            low, high, spread = both[0], both[1], math.sqrt(24)
    return (low + high) / 2, (high - low) / spread


class ProcessingTimes:
    """The last ``keep`` processing times per provider, in Redis: every worker adds what it sees
    and plans with what all have seen. Models are rebuilt at most every ``refresh`` seconds per
    process (a poll decision must not cost a Redis round trip and a fit)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "docpipe:processing", keep: int = 256, refresh: float = 15.0) -> None:
        self._redis = client
        self._prefix = prefix
        self._keep = keep
        self._refresh = refresh
        self._lock = threading.Lock()
        self._models: dict[str, tuple[float, LearnedSchedule | None]] = {}

    def observe(self, provider: str, observation: Observation) -> None:
        key = f"{self._prefix}:{provider}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.lpush(key, json.dumps([round(observation.seconds, 3), observation.size, observation.pages, round(observation.uncertainty, 3)]))
        pipe.ltrim(key, 0, self._keep - 1)
        pipe.expire(key, 7 * 24 * 3600)
        pipe.execute()

    def samples(self, provider: str) -> list[Observation]:
        raw = self._redis.lrange(f"{self._prefix}:{provider}", 0, -1)
        return [Observation(*json.loads(item)) for item in raw]

    def schedule(self, provider: str, *, budget: float, min_samples: int) -> LearnedSchedule | None:
        now = time.monotonic()
        with self._lock:
            cached = self._models.get(provider)
        if cached is not None and now - cached[0] < self._refresh:
            return cached[1]
        try:
            model = LearnedSchedule.fit(self.samples(provider), budget=budget, min_samples=min_samples)
        except redis.RedisError as exc:
            log.info("processing times of %s unavailable (%s); polling by backoff", provider, type(exc).__name__)
            model = cached[1] if cached is not None else None
        with self._lock:
            self._models[provider] = (now, model)
        return model


# --- the learned schedule ---------------------------------------------------------------------

MAX_RELATIVE_UNCERTAINTY = 0.25
_GRID_FIRST = [0.80 + 0.02 * i for i in range(36)]  # the first poll, as a multiple of the prediction
_GRID_GROWTH = [1.04, 1.07, 1.1, 1.15, 1.2, 1.3, 1.5]  # each later poll this much further out


@dataclass(frozen=True)
class LearnedSchedule:
    """Poll number k (from 0) at ``first * growth**k`` times the document's predicted processing time.

    ``predictor`` is what the prediction is built on: ``size`` or ``pages`` (log-linear fits,
    ``log t = a + b log x``) or ``none`` (the provider's median); the one whose residuals are the
    narrowest on the observations wins. ``first`` and ``growth`` are the pair that sees the
    observed documents finish soonest (median delay as a share of processing time) while
    spending at most ``budget`` calls per document on them.
    """

    predictor: str
    intercept: float
    slope: float
    first: float
    growth: float
    samples: int
    expected_calls: float
    median_delay_share: float

    @classmethod
    def fit(cls, observations: Sequence[Observation], *, budget: float, min_samples: int) -> LearnedSchedule | None:
        usable = [o for o in observations if o.seconds > 0]
        # A time known only to within a quarter of itself (a 2 s task reported to the second)
        # says little about the spread: learn from the precise ones when there are enough.
        precise = [o for o in usable if o.uncertainty <= MAX_RELATIVE_UNCERTAINTY * o.seconds]
        usable = precise if len(precise) >= min_samples else usable
        if len(usable) < min_samples:
            return None
        candidates = [("none", *_fit_constant(usable))]
        for predictor in ("size", "pages"):
            xs = [_feature(o, predictor) for o in usable]
            if all(x is not None for x in xs) and len({x for x in xs}) > 1:
                weights = [1.0 / (0.05**2 + (o.uncertainty / o.seconds) ** 2) for o in usable]  # the coarse count less
                candidates.append((predictor, *_fit_line([x for x in xs if x is not None], [math.log(o.seconds) for o in usable], weights)))
        best = None
        for predictor, intercept, slope in candidates:
            ratios = [o.seconds / _predict(o, predictor, intercept, slope) for o in usable]
            ordered = sorted(ratios)
            spread = math.log(_quantile(ordered, 0.9)) - math.log(_quantile(ordered, 0.1))
            if best is None or spread < best[0]:
                best = (spread, predictor, intercept, slope, ratios)
        assert best is not None
        _, predictor, intercept, slope, ratios = best
        ratios = _without_resolution(ratios, [o.uncertainty / o.seconds for o in usable])
        first, growth, calls, share = _choose_multiples(ratios, budget)
        return cls(predictor, intercept, slope, first, growth, len(usable), calls, share)

    def predict(self, size: int | None, pages: int | None) -> float | None:
        """Predicted processing seconds for a document, or None when it lacks what the fit needs."""
        x = _feature(Observation(1.0, size, pages), self.predictor)
        if self.predictor != "none" and x is None:
            return None
        return math.exp(self.intercept + self.slope * (x or 0.0))

    def poll_at(self, polls_done: int, predicted: float) -> float:
        """Seconds after submit for poll number ``polls_done + 1``."""
        return predicted * self.first * self.growth**polls_done


def _feature(o: Observation, predictor: str) -> float | None:
    if predictor == "size":
        return math.log(o.size) if o.size else None
    if predictor == "pages":
        return math.log(o.pages) if o.pages else None
    return 0.0


def _predict(o: Observation, predictor: str, intercept: float, slope: float) -> float:
    return math.exp(intercept + slope * (_feature(o, predictor) or 0.0))


def _fit_constant(observations: Sequence[Observation]) -> tuple[float, float]:
    return statistics.median(math.log(o.seconds) for o in observations), 0.0


def _fit_line(xs: list[float], ys: list[float], weights: list[float]) -> tuple[float, float]:
    """Weighted least squares of ``y = a + b x``."""
    total = sum(weights)
    mx = sum(w * x for w, x in zip(weights, xs)) / total
    my = sum(w * y for w, y in zip(weights, ys)) / total
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(weights, xs))
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(weights, xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, int(q * (len(ordered) - 1))))]


def _without_resolution(ratios: list[float], relative_uncertainty: list[float]) -> list[float]:
    """Take out of the observed spread what the measurements' resolution put there.

    Each observed time is known to within its uncertainty (a provider that reports whole
    seconds: about 0.6 s either way on a 7 s document), so the ratios spread wider than the
    processing times do, and a schedule planned on that spread polls later than it needs to.
    The true spread is estimated by subtracting each measurement's variance (in log terms) from
    its squared deviation; each ratio then moves toward the median so that its deviation keeps
    only the true spread's share of its own variance."""
    logs = [math.log(r) for r in ratios]
    centre = statistics.median(logs)
    noise = [u * u for u in relative_uncertainty]
    true = max(0.0, statistics.fmean((x - centre) ** 2 - n for x, n in zip(logs, noise)))
    return sorted(math.exp(centre + (x - centre) * math.sqrt(true / (true + n)) if true + n > 0 else centre) for x, n in zip(logs, noise))


def _choose_multiples(ratios: Sequence[float], budget: float) -> tuple[float, float, float, float]:
    """The (first, growth) that minimises the median delay share of the observed ratios (actual /
    predicted processing time) within ``budget`` calls per document; the cheapest pair if none fits."""
    best: tuple[float, float, float, float] | None = None
    cheapest: tuple[float, float, float, float] | None = None
    for first in _GRID_FIRST:
        for growth in _GRID_GROWTH:
            calls, share = _replay(ratios, first, growth)
            pick = (first, growth, calls, share)
            if cheapest is None or calls < cheapest[2]:
                cheapest = pick
            if calls <= budget and (best is None or share < best[3]):
                best = pick
    chosen = best or cheapest
    assert chosen is not None
    return chosen


def _replay(ratios: Sequence[float], first: float, growth: float) -> tuple[float, float]:
    """Mean calls and median delay share if documents with these ratios had been polled so."""
    calls, shares = 0, []
    step = math.log(growth)
    for ratio in ratios:
        k = max(0, math.ceil(math.log(ratio / first) / step - 1e-9)) if ratio > first else 0
        at = first * growth**k
        calls += k + 1
        shares.append((at - ratio) / ratio)
    return calls / len(ratios), statistics.median(shares)
