"""The network emulator as a real process in front of a real redis-server.

What is pinned: traffic passes unchanged; the delay is added in each direction (a round
trip gains twice it) and is a delay line, so a pipeline of 1000 commands costs about one
round trip more, not 1000; ``refuse`` really closes the port (ECONNREFUSED) and opens it
again; ``drop`` cuts open connections. Timings are asserted only as bounds a correct proxy
cannot miss however loaded the machine (a delay is a lower bound; a throttle would need
at least one delay per chunk, far above what is allowed).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from emulators.netem import ThreadedNetEm
from pipeline.devstack import free_port, wait_until

# Its module-scoped servers start once, on one xdist worker, not once on every worker that runs one of its tests.
pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
    pytest.mark.xdist_group("netem"),
]


@dataclass
class Proxy:
    port: int
    control: str
    redis_port: int

    def post(self, path: str, **body: float) -> dict:
        response = httpx.post(f"{self.control}{path}", json=body, timeout=5)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict:
        return httpx.get(f"{self.control}/stats", timeout=5).json()

    def client(self, **kwargs) -> redis.Redis:
        """A client that fails at once instead of retrying: the tests want to see each failure."""
        return redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0), socket_timeout=10, **kwargs)


def _serves(port: int) -> bool:
    with redis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_timeout=2) as client:
        return client.ping()


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _serves(port), 20, "redis-server")
        yield port
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def netem_process(redis_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    port, control = free_port(), free_port()
    log = tmp_path_factory.mktemp("netem") / "netem.log"
    argv = [sys.executable, "-m", "emulators.netem", "--listen-port", str(port), "--upstream-host", "127.0.0.1",
            "--upstream-port", str(redis_port), "--control-port", str(control)]
    with log.open("wb") as sink:  # the child keeps its own descriptor
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=sink)
    proxy = Proxy(port, f"http://127.0.0.1:{control}", redis_port)
    try:
        wait_until(lambda: proxy.stats()["listening"] and _serves(port), 20, "netem")
        yield proxy
    finally:
        process.terminate()
        process.wait(10)
        assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def proxy(netem_process: Proxy) -> Iterator[Proxy]:
    """The module's proxy, listening and without delay before and after each test."""
    wait_until(lambda: netem_process.stats()["listening"], 10, "netem listening")
    netem_process.post("/delay", ms=0)
    yield netem_process
    netem_process.post("/delay", ms=0)
    wait_until(lambda: netem_process.stats()["listening"], 10, "netem listening")


def test_commands_pass_through_unchanged(proxy: Proxy) -> None:
    value = bytes(range(256)) * 300  # every byte value, bigger than one read
    with proxy.client() as client, redis.Redis(port=proxy.redis_port) as direct:
        client.set("netem:blob", value)
        assert client.get("netem:blob") == value
        assert direct.get("netem:blob") == value  # it reached the real server
    stats = proxy.stats()
    assert stats["bytes_up"] >= len(value) and stats["bytes_down"] >= len(value)


def test_delay_applies_in_each_direction(proxy: Proxy, request: pytest.FixtureRequest) -> None:
    client = proxy.client()
    request.addfinalizer(client.close)
    client.ping()  # connect (and the client's hello) before timing
    assert proxy.post("/delay", ms=10)["delay_ms"] == 10
    for _ in range(3):
        started = time.perf_counter()
        assert client.ping()
        assert time.perf_counter() - started >= 0.020  # 10 ms out, 10 ms back


def test_pipeline_costs_one_round_trip_not_one_per_command(proxy: Proxy, request: pytest.FixtureRequest) -> None:
    client = proxy.client()
    request.addfinalizer(client.close)
    client.ping()
    delay = 0.010
    proxy.post("/delay", ms=delay * 1000)
    value = b"v" * 8192
    before = proxy.stats()
    started = time.perf_counter()
    with client.pipeline(transaction=False) as pipe:
        for i in range(1000):
            pipe.set(f"netem:pipe:{i}", value)
        assert pipe.execute() == [True] * 1000
    with client.pipeline(transaction=False) as pipe:
        for i in range(1000):
            pipe.get(f"netem:pipe:{i}")
        assert pipe.execute() == [value] * 1000
    elapsed = time.perf_counter() - started
    after = proxy.stats()
    chunks = after["chunks_up"] - before["chunks_up"] + after["chunks_down"] - before["chunks_down"]
    # 2 x 8 MB moved in >= 64 KB chunks: a proxy that slept per chunk would need chunks x delay.
    assert chunks >= 200
    assert elapsed >= 2 * 2 * delay  # two pipelines, one round trip each
    assert elapsed < chunks * delay / 2, f"{elapsed:.2f}s for {chunks} chunks: a throttle, not a delay line"
    assert elapsed < 2000 * 2 * delay / 10  # far from one round trip per command


def test_refuse_closes_the_port_then_serves_again(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as held:
        held.sendall(b"PING\r\n")
        assert held.recv(64) == b"+PONG\r\n"  # linked to redis through the proxy
        started = time.monotonic()
        state = proxy.post("/refuse", seconds=1.0)
        assert state["listening"] is False and state["connections_open"] == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        with pytest.raises(redis.ConnectionError), proxy.client() as client:
            client.ping()
        try:  # the open connection was cut
            assert held.recv(64) == b""
        except ConnectionResetError:
            pass
    wait_until(lambda: _serves(proxy.port), 10, "the port serving again", interval=0.02)
    assert time.monotonic() - started >= 0.95  # the listening socket stayed closed for the whole period
    assert proxy.stats()["listening"] is True


def test_drop_cuts_open_connections(proxy: Proxy, request: pytest.FixtureRequest) -> None:
    # A command in flight, not an idle connection: redis-py quietly replaces idle ones it finds dead.
    client = proxy.client()
    request.addfinalizer(client.close)
    outcome: dict[str, object] = {}

    def wait_for_a_push() -> None:
        try:
            outcome["result"] = client.blpop(["netem:never"], timeout=5)
        except redis.ConnectionError as exc:
            outcome["error"] = exc

    waiter = threading.Thread(target=wait_for_a_push)
    waiter.start()
    watcher = redis.Redis(port=proxy.redis_port)
    request.addfinalizer(watcher.close)
    wait_until(lambda: watcher.info("clients")["blocked_clients"] >= 1, 10, "BLPOP blocked in redis")
    assert proxy.post("/drop")["dropped"] >= 1
    waiter.join(10)
    assert isinstance(outcome.get("error"), redis.ConnectionError), outcome
    assert client.ping()  # a new connection is fine: only the open ones were cut


def test_in_process_netem(redis_port: int) -> None:
    with ThreadedNetEm("127.0.0.1", redis_port, delay_ms=5) as netem, \
            redis.Redis(port=netem.port, retry=Retry(NoBackoff(), 0)) as client:
        client.ping()
        started = time.perf_counter()
        client.ping()
        assert time.perf_counter() - started >= 0.010
        netem.refuse(0.3)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", netem.port), timeout=5)
        wait_until(lambda: client.ping(), 10, "the in-process proxy serving again", interval=0.02)
        assert netem.stats()["connections_total"] >= 2
