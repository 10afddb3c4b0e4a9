"""What every provider emulator shares: per-endpoint statistics, the provider-side rate
limit, fault injection, and the ``/_emulator/*`` control routes.

The statistics are the referee of the benchmarks: they count what arrived at the
provider, by the provider's clock, whatever the client believes it sent; ``documents``
counts what the provider accepted by content, so a document billed twice shows.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import random
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from emulators.wire import wire_stamp


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
    # The connection is closed with no HTTP answer at all, and the request is not processed. The
    # client cannot tell this from an answer lost on the way back, so it must find out (or ask)
    # before sending again. See ``DroppedConnection``.
    drop_rate: float = 0.0
    # The provider's own "too fast" answer to a request that is within its limit (each emulator
    # says which answer, or that its seed documents none). Counted in ``faults_injected``, never in
    # ``limit_violations``: a violation means the client really went over the limit.
    spurious_limit_rate: float = 0.0
    # Seconds (0: off): every token issued so far goes stale every this many seconds, as
    # ``/_emulator/expire_tokens`` makes them; the boundaries count from when the setting took
    # effect. Emulators without tokens ignore it.
    token_expiry_every: float = 0.0


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
    # The most arrivals in any 1 s, kept as they come: the stats route must not sort every
    # arrival on the event loop (it did, and a busy referee stamped the next requests late).
    max_in_1s: int = 0
    last_stamp_doubt: float = 0.0  # how long the loop had been away when the last arrival was stamped
    # The doubt of each arrival of the last 2 s (stamp, doubt): a violation's record needs the
    # doubt of the window's first stamp, whose lateness shortens the window as much as any.
    _recent_doubts: deque[tuple[float, float]] = field(default_factory=deque, repr=False)
    violations: list[dict[str, Any]] = field(default_factory=list)  # the first few, with what the referee saw
    # The most a route ran after its request's first bytes were read: what a stamp taken in the
    # route would have trailed the wire by (see emulators.wire).
    route_lag_max: float = 0.0
    last_route_lag: float = 0.0
    _recent: list[float] = field(default_factory=list, repr=False)  # the last 2 s of stamps, in order

    def arrived(self, at: float) -> None:
        """Count a stamp in the most arrivals any 1 s has held. Stamps taken off the wire can come
        a little out of order (two connections, two routes): each is placed where it belongs and
        every second it falls in is counted, not only the one it ends."""
        self.arrivals.append(at)
        recent = self._recent
        bisect.insort(recent, at)
        del recent[: bisect.bisect_right(recent, recent[-1] - 2.0)]
        self.max_in_1s = max(self.max_in_1s, most_in_a_window_holding(recent, at))

    def max_in_window(self, window: float = 1.0) -> int:
        """The most requests that arrived within any ``window`` seconds (half-open: (t-window, t])."""
        return self.max_in_1s if window == 1.0 else max_in_window(self.arrivals, window)

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
            "violations": self.violations,
            "route_lag_max_ms": round(self.route_lag_max * 1000, 1),
        }


def most_in_a_window_holding(ordered: list[float], at: float, window: float = 1.0) -> int:
    """The most stamps of ``ordered`` (sorted, holding ``at``) in any window (t - window, t] that
    holds ``at``: the windows a stamp that came out of order can overfill, not only the one it ends."""
    most = 0
    for last in range(bisect.bisect_left(ordered, at), len(ordered)):
        if ordered[last] - at >= window:
            break
        most = max(most, last - bisect.bisect_right(ordered, ordered[last] - window) + 1)
    return most


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
        """Accept a request stamped ``now`` (monotonic) unless some window holding it would then
        hold more than ``limit``. Stamps taken off the wire can reach here a little out of order
        (two connections, two routes): each is placed where it belongs, and every window it falls
        in is checked, not only the one it ends. Two windows of stamps are kept for that."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._accepted[key]
            while q and q[0] <= max(now, q[-1]) - 2 * window:
                q.popleft()
            if not q or now >= q[-1]:  # in order: only the window it ends can be over
                if len(q) - bisect.bisect_right(q, now - window) >= limit:
                    return False
                q.append(now)
                return True
            stamps = sorted([*q, now])
            if most_in_a_window_holding(stamps, now, window) > limit:
                return False
            self._accepted[key] = deque(stamps)
            return True

    def recent(self, key: str, around: float | None = None, window: float = 1.0) -> list[float]:
        """The accepted arrivals within a window either side of ``around`` (monotonic; default the
        newest), as wall-clock times: the ones a refused request was counted against."""
        shift = time.time() - time.monotonic()
        with self._lock:
            q = list(self._accepted.get(key, ()))
        if not q:
            return []
        around = q[-1] if around is None else around
        return [round(t + shift, 4) for t in q if around - window < t < around + window]

    def reset(self) -> None:
        with self._lock:
            self._accepted.clear()


