"""Fixtures that start real processes on free ports: redis-server, moto's S3 server, the
baidu emulator and two Celery workers. Nothing here is mocked."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from pipeline import DocumentFailedError, jobs
from pipeline.devstack import LocalStack, local_http

PROVIDERS = ("baidu", "idp", "tuputech")
EMULATORS = {name: {"processing_min": 0.5, "processing_max": 2.0} for name in PROVIDERS}
QUEUES = [f"docpipe.{name}" for name in PROVIDERS]
FAST_POLLING = {
    "DOCPIPE_POLL_FIRST_DELAY": "1",
    "DOCPIPE_POLL_BASE_DELAY": "0.5",
    "DOCPIPE_POLL_MAX_DELAY": "2",
    "DOCPIPE_VISIBILITY_TIMEOUT": "30",
    "DOCPIPE_IDP_LOGIN_COOLDOWN": "3",
    "DOCPIPE_LEASE_GRACE": "5",
    # The reconciler's clocks, shortened: a dead worker is found in seconds, not the 15 s + 30 s
    # of production (bench.chaos measures those).
    "DOCPIPE_HEARTBEAT_EVERY": "1",
    "DOCPIPE_HEARTBEAT_TTL": "6",
    "DOCPIPE_STEP_GRACE": "5",
    # A transient failure is retried after 1, 2, 2, 2 ... s instead of up to a minute: the retries
    # and their count are what the tests check, not the production waits.
    "DOCPIPE_RETRY_MAX_DELAY": "2",
    "DOCPIPE_RECONCILE_EVERY": "1",
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    local = LocalStack(tmp_path_factory.mktemp("stack"), emulator_config=EMULATORS, settings=dict(FAST_POLLING))
    try:
        local.start_base(PROVIDERS, callbacks=True)
        local.start_worker("w1", QUEUES, wait=False)
        local.start_worker("w2", QUEUES, wait=False, env={"DOCPIPE_LOG_FORMAT": "json"})  # one logs JSON lines
        local.wait_workers(["w1", "w2"])
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def flower(stack: LocalStack) -> LocalStack:
    """Flower on the session's stack, started by the first module that asks (modules that read it
    ask first thing, so it sees their tasks): a monitor costs CPU that most tests do not need."""
    if "flower" not in stack.procs:
        stack.start_flower()
    return stack


class EmulatorControl:
    """Talks to an emulator's /_emulator/* routes."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.defaults = self.config()

    def config(self, **changes) -> dict:
        if changes:
            return local_http().post(f"{self.base_url}/_emulator/config", json=changes).json()
        return local_http().get(f"{self.base_url}/_emulator/config").json()

    def stats(self) -> dict:
        return local_http().get(f"{self.base_url}/_emulator/stats").json()

    def endpoint(self, name: str) -> dict:
        return self.stats()["endpoints"].get(name, {"requests": 0, "accepted": 0, "limit_violations": 0})

    def reset(self) -> None:
        local_http().post(f"{self.base_url}/_emulator/config", json=self.defaults)
        local_http().post(f"{self.base_url}/_emulator/reset")

    def post(self, path: str) -> dict:
        return local_http().post(f"{self.base_url}{path}").json()


_LEFT_IN_FLIGHT: set[str] = set()  # jobs an earlier _settle gave up waiting for: not waited for again


def _settle(stack: LocalStack, timeout: float = 20.0) -> None:
    """Wait until the documents of the tests before have ended: a document a test left in flight
    (one a cancel found at the provider) kept polling, and the next test's referee counted its
    requests as that test's (baidu's 25-request burst saw 16 refusals, its emulator 17).
    Best effort: a job still active after ``timeout`` is named in a warning and left to its end."""
    client = redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"])
    deadline = time.monotonic() + timeout
    while waiting := {m.decode() for m in client.zrange(jobs.ACTIVE, 0, -1)} - _LEFT_IN_FLIGHT:
        if time.monotonic() > deadline:
            _LEFT_IN_FLIGHT.update(waiting)
            named = [f"{r.get('provider')}/{j} {r.get('state')} at {r.get('step')} ({r.get('source')})" for j in waiting for r in [jobs.read(client, j)]]
            warnings.warn(f"still in flight from earlier tests: {named}", stacklevel=2)
            return
        time.sleep(0.1)


def _emulator(stack: LocalStack, name: str) -> Iterator[EmulatorControl]:
    """The session's emulator for ``name``, with its config and statistics reset around the test.

    Each xdist worker runs its own stack (its own emulators, Redis and S3 on ports of its own), and
    runs its tests one at a time: a test has its emulators to itself without any lock."""
    control = EmulatorControl(stack.emulator_url(name))
    _settle(stack)
    control.reset()
    stack.activate()
    yield control
    control.reset()
    # A failed login leaves a cool-down for every worker; it must not outlive the test that caused it.
    client = redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"])
    for key in client.scan_iter(f"docpipe:cred-cooldown:{name}:*"):
        client.delete(key)


@pytest.fixture
def baidu(stack: LocalStack) -> Iterator[EmulatorControl]:
    yield from _emulator(stack, "baidu")


@pytest.fixture
def idp(stack: LocalStack) -> Iterator[EmulatorControl]:
    yield from _emulator(stack, "idp")


@pytest.fixture
def tuputech(stack: LocalStack) -> Iterator[EmulatorControl]:
    yield from _emulator(stack, "tuputech")


class RecordedSubmission:
    """Stands in for ``pipeline.submission.Submission`` in unit tests: records what a provider reports."""

    def __init__(self) -> None:
        self.accepted_ids: list[str] = []
        self.sent = False
        self.answered = False
        self.turn = 0.0

    def take_slot(self, *, marking: bool = False) -> bool:
        return False

    def sending(self) -> None:
        self.sent = True

    def not_sent(self) -> None:
        self.sent = False

    def accepted(self, task_id: str) -> None:
        self.accepted_ids.append(task_id)


def outcomes(handles, timeout: float = 240) -> list:
    """Each handle's result, or its ``DocumentFailedError``, waited for together."""

    def outcome(handle):
        try:
            return handle.wait(timeout=timeout)
        except DocumentFailedError as failure:
            return failure

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(outcome, handles))


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    return folder


def pytest_configure(config: pytest.Config) -> None:
    # The tests' own work (making documents, reading archives) comes after the stack's processes,
    # which each take an absolute priority when they start (see LocalStack._spawn).
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(5, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:
        pass
    config.addinivalue_line("markers", "after_all: runs after every other test (it inspects what they left behind)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)
    # --dist loadgroup keeps an xdist_group on one worker by a "@group" suffix on the test ids.
    # pytest-xdist 3.8 writes it to ``item._nodeid``, which pytest 9 no longer reads (its ids
    # live in ``item._id``): the groups were spread over every worker. Written here where it counts.
    if getattr(config.option, "loadgroup", False):
        for item in items:
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
            if names and "@" not in item.nodeid:
                grouped = f"{item.nodeid}@{'_'.join(names)}"
                if hasattr(item, "_id"):
                    from _pytest.nodeid import coerce_node_id

                    item._id = coerce_node_id(grouped)
                else:
                    item._nodeid = grouped
