"""A whole docpipe stack as local processes: redis-server, an S3 server (moto), the provider
emulators, Celery workers and Flower, on free ports.

The demo, the end-to-end tests and the benchmarks all run on this, so what they prove
is what a deployment does: real processes talking over real sockets.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEMO_BAIDU_KEY = "demo-api-key"
DEMO_BAIDU_SECRET = "demo-secret-key"
DEMO_IDP_USER, DEMO_IDP_PASSWORD = "demo", "demo-password"
DEMO_TUPUTECH_SECRET_ID = "demo-secret-id"
S3_ACCESS_KEY, S3_SECRET_KEY = "docpipe-local", "docpipe-local-secret"


def _renice(priority: int) -> None:
    """Set the niceness of the process about to start (absolute, whatever its parent's); a
    priority it may not take (below its parent's, when not root) stays its parent's."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, priority)
    except PermissionError:
        os.setpriority(os.PRIO_PROCESS, 0, max(priority, os.getpriority(os.PRIO_PROCESS, 0)))


def interrupt_on_termination() -> None:
    """Make SIGTERM and SIGHUP interrupt this process as Ctrl-C does, so that the ``finally`` that
    stops a stack runs whatever stopped us (a closed terminal, ``kill``, a CI runner's timeout).
    Only from the main thread, and only where nobody installed a handler of their own."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _interrupt)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Let a stop finish: a second Ctrl-C or SIGTERM (a supervisor that signals the whole process
    group, an impatient user) raised inside the stop's ``finally`` left the processes not yet
    signalled running. Each stop is bounded (SIGKILL at its deadline), so holding the signals
    back until it ends costs seconds at most; one that came meanwhile is raised then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # An ignored signal stays ignored (nohup's SIGHUP): holding it back would turn it into a stop.
    signals = [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, lambda signum, _frame: held.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            handler = previous[held[0]]
            if callable(handler):
                handler(held[0], None)  # what it would have done (Python's Ctrl-C, our _interrupt)
            raise KeyboardInterrupt(f"stopped by {signal.Signals(held[0]).name}")


# Ports a process has reserved for its services (``free_port``): each an open, locked file.
_RESERVED: dict[int, int] = {}
_RESERVING = threading.Lock()


def free_port() -> int:
    """A port for a local service, reserved for as long as this process lives.

    Why not the kernel's ``bind(0)``: it hands out ports from the ephemeral range, the very range
    every outgoing connection takes its local port from, and frees the port as soon as it
    answers. Between that answer and the service's own bind, a connection of any process (or
    another stack's pick) could take the port: the service then failed to bind, and its
    readiness check was answered by whoever held the port (a suite run saw a callback receiver
    exit so, and another stack's S3 answer at its address). So the port is drawn below the
    ephemeral range, where no connection lands, and locked (``flock`` on a file named after it,
    shared by every process on the machine): a lock dies with its holder, so a killed test run
    leaves nothing to clean up.
    """
    span = _unshared_span()
    if span is None:  # an ephemeral range that leaves no room around it: the kernel's pick, unreserved
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    first, last = span
    directory = Path(tempfile.gettempdir()) / "docpipe-ports"
    if not directory.is_dir():
        directory.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            directory.chmod(0o1777)  # every user's stacks reserve here (sticky, as /tmp is)
    with _RESERVING:
        for _ in range(500):
            port = random.randrange(first, last)
            if port in _RESERVED:
                continue
            try:
                fd = os.open(directory / str(port), os.O_CREAT | os.O_RDONLY, 0o444)  # flock needs no write access
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # another process holds it
                continue
            if _bindable(port):
                _RESERVED[port] = fd
                return port
            os.close(fd)  # held by something that is not a stack of ours
    raise RuntimeError(f"no free port between {first} and {last}")


def _unshared_span(size: int = 12000, least: int = 1000) -> tuple[int, int] | None:
    """Ports no outgoing connection takes: below the ephemeral range, else above it."""
    low, high = _ephemeral_range()
    if low - 1024 >= least:
        return max(1024, low - size), low
    if 65535 - high >= least:
        return high + 1, min(65536, high + 1 + size)
    return None


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; macOS' starts at 49152, so this range is below it too


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(check, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - anything means "not yet"
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f" (last error: {last})" if last else ""))


@functools.cache
def local_http() -> httpx.Client:
    """One HTTP client per process for the stack's own routes: health checks, the emulators' and
    the S3 front's control routes. ``httpx.get()`` builds a client per call, and with it an SSL
    context (about 25 ms of CPU reading the CA bundle) that a plain-HTTP request never uses, and
    the tests' waits ask an emulator every tenth of a second (py-spy over one make test: 130 s
    of samples in ssl.create_default_context). It keeps no cookies: each call stays as
    independent as a fresh client's. An idle connection is dropped after 1 s, well before the
    servers' own keep-alive timeout (uvicorn's 5 s, httpx's default expiry too): reused at the
    moment the server closed it, a request met "Server disconnected without sending a response"
    (seen once in make test)."""
    from http.cookiejar import CookieJar, DefaultCookiePolicy

    return httpx.Client(
        timeout=5.0, limits=httpx.Limits(keepalive_expiry=1.0), cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    )


def _http_ok(url: str) -> bool:
    """The service's own health route answers 200: any other answer is not ours (a foreign server
    holding the port answers 404 to our route, and its answer must not pass for readiness)."""
    return local_http().get(url, timeout=1.0).status_code == 200


def _point_celery_at(broker_url: str) -> None:
    """Send this process' tasks and control messages to ``broker_url`` from now on."""
    from workers.app import app

    if app.conf.broker_url == broker_url:
        return
    import kombu.pools

    app.conf.broker_url = broker_url
    kombu.pools.reset()  # producer pools are kept per URL in kombu's registry: start them afresh
    app._pool = None
    app.amqp._producer_pool = None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        with _signals_held():
            self.signal(sig)
            self.reap(time.monotonic() + timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def reap(self, deadline: float) -> None:
        """Wait for the process (and its group) until ``deadline``; then kill -9 what is left."""
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)

    def kill(self) -> None:
        """kill -9, no goodbye: what a crashed machine does."""
        self.stop(signal.SIGKILL)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True)