class ProcessingModel(BaseModel):
    """How long a task takes, for the benchmarks of polling: uniform in [min, max] by default;
    with ``seconds_per_mb`` > 0, proportional to the document's size, times a log-normal factor
    of spread ``noise`` (a provider whose work grows with the document, as OCR's does)."""

    seconds_per_mb: float = 0.0
    noise: float = 0.0

    def draw(self, rng: random.Random, size: int, low: float, high: float) -> float:
        if self.seconds_per_mb <= 0:
            return rng.uniform(low, high)
        return max(0.1, self.seconds_per_mb * size / 1_000_000 * math.exp(rng.gauss(0.0, self.noise)))


@dataclass
class TaskRecord:
    """One task's life as the referee of polling sees it: when it finished, how many result calls
    it took, when the first answer that said "done" left."""

    task_id: str
    created: float
    ready_at: float
    result_calls: int = 0
    seen_done_at: float | None = None

    def asked(self, now: float, done: bool) -> None:
        self.result_calls += 1
        if done and self.seen_done_at is None:
            self.seen_done_at = now

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "processing": self.ready_at - self.created, "result_calls": self.result_calls,
                "delay": None if self.seen_done_at is None else self.seen_done_at - self.ready_at}


class LoopWatch:
    """How late the event loop runs: the referee's own doubt about its arrival stamps.

    A request is stamped when the loop gets to it; if the loop was away (the GIL held by a
    decoding thread, the process not scheduled), the request may have arrived any time since the
    loop last ran. A tick every few milliseconds marks when it last ran, so each stamp carries
    its doubt, and the statistics carry the worst lag seen.
    """

    TICK = 0.004

    def __init__(self) -> None:
        self.last_tick = time.time()
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None
        self._ticks: deque[float] = deque([self.last_tick], maxlen=500)  # the last 2 s of ticks

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.time()
            await asyncio.sleep(self.TICK)
            self.last_tick = time.time()
            self._ticks.append(self.last_tick)
            self.max_lag = max(self.max_lag, self.last_tick - before - self.TICK)

    def doubt(self, stamp: float) -> float:
        """How long before ``stamp`` the loop last ran: the request may have waited that long unread.
        A stamp taken off the wire is older than the route that asks, so the tick is looked up
        before it, not taken as the latest."""
        before = bisect.bisect_right(self._ticks, stamp)
        return max(0.0, stamp - self._ticks[before - 1] - self.TICK) if before else 0.0


