"""Arrival stamps taken where a request reaches the server, not where its route runs.

Why: the referee judges a client by when its requests arrive. Stamped in the route, a request
carried every delay between the socket and the handler (the parse, the hop to a new task, the
routing, each a turn of a loop that other requests and the GIL also want). On a loaded 2-core
box that spread reached tens of milliseconds, the whole margin a limiter at 0.97 keeps in a
1-second window, and the referee saw bursts the client never sent. uvicorn's h11 protocol
reads the socket in ``data_received``: the first bytes of each request are stamped there and
the stamp rides in the request's ASGI scope (``wire_stamp``).
"""

from __future__ import annotations

import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

SCOPE_KEY = "docpipe.wire_stamp"


class WireStampedH11(H11Protocol):
    """uvicorn's h11 protocol, stamping (wall clock, monotonic clock) when a request's first bytes are read."""

    _stamp: tuple[float, float] | None = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._stamp is None:  # these bytes begin a request
            self._stamp = (time.time(), time.monotonic())
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and self.cycle is not None and self._stamp is not None:
            # The request's task is created and not yet run: its scope is still ours to add to.
            self.cycle.scope[SCOPE_KEY] = self._stamp  # type: ignore[typeddict-unknown-key]
        if self.cycle is not before or self.conn.their_state is not h11.IDLE:
            # A stamp belongs to one request: a pipelined one behind it is stamped by its route.
            self._stamp = None


def wire_stamp(scope: dict[str, Any] | None) -> tuple[float, float] | None:
    """The (wall, monotonic) time the request's first bytes were read, when its server stamped it."""
    stamp = scope.get(SCOPE_KEY) if scope is not None else None
    return stamp if isinstance(stamp, tuple) else None