class _Starting:
    """A process launched and not yet waited for: how to tell it is ready, and for how long to try."""

    proc: Proc
    check: Callable[[], bool]
    timeout: float
    what: str


@dataclass
class LocalStack:
    workdir: Path
    emulator_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)  # extra DOCPIPE_* for every process
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        interrupt_on_termination()
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for service in ("redis", "s3", "flower", "callbacks"):
            self.ports.setdefault(service, free_port())
        self._tuputech_keys: dict[str, str] = {}
        self.flower_auth: tuple[str, str] | None = None

    def tuputech_keys(self) -> dict[str, str]:
        """Two RSA key pairs made for this stack: ours (signs submits) and the emulator's (signs callbacks)."""
        if not self._tuputech_keys:
            from pipeline.providers.tuputech_wire import generate_key_pair

            client_private, client_public = generate_key_pair()
            provider_private, provider_public = generate_key_pair()
            self._tuputech_keys = {
                "client_private": client_private,
                "client_public": client_public,
                "provider_private": provider_private,
                "provider_public": provider_public,
            }
        return self._tuputech_keys

    # -- environment -------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The DOCPIPE_* settings that point a process at this stack."""
        env = {
            "DOCPIPE_REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
            "DOCPIPE_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.ports['s3']}",
            "DOCPIPE_AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "DOCPIPE_AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "DOCPIPE_STAGING_BUCKET": "docpipe-staging",
            "DOCPIPE_RESULTS_BUCKET": "docpipe-results",
        }
        if "baidu" in self.ports:
            env.update(
                DOCPIPE_BAIDU_BASE_URL=f"http://127.0.0.1:{self.ports['baidu']}",
                DOCPIPE_BAIDU_API_KEY=DEMO_BAIDU_KEY,
                DOCPIPE_BAIDU_SECRET_KEY=DEMO_BAIDU_SECRET,
            )
        if "idp" in self.ports:
            env.update(
                DOCPIPE_IDP_BASE_URL=f"http://127.0.0.1:{self.ports['idp']}",
                DOCPIPE_IDP_USERNAME=DEMO_IDP_USER,
                DOCPIPE_IDP_PASSWORD=DEMO_IDP_PASSWORD,
            )
        if "tuputech" in self.ports:
            keys = self.tuputech_keys()
            env.update(
                DOCPIPE_TUPUTECH_BASE_URL=f"http://127.0.0.1:{self.ports['tuputech']}",
                DOCPIPE_TUPUTECH_SECRET_ID=DEMO_TUPUTECH_SECRET_ID,
                DOCPIPE_TUPUTECH_PRIVATE_KEY=keys["client_private"],
                DOCPIPE_TUPUTECH_PUBLIC_KEY=keys["provider_public"],
            )
        env["DOCPIPE_CALLBACK_BASE_URL"] = f"http://127.0.0.1:{self.ports['callbacks']}"
        env["DOCPIPE_CALLBACK_SPOOL_DIR"] = str(self.workdir / "callback-spool")
        env.update(self.settings)
        return env

    def activate(self) -> None:
        """Point this process at the stack (the enqueueing side of tests, demo and benchmarks)."""
        from pipeline.runtime import reset_runtime

        os.environ.update(self.env)
        reset_runtime()
        _point_celery_at(self.env["DOCPIPE_REDIS_URL"])

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, *, nice: int = 0) -> Proc:
        """Start a process of the stack, at priority ``nice`` (absolute). On a small busy box the
        order matters: the emulators first (they referee every limit by the time requests reach
        them, so they must stamp arrivals on time), then Redis, then the workers (a send time is
        only as good as the thread that keeps it), then S3 and, last, Flower."""
        log = self.workdir / f"{name}.log"
        full_env = {**os.environ, **self.env, **(env or {})}
        popen = subprocess.Popen(
            argv,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(Path(__file__).resolve().parent.parent),
            start_new_session=True,  # its own process group: stop() takes its children too
            preexec_fn=lambda: _renice(nice),
        )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def _all_ready(self, starting: list[_Starting]) -> None:
        """Wait for processes launched together, each against its own deadline, counted from now."""
        began = time.monotonic()
        for one in starting:
            self._ready(one.proc, one.check, max(1.0, one.timeout - (time.monotonic() - began)), one.what)

    def _ready(self, proc: Proc, check, timeout: float, what: str) -> None:
        def alive_and_ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{what} exited early:\n{proc.tail()}")
            return check()

        try:
            wait_until(alive_and_ready, timeout, what)
        except RuntimeError as exc:
            raise RuntimeError(str(exc)) from None

    # -- the services ------------------------------------------------------------------------

    def start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; `make` does it for you)")
        port = self.ports.setdefault("redis", free_port())
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        proc = self._spawn(
            "redis",
            [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"],
            nice=-5,
        )
        import redis

        self._ready(proc, lambda: redis.Redis(port=port).ping(), 20, "redis-server")

    def restart_redis(self, hard: bool = True) -> None:
        """Kill (-9 when ``hard``) and start Redis again on the same port and data directory."""
        proc = self.procs.pop("redis")
        proc.kill() if hard else proc.stop()
        self.start_redis()

    def start_netem(self, name: str, upstream_port: int, delay_ms: float = 0.0) -> int:
        """A TCP delay line (``emulators.netem``) in front of ``upstream_port``; returns the port to use instead.

        Controlled through ``netem(name, ...)``: a one-way delay in each direction, refused
        connections for a while, dropped connections. The chaos benchmark puts Redis (for the
        workers) and S3 behind one.
        """
        port, control = free_port(), free_port()
        proc = self._spawn(
            f"netem-{name}",
            [sys.executable, "-m", "emulators.netem", "--listen-port", str(port), "--upstream-port", str(upstream_port),
             "--delay-ms", str(delay_ms), "--control-port", str(control)],
        )
        self.ports[f"netem-{name}"], self.ports[f"netem-{name}-control"] = port, control
        self._ready(proc, lambda: _http_ok(f"http://127.0.0.1:{control}/stats"), 20, f"delay line {name}")
        return port

    def netem(self, name: str, action: str, **body: Any) -> dict[str, Any]:
        """``delay`` (``ms=``), ``refuse`` (``seconds=``) or ``drop`` on the delay line ``name``."""
        response = local_http().post(f"http://127.0.0.1:{self.ports[f'netem-{name}-control']}/{action}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def start_s3(self) -> None:
        """moto's S3 inside ``emulators.s3proxy``, which checks every request's signature, method
        included, as real S3 does (moto checks none): what S3 would refuse fails here too."""
        self._all_ready(self._launch_s3())

    def _launch_s3(self) -> list[_Starting]:
        port = self.ports.setdefault("s3", free_port())
        front = self._spawn(
            "s3",
            [sys.executable, "-m", "emulators.s3proxy", "--listen-port", str(port), "--access-key", S3_ACCESS_KEY,
             "--secret-key", S3_SECRET_KEY],
            nice=5,
        )
        return [_Starting(front, lambda: _http_ok(f"http://127.0.0.1:{port}/_proxy/health"), 30, "S3 (moto behind its signature-checking front)")]

    def s3_faults(self, mode: str, seconds: float | None = None) -> None:
        """Make S3 answer ``503 SlowDown`` (``"slowdown"``) or ``500`` (``"error500"``) for ``seconds``; ``"ok"`` ends it."""
        body: dict[str, Any] = {"mode": mode} if seconds is None else {"mode": mode, "seconds": seconds}
        local_http().post(f"http://127.0.0.1:{self.ports['s3']}/_proxy/faults", json=body, timeout=5).raise_for_status()

    def start_emulator(self, provider: str, config: dict[str, Any] | None = None) -> None:
        self._all_ready([self._launch_emulator(provider, config)])

    def start_emulators(self, providers: Iterable[str]) -> None:
        """Several emulators, launched at once and waited for together."""
        providers = tuple(providers)
        for provider in providers:  # each is given the others' addresses too
            self.ports.setdefault(provider, free_port())
        if "tuputech" in providers:
            self.tuputech_keys()
        self._all_ready([self._launch_emulator(provider) for provider in providers])

    def _launch_emulator(self, provider: str, config: dict[str, Any] | None = None) -> _Starting:
        port = self.ports.setdefault(provider, free_port())
        merged = {**self._emulator_defaults(provider), **self.emulator_config.get(provider, {}), **(config or {})}
        # In a file readable by us alone, not on the command line: it holds the emulator's keys.
        config_file = self.workdir / f"emulator-{provider}.json"
        config_file.touch(mode=0o600)
        config_file.write_text(json.dumps(merged))
        # The emulators stand for remote services whose clocks our CPU load cannot delay: a
        # referee starved of CPU stamps arrivals late and sees bursts the client never sent.
        proc = self._spawn(
            f"emulator-{provider}",
            [sys.executable, "-m", "emulators", provider, "--port", str(port), "--config", f"@{config_file}"],
            nice=-10,
        )
        return _Starting(proc, lambda: _http_ok(f"http://127.0.0.1:{port}/_emulator/health"), 20, f"{provider} emulator")

    def _emulator_defaults(self, provider: str) -> dict[str, Any]:
        """What an emulator must know of this stack's account: credentials and keys."""
        if provider == "baidu":
            return {"api_key": DEMO_BAIDU_KEY, "secret_key": DEMO_BAIDU_SECRET}
        if provider == "idp":
            return {"username": DEMO_IDP_USER, "password": DEMO_IDP_PASSWORD}
        if provider == "tuputech":
            keys = self.tuputech_keys()
            return {
                "secret_id": DEMO_TUPUTECH_SECRET_ID,
                "client_public_key": keys["client_public"],
                "private_key": keys["provider_private"],
            }
        return {}

    def start_callbacks(self) -> None:
        """The callback receiver (``docpipe callbacks``), where callback providers deliver results."""
        self._all_ready([self._launch_callbacks()])

    def _launch_callbacks(self) -> _Starting:
        port = self.ports["callbacks"]
        proc = self._spawn(
            "callbacks", [sys.executable, "-m", "pipeline.cli", "callbacks", "--host", "127.0.0.1", "--port", str(port)]
        )
        return _Starting(proc, lambda: _http_ok(f"http://127.0.0.1:{port}/health"), 20, "callback receiver")

    def emulator_url(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.ports[provider]}"

    def start_worker(
        self,
        name: str,
        queues: Iterable[str],
        *,
        concurrency: int = 4,
        pool: str = "threads",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        argv = [
            sys.executable, "-m", "celery", "-A", "workers", "worker",
            "-Q", ",".join(queues), "-n", f"{name}@%h", "-c", str(concurrency), "-P", pool,
            "--loglevel", "INFO", "-E", "--without-gossip", "--without-mingle",
        ]
        port = self.ports[f"metrics-{name}"] = free_port()
        proc = self._spawn(f"worker-{name}", argv, {"DOCPIPE_METRICS_PORT": str(port), **(env or {})}, nice=0)
        if wait:
            self.wait_workers([name])
        return proc

    def wait_workers(self, names: list[str], timeout: float = 60) -> None:
        from workers.app import app

        _point_celery_at(self.env["DOCPIPE_REDIS_URL"])

        def all_answer() -> bool:
            for n in names:
                if not self.procs[f"worker-{n}"].alive():
                    raise RuntimeError(f"worker {n} exited:\n{self.procs[f'worker-{n}'].tail()}")
            hostnames = {f"{n}@{socket.gethostname()}" for n in names}
            with app.connection_for_write() as conn:  # fresh: survives a Redis restart
                replies = app.control.ping(destination=list(hostnames), timeout=1.0, connection=conn)
            answered = {host for reply in replies for host in reply}
            return hostnames <= answered

        wait_until(all_answer, timeout, f"workers {names}", interval=0.5)

    def start_flower(self) -> None:
        """Flower behind basic auth, as every configuration docpipe ships: its task views show job
        payloads, which name documents and archives. The credentials are made for this stack and
        passed in the environment (``FLOWER_BASIC_AUTH``), never on the command line."""
        port = self.ports.setdefault("flower", free_port())
        self.flower_auth = ("docpipe", secrets.token_urlsafe(12))
        proc = self._spawn(
            "flower",
            [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"],
            env={"FLOWER_BASIC_AUTH": ":".join(self.flower_auth)},
            nice=10,  # a monitor: it must never take CPU from the pipeline or the referees
        )
        self._ready(proc, lambda: local_http().get(f"http://127.0.0.1:{port}/healthcheck", timeout=1.0).status_code == 200, 40, "Flower")

    @property
    def flower_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ports['flower']}" if "flower" in self.procs else None

    def start_base(self, providers: Iterable[str] = ("baidu",), *, callbacks: bool = False) -> None:
        """Redis, S3 with its buckets, and one emulator per provider (and the callback receiver).

        All but Redis start at once and are then waited for together: each spends its first
        second or two importing, and one after the other a stack took twice as long to start."""
        providers = tuple(providers)
        self.start_redis()
        for provider in providers:  # every process is given the whole stack's addresses (and keys) at its start
            self.ports.setdefault(provider, free_port())
        if "tuputech" in providers:
            self.tuputech_keys()
        starting = self._launch_s3() + [self._launch_emulator(provider) for provider in providers]
        if callbacks:
            starting.append(self._launch_callbacks())
        self._all_ready(starting)
        self.activate()
        from pipeline.storage import ensure_buckets

        ensure_buckets()

    def start_all(self, providers: Iterable[str], workers: int, name: str = "w") -> None:
        """The whole local stack, as ``docpipe demo`` and ``docpipe up`` run it: Redis, S3, the
        emulators, the callback receiver, ``workers`` workers on every provider's queue, Flower."""
        providers = tuple(providers)
        self.start_base(providers, callbacks=True)
        names = [f"{name}{n + 1}" for n in range(workers)]
        for worker in names:
            self.start_worker(worker, [f"docpipe.{p}" for p in providers], wait=False)
        self.wait_workers(names)
        self.start_flower()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process, in two waves, each signalled at once and given one shared deadline:
        first those that use the others (workers, Flower, the receiver: a worker's warm shutdown
        needs Redis to hand back its messages), then the servers. One at a time, a loaded machine
        made a stack of ten processes take minutes to stop."""
        clients = [p for name, p in self.procs.items() if name.startswith(("worker-", "flower", "callbacks"))]
        servers = [p for p in self.procs.values() if p not in clients]
        with _signals_held():
            for wave in (clients, servers):
                for proc in wave:
                    proc.signal(signal.SIGTERM)
                deadline = time.monotonic() + timeout
                for proc in wave:
                    proc.reap(deadline)
            self.procs.clear()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
