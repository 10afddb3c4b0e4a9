"""What every provider emulator shares: per-endpoint statistics, the provider-side rate
limit, fault injection, and the ``/_emulator/*`` control routes.

The statistics are the referee of the benchmarks: they count what arrived at the
provider, by the provider's clock, whatever the client believes it sent.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class FaultConfig(BaseModel):
    """Failures an emulator injects on its API endpoints, each a probability per request."""

    internal_error_rate: float = 0.0
    http_5xx_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    # A submit the emulator accepts (the task is real, counted and billed) is answered with a 200
    # that carries the task id in a broken shape; each emulator says how (see its
    # ``malformed_answer``). Tests that a client records the id, or fails without resubmitting.
    malformed_accept_rate: float = 0.0


class EmulatorConfig(BaseModel):
    """Base of every emulator's configuration (changed at run time by ``POST /_emulator/config``)."""

    seed: int = 1234
    faults: FaultConfig = FaultConfig()


@dataclass
class EndpointStats:
    requests: int = 0
    accepted: int = 0
    limit_violations: int = 0
    faults_injected: int = 0
    arrivals: list[float] = field(default_factory=list)  # time.time() of every request
    accepted_at: list[float] = field(default_factory=list)  # time.time() of every request served

    def max_in_window(self, window: float = 1.0) -> int:
        """The most requests that arrived within any ``window`` seconds (half-open: (t-window, t])."""
        return max_in_window(self.arrivals, window)

    def as_dict(self) -> dict[str, Any]:
        span = (self.arrivals[-1] - self.arrivals[0]) if len(self.arrivals) > 1 else 0.0
        return {
            "requests": self.requests,
            "accepted": self.accepted,
            "limit_violations": self.limit_violations,
            "faults_injected": self.faults_injected,
            "max_in_1s": self.max_in_window(1.0),
            "first_at": self.arrivals[0] if self.arrivals else None,
            "last_at": self.arrivals[-1] if self.arrivals else None,
            "span_seconds": span,
        }


def max_in_window(times: list[float], window: float = 1.0) -> int:
    ordered = sorted(times)
    best = 0
    for i, t in enumerate(ordered):
        first = bisect.bisect_right(ordered, t - window)
        best = max(best, i - first + 1)
    return best


class SlidingWindowLimit:
    """At most ``limit`` accepted requests in any ``window`` seconds, per key (account+endpoint).

    Stricter than a fixed per-second counter: a client that passes this passes both.
    """

    def __init__(self) -> None:
        self._accepted: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, key: str, limit: float, window: float = 1.0, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._accepted[key]
            while q and q[0] <= now - window:
                q.popleft()
            if len(q) >= limit:
                return False
            q.append(now)
            return True

    def reset(self) -> None:
        with self._lock:
            self._accepted.clear()


class Emulator:
    """State shared by one emulator's routes; subclasses add their API routes."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats: dict[str, EndpointStats] = defaultdict(EndpointStats)
        self.window = SlidingWindowLimit()
        self.extra_stats: dict[str, Any] = {}
        self._client: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        """One client for every outgoing request (downloads, callbacks), built on first use.

        Why shared: building an httpx client loads a TLS context, ~30 ms of CPU on the
        event loop; one per request stalled every other request the emulator was serving.
        Timeouts are given per request.
        """
        if self._client is None:
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        return self._client

    def arrive(self, endpoint: str) -> EndpointStats:
        stats = self.stats[endpoint]
        stats.requests += 1
        stats.arrivals.append(time.time())
        return stats

    def accept(self, endpoint: str) -> None:
        """The request was served (not refused by a limit, a fault or a validation error)."""
        stats = self.stats[endpoint]
        stats.accepted += 1
        stats.accepted_at.append(time.time())

    def roll(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    def malformed_accept(self, endpoint: str) -> bool:
        """Whether this accepted request gets a broken answer (``faults.malformed_accept_rate``).

        Counted as an injected fault, and still as accepted by the caller: the task exists.
        """
        if not self.roll(self.config.faults.malformed_accept_rate):
            return False
        self.stats[endpoint].faults_injected += 1
        return True

    async def maybe_slow(self, endpoint: str) -> None:
        faults = self.config.faults
        if self.roll(faults.slow_rate):
            self.stats[endpoint].faults_injected += 1
            await asyncio.sleep(faults.slow_seconds)

    def timelines(self) -> dict[str, Any]:
        """Time series an emulator keeps for the benchmarks (``GET /_emulator/stats?arrivals=1``)."""
        return {}

    def reset(self) -> None:
        self.stats.clear()
        self.window.reset()
        self.extra_stats.clear()

    # -- control routes --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"endpoints": {name: s.as_dict() for name, s in self.stats.items()}, **self.extra_stats}

    async def _stats(self, request: Request) -> JSONResponse:
        payload = self.snapshot()
        if request.query_params.get("arrivals"):
            payload["arrivals"] = {name: s.arrivals for name, s in self.stats.items()}
            payload["accepted_at"] = {name: s.accepted_at for name, s in self.stats.items()}
            payload.update(self.timelines())
        return JSONResponse(payload)

    async def _config(self, request: Request) -> JSONResponse:
        if request.method == "POST":
            changes = await request.json()
            merged = _deep_merge(self.config.model_dump(), changes)
            self.config = type(self.config).model_validate(merged)
        return JSONResponse(self.config.model_dump())

    async def _reset(self, request: Request) -> JSONResponse:
        self.reset()
        return JSONResponse({"reset": True})

    def control_routes(self) -> list[Route]:
        return [
            Route("/_emulator/stats", self._stats, methods=["GET"]),
            Route("/_emulator/config", self._config, methods=["GET", "POST"]),
            Route("/_emulator/reset", self._reset, methods=["POST"]),
            Route("/_emulator/health", lambda request: JSONResponse({"ok": True}), methods=["GET"]),
        ]


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