class Emulator:
    """State shared by one emulator's routes; subclasses add their API routes."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats: dict[str, EndpointStats] = defaultdict(EndpointStats)
        self.window = SlidingWindowLimit()
        self.extra_stats: dict[str, Any] = {}
        self.documents = DocumentCounts()
        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        self._token_generation = 0
        self._next_token_expiry = self._expiry_schedule(time.time())
        self.loop_watch = LoopWatch()
        self.counting_since = time.time()

    def task_records(self, records: Any) -> dict[str, Any]:
        """``timelines`` of an emulator whose tasks are polled: each task's record since the last reset."""
        return {"tasks": [r.as_dict() for r in records if r is not None and r.created >= self.counting_since]}

    def http(self) -> httpx.AsyncClient:
        """One client for every outgoing request (downloads, callbacks), built with the emulator.

        Why shared: building an httpx client loads a TLS context, ~30 ms of CPU on the
        event loop; one per request stalled every other request the emulator was serving.
        Why built up front: built on first use, it stalled the loop (88 ms on a loaded box) just
        as the first task's download began, and every submit arriving meanwhile waited: the
        first client of a fresh emulator paid for it, and no other. Timeouts are given per request.
        """
        return self._client

    @staticmethod
    def arrival(request: Request | None) -> tuple[float, float]:
        """When ``request`` arrived, (wall clock, monotonic clock): when its first bytes were read
        (``emulators.wire``) where its server stamps them, else now."""
        return wire_stamp(request.scope if request is not None else None) or (time.time(), time.monotonic())

    def arrive(self, endpoint: str, request: Request | None = None) -> EndpointStats:
        """Count a request on ``endpoint`` at its arrival (``arrival``)."""
        now = self.arrival(request)[0]
        self.loop_watch.start()
        stats = self.stats[endpoint]
        stats.requests += 1
        stats.last_route_lag = time.time() - now
        stats.route_lag_max = max(stats.route_lag_max, stats.last_route_lag)
        stats.arrived(now)
        stats.last_stamp_doubt = self.loop_watch.doubt(now)
        stats._recent_doubts.append((now, stats.last_stamp_doubt))
        while stats._recent_doubts[0][0] < now - 2.0:
            stats._recent_doubts.popleft()
        return stats

    def refused_over_limit(self, endpoint: str, key: str, arrived: float | None = None) -> None:
        """Count a request over the documented limit, keeping what the referee saw: the arrivals
        in the window it closed and how far each stamp may trail its real arrival (how long the
        event loop had been away when it was stamped). A violation with a doubtful stamp is
        still a violation, but its record says whose clock to look at."""
        stats = self.stats[endpoint]
        stats.limit_violations += 1
        if len(stats.violations) < 20:
            window = self.window.recent(key, arrived)  # arrived: the refused request's monotonic stamp
            opened = min(window, default=time.time()) - 0.005  # the window's clock is read a moment after the stamp
            stats.violations.append({
                "at": stats.arrivals[-1] if stats.arrivals else time.time(),
                "window": window,
                "stamp_doubt_ms": round(stats.last_stamp_doubt * 1000, 1),
                "route_lag_ms": round(stats.last_route_lag * 1000, 1),  # how long after its stamp its route ran
                "window_stamp_doubt_max_ms": round(1000 * max((d for t, d in stats._recent_doubts if t >= opened), default=0.0), 1),
                "loop_lag_max_ms": round(self.loop_watch.max_lag * 1000, 1),
            })

    def accept(self, endpoint: str) -> None:
        """The request was served (not refused by a limit, a fault or a validation error)."""
        stats = self.stats[endpoint]
        stats.accepted += 1
        stats.accepted_at.append(time.time())

    def roll(self, probability: float) -> bool:
        """A probability of 0 draws nothing, so a fault left off keeps every other draw as it was."""
        return probability > 0 and self.rng.random() < probability

    def inject(self, endpoint: str, probability: float) -> bool:
        """Roll a fault for this request; one that fires is counted as injected on ``endpoint``."""
        if not self.roll(probability):
            return False
        self.stats[endpoint].faults_injected += 1
        return True

    def malformed_accept(self, endpoint: str) -> bool:
        """Whether this accepted request gets a broken answer (``faults.malformed_accept_rate``).

        Counted as an injected fault, and still as accepted by the caller: the task exists.
        """
        return self.inject(endpoint, self.config.faults.malformed_accept_rate)

    def directed(self, behaviour: str, endpoint: str | None = None) -> None:
        """Count a document's directive obeyed (``EMULATE:``, see ``emulators.documents``).

        The statistics' ``directives`` counts each behaviour every time it is applied; an
        answer the directive changed on ``endpoint`` also counts there as an injected fault.
        """
        counts = self.extra_stats.setdefault("directives", {})
        counts[behaviour] = counts.get(behaviour, 0) + 1
        if endpoint is not None:
            self.stats[endpoint].faults_injected += 1

    async def maybe_slow(self, endpoint: str, request: Request | None = None) -> None:
        """Delay the answer; the request is processed afterwards, as by a slow backend.

        The body is read before the wait: a client that gives up meanwhile disconnects, and a
        body read after that would be lost (the server answers the read with a disconnect), so
        the request would silently not be processed, which no slow backend does.
        """
        faults = self.config.faults
        if self.inject(endpoint, faults.slow_rate):
            if request is not None:
                await request.body()
            await asyncio.sleep(faults.slow_seconds)

    # -- tokens ----------------------------------------------------------------------------

    def _expiry_schedule(self, now: float) -> float | None:
        every = self.config.faults.token_expiry_every
        return now + every if every > 0 else None

    def token_generation(self, now: float | None = None) -> int:
        """How many periodic token expiries (``faults.token_expiry_every``) have passed.

        A token is good only in the generation it was issued in. The boundaries are fixed
        times, counted whenever asked: a token issued just after a boundary is never caught
        by it, however late the emulator notices that the boundary passed.
        """
        now = time.time() if now is None else now
        every = self.config.faults.token_expiry_every
        if self._next_token_expiry is not None and every > 0 and now >= self._next_token_expiry:
            passed = int((now - self._next_token_expiry) // every) + 1
            self._token_generation += passed
            self._next_token_expiry += passed * every
        return self._token_generation

    async def record_document(self, data: bytes) -> None:
        """Count an accepted document by content (hashed off the loop when large: a 10 MB hash
        takes the loop for milliseconds, and the loop stamps every arrival)."""
        if len(data) > 1024 * 1024:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
        else:
            digest = hashlib.sha256(data).digest()
        self.documents.add(digest)

    def timelines(self) -> dict[str, Any]:
        """Time series an emulator keeps for the benchmarks (``GET /_emulator/stats?arrivals=1``)."""
        return {}

    def reset(self) -> None:
        self.stats.clear()
        self.window.reset()
        self.loop_watch.max_lag = 0.0
        self.counting_since = time.time()
        self.extra_stats.clear()
        self.documents = DocumentCounts()

    # -- control routes --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        endpoints = {name: s.as_dict() for name, s in self.stats.items()}
        return {"endpoints": endpoints, "loop_lag_max_ms": round(self.loop_watch.max_lag * 1000, 1), **self.extra_stats, "documents": self.documents.as_dict()}

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
            config = type(self.config).model_validate(merged)
            now = time.time()
            retimed = config.faults.token_expiry_every != self.config.faults.token_expiry_every
            if retimed:
                self.token_generation(now)  # the boundaries that passed under the old period still count
            self.config = config
            if retimed:
                self._next_token_expiry = self._expiry_schedule(now)
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


@dataclass
class DocumentCounts:
    """Accepted submits by document content (sha256): a document accepted twice is billed twice."""

    per_document: dict[bytes, int] = field(default_factory=dict)  # digest -> accepted submits
    submitted: int = 0
    most: int = 0

    def add(self, digest: bytes) -> None:
        count = self.per_document.get(digest, 0) + 1
        self.per_document[digest] = count
        self.submitted += 1
        self.most = max(self.most, count)

    def as_dict(self) -> dict[str, int]:
        distinct = len(self.per_document)
        return {"submitted": self.submitted, "distinct": distinct, "repeated": self.submitted - distinct, "max_per_document": self.most}


# --- dropping a connection without an answer -------------------------------------------------

DROP_SCOPE_KEY = "emulators.drop"


class _DropSwitch:
    """Set by ``DroppedConnection`` inside the app, read by ``EmulatorApp`` outside it."""

    def __init__(self) -> None:
        self.requested = False
        self.body_read = False


class DroppedConnection(Response):
    """What a handler returns to have its connection closed with no answer at all.

    Why not an exception or an empty return: Starlette's error middleware answers an
    exception with a 500, and uvicorn answers an app that returns without a response with a
    500; either is an answer, and a client that gets one knows the server saw its request.
    This sends nothing and leaves the hanging-up to ``EmulatorApp``, outside those layers.
    """

    def __init__(self) -> None:
        super().__init__(status_code=599)  # never sent; Refused and logs read a status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        switch = scope.get(DROP_SCOPE_KEY)
        if not isinstance(switch, _DropSwitch):
            raise TypeError("a dropped connection needs the app to be an EmulatorApp")
        switch.requested = True


class EmulatorApp(Starlette):
    """A Starlette app that can hang up on a request, as a crashed backend or a cut link does.

    ASGI has no message for "close without answering", so this reaches past it to the
    server's transport: under uvicorn ``send`` is a method of the request cycle, which holds
    the connection's transport. Closed after the whole request was read, the socket sends
    a FIN (with unread bytes it would send a reset): httpx reports "Server disconnected
    without sending a response".
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        switch = _DropSwitch()
        scope[DROP_SCOPE_KEY] = switch

        async def tracked() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                switch.body_read = True
            return message

        await super().__call__(scope, tracked, send)
        if switch.requested:
            await _hang_up(tracked, send, switch)


async def _hang_up(receive: Receive, send: Send, switch: _DropSwitch) -> None:
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not isinstance(transport, asyncio.BaseTransport):
        raise TypeError("dropping a connection needs uvicorn (its request cycle's transport)")
    while not switch.body_read:
        await receive()
    transport.close()
    # Wait until the server has seen the connection go; otherwise it would answer 500 for us.
    while (await receive())["type"] != "http.disconnect":
        pass


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
