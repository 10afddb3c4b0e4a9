"""A TCP proxy that plays the network between two processes: latency, refused connects, drops.

Why: the pipeline's behaviour under a slow or flaky network (Redis and S3 a few
milliseconds away, a broker that refuses connections for a while, connections cut in the
middle of a command) cannot be shown on loopback, where everything answers in microseconds
and never fails. Put this in front of a server and point the client at it.

The delay is a delay line, as on a real link: every chunk read at time t is written at
t + delay, in order, so a pipelined stream keeps its throughput and only gains latency (a
proxy that slept per chunk would be a throttle, and would make pipelining look useless).
The delay applies in each direction, so a round trip gains twice the delay. Only data
is delayed: a connect completes at once (the kernel accepts it before we see it), and
the first bytes then pay the delay like any others.

``python -m emulators.netem --listen-port P --upstream-host 127.0.0.1 --upstream-port M
[--delay-ms D] [--control-port C]``

Control routes on ``--control-port``: ``POST /delay {"ms": D}``, ``POST /refuse
{"seconds": N}`` (the listening socket is really closed, so connects get ECONNREFUSED, and
open connections are cut; the same port is bound again after N seconds), ``POST /drop``
(cut every open connection), ``GET /stats``.

In a test, ``NetEm`` runs in your event loop, or ``ThreadedNetEm`` runs one in a thread of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("emulators.netem")

READ_SIZE = 64 * 1024
# Bytes a direction may hold in its delay line before it stops reading from its sender (so
# TCP back-pressure reaches the sender when the receiver does not read). The most a link
# carries is this over the delay: 16 MB / 10 ms is far more than loopback needs.
LINE_LIMIT = 16 * 1024 * 1024

T = TypeVar("T")


@dataclass
class _Direction:
    """Counters of one direction of all links ("up": client to server, "down": back)."""

    bytes: int = 0
    chunks: int = 0


@dataclass(eq=False)  # hashed by identity: links live in a set
class _Link:
    """One client connection and its upstream twin."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter

    def cut(self) -> None:
        """Close both ends at once with a reset, as a failed link or a dead peer does."""
        for writer in (self.client, self.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class NetEm:
    """The proxy's state and behaviour; every method runs on the event loop that started it."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_port: int = 0,
        delay_ms: float = 0.0,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_host, self.port = listen_host, listen_port
        self.delay = delay_ms / 1000.0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # one per accepted connection, until it is closed
        self._epoch = 0  # bumped by every drop: a connection accepted before it must not survive it
        self._reopen: asyncio.Task[None] | None = None
        self._refused_until: float | None = None
        self.up, self.down = _Direction(), _Direction()
        self.connections_total = 0
        self.upstream_failures = 0
        self.cuts = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; with ``listen_port`` 0 the kernel picks the port, kept for every re-bind."""
        self._server = await asyncio.start_server(self._serve, self.listen_host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, cut every link and wait for their handlers to finish."""
        if self._reopen is not None:
            self._reopen.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reopen
        self._stop_listening()
        self.drop()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=5)
            for task in pending:
                task.cancel()

    @property
    def listening(self) -> bool:
        return self._server is not None

    # -- the controls ----------------------------------------------------------------------------

    def set_delay(self, ms: float) -> None:
        """One-way delay for chunks read from now on (chunks in flight keep theirs)."""
        self.delay = max(0.0, ms) / 1000.0

    def refuse(self, seconds: float) -> None:
        """Close the listening socket and every link now; bind the same port again in ``seconds``."""
        loop = asyncio.get_running_loop()
        self._stop_listening()
        self.drop()
        if self._reopen is not None:
            self._reopen.cancel()
        self._refused_until = loop.time() + seconds
        self._reopen = loop.create_task(self._listen_again(seconds))

    def drop(self) -> int:
        """Cut every open link; the number cut."""
        links = list(self._links)
        self._links.clear()
        self._epoch += 1
        for link in links:
            link.cut()
        self.cuts += len(links)
        return len(links)

    def stats(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        remaining = None
        if self._refused_until is not None and not self.listening:
            remaining = max(0.0, self._refused_until - loop.time())
        return {
            "port": self.port,
            "listening": self.listening,
            "refused_for_seconds": remaining,
            "delay_ms": self.delay * 1000.0,
            "connections_open": len(self._links),
            "connections_total": self.connections_total,
            "connections_cut": self.cuts,
            "upstream_failures": self.upstream_failures,
            "bytes_up": self.up.bytes,
            "bytes_down": self.down.bytes,
            "chunks_up": self.up.chunks,
            "chunks_down": self.down.chunks,
        }

    # -- internals -------------------------------------------------------------------------------

    def _stop_listening(self) -> None:
        # Server.close() closes the listening sockets at once (pending, unaccepted connects
        # are reset with them); links already accepted are ours to cut.
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _listen_again(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        while True:
            try:
                await self.start()
                return
            except OSError as exc:  # the port is someone else's for now: keep trying, as a restarted server would
                log.warning("cannot bind %s:%s again (%s); retrying", self.listen_host, self.port, exc)
                await asyncio.sleep(0.05)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._link(client_reader, client_writer)
        finally:
            self._handlers.discard(handler)

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        epoch = self._epoch
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.upstream_failures += 1
            client_writer.transport.abort()
            return
        if epoch != self._epoch:  # dropped (or refused) while we were connecting upstream
            _Link(client_writer, server_writer).cut()
            return
        for writer in (client_writer, server_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the delay is ours to add, not Nagle's
        link = _Link(client_writer, server_writer)
        self._links.add(link)
        self.connections_total += 1
        try:
            await asyncio.gather(
                self._carry(client_reader, server_writer, self.up, link),
                self._carry(server_reader, client_writer, self.down, link),
            )
        finally:
            self._links.discard(link)
            client_writer.close()
            server_writer.close()

    async def _carry(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters: _Direction, link: _Link
    ) -> None:
        """One direction: a reader stamping each chunk with its due time, a writer keeping the dates.

        Reading never waits for writing (only for the line limit), so chunks read 1 ms apart
        leave 1 ms apart, each ``delay`` after it came in.
        """
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        held = 0
        room = asyncio.Event()
        room.set()

        async def write_when_due() -> None:
            nonlocal held
            try:
                while True:
                    due, chunk = await line.get()
                    while (wait := due - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    if not chunk:  # the sender shut its side: pass the half-close on
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(chunk)
                    await writer.drain()
                    held -= len(chunk)
                    if held <= LINE_LIMIT // 2:
                        room.set()
            except (OSError, RuntimeError):  # the receiver is gone: so is the link, both ways
                link.cut()
                room.set()  # a reader waiting for room must go on, to see the cut

        sender = asyncio.create_task(write_when_due())
        try:
            while True:
                await room.wait()
                chunk = await reader.read(READ_SIZE)
                line.put_nowait((loop.time() + self.delay, chunk))
                if not chunk:
                    break
                counters.bytes += len(chunk)
                counters.chunks += 1
                held += len(chunk)
                if held > LINE_LIMIT:
                    room.clear()
            await sender
        except (OSError, RuntimeError):  # reset, or written after a cut: the link is gone either way
            link.cut()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, RuntimeError):
                await sender


class ThreadedNetEm:
    """A ``NetEm`` on an event loop of its own thread, driven from synchronous code (tests)."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0, delay_ms: float = 0.0) -> None:
        self.netem = NetEm(upstream_host, upstream_port, listen_port, delay_ms)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netem", daemon=True)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _do(self, name: str, *args: Any) -> Any:
        return getattr(self.netem, name)(*args)

    def start(self) -> ThreadedNetEm:
        self._thread.start()
        self._call(self.netem.start())
        return self

    @property
    def port(self) -> int:
        return self.netem.port

    def set_delay(self, ms: float) -> None:
        self._call(self._do("set_delay", ms))

    def refuse(self, seconds: float) -> None:
        self._call(self._do("refuse", seconds))

    def drop(self) -> int:
        return self._call(self._do("drop"))

    def stats(self) -> dict[str, Any]:
        return self._call(self._do("stats"))

    def close(self) -> None:
        self._call(self.netem.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ThreadedNetEm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the control port -------------------------------------------------------------------------------


def create_control_app(netem: NetEm) -> Starlette:
    """The control routes, served on the same loop as ``netem`` so they act on it directly."""

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        return json.loads(raw) if raw.strip() else {}

    async def delay(request: Request) -> JSONResponse:
        netem.set_delay(float((await body(request)).get("ms", 0)))
        return JSONResponse(netem.stats())

    async def refuse(request: Request) -> JSONResponse:
        netem.refuse(float((await body(request)).get("seconds", 1)))
        return JSONResponse(netem.stats())

    async def drop(request: Request) -> JSONResponse:
        return JSONResponse({"dropped": netem.drop(), **netem.stats()})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(netem.stats())

    return Starlette(routes=[
        Route("/delay", delay, methods=["POST"]),
        Route("/refuse", refuse, methods=["POST"]),
        Route("/drop", drop, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
    ])


async def serve(args: argparse.Namespace) -> None:
    netem = NetEm(args.upstream_host, args.upstream_port, args.listen_port, args.delay_ms, args.listen_host)
    await netem.start()
    log.info("netem %s:%s -> %s:%s", args.listen_host, netem.port, args.upstream_host, args.upstream_port)
    try:
        if args.control_port is not None:
            config = uvicorn.Config(create_control_app(netem), host=args.listen_host, port=args.control_port,
                                    log_level="warning", access_log=False, lifespan="off")
            await uvicorn.Server(config).serve()  # until SIGINT/SIGTERM
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        await netem.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulators.netem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--upstream-host", default="127.0.0.1")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, applied in each direction")
    parser.add_argument("--control-port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
