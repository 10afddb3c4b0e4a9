"""A backlog waits its turn, and a message lost from it is found, on a real stack of its own.

The batch is enqueued while no worker runs, so its first messages wait in their Redis list for
longer than ``DOCPIPE_BACKLOG_GRACE``: the reconciler must leave them there (it used to send
every one again). One message is then taken out of the list, as a publish Redis acknowledged
and lost would leave it; once a worker has read the list past it, the reconciler sends it
again, and every document is archived, each submitted once (the emulator is the referee).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline import jobs, stages
from pipeline.devstack import LocalStack, wait_until
from pipeline.enqueue import enqueue_many
from pipeline.reconcile import Reconciler
from pipeline.runtime import get_runtime, reset_runtime
from pipeline.samples import make_batch
from tests.conftest import EMULATORS, FAST_POLLING, EmulatorControl, outcomes

GRACE, BACKLOG_GRACE = 2.0, 3.0
SETTINGS = {**FAST_POLLING, "DOCPIPE_STEP_GRACE": str(GRACE), "DOCPIPE_BACKLOG_GRACE": str(BACKLOG_GRACE)}


@pytest.fixture(scope="module")
def quiet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Redis, S3 and the baidu emulator, and no worker yet."""
    local = LocalStack(tmp_path_factory.mktemp("backlog"), emulator_config={"baidu": EMULATORS["baidu"]}, settings=SETTINGS)
    try:
        local.start_base(["baidu"])
        yield local
    finally:
        local.stop()
        reset_runtime()


def test_a_backlog_is_left_waiting_and_a_message_lost_from_it_is_sent_again(quiet_stack, tmp_path: Path):
    quiet_stack.activate()
    reset_runtime()
    client = redis.Redis.from_url(quiet_stack.env["DOCPIPE_REDIS_URL"])
    its_lane = jobs.lane("baidu", stages.priority("stage"))
    handles = [sent.handle for sent in enqueue_many([s.path for s in make_batch(tmp_path / "docs", 12)], provider="baidu")]
    assert all(handles) and client.llen(its_lane) == 12
    last_due = max(float(jobs.read(client, h.job_id)["due"]) for h in handles)

    from workers.tasks import publish_redriven

    rt = get_runtime()
    wait_until(lambda: time.time() > last_due + GRACE + BACKLOG_GRACE + 0.5, 30, "the backlog waiting past backlog_grace")
    assert Reconciler(rt.redis, rt.ledger, publish_redriven, backlog_grace=BACKLOG_GRACE).run_once().redriven == []
    assert client.llen(its_lane) == 12  # nothing sent again

    fifth = client.lindex(its_lane, -5)  # kombu pushes on the left and pops on the right
    client.lrem(its_lane, 1, fifth)
    lost_msg = json.loads(fifth)["headers"]["id"]
    lost = next(h for h in handles if jobs.read(client, h.job_id)["msg"] == lost_msg)

    quiet_stack.start_worker("w1", ["docpipe.baidu"], concurrency=2)
    results = outcomes(handles, timeout=120)
    assert not [r for r in results if isinstance(r, Exception)], results
    redriven = {h.job_id: jobs.read(client, h.job_id).get("redriven") for h in handles}
    assert redriven == {h.job_id: ("1" if h is lost else None) for h in handles}
    assert EmulatorControl(quiet_stack.emulator_url("baidu")).endpoint("submit")["accepted"] == 12  # each billed once
    assert client.zscore(jobs.RECEIVED, its_lane) >= last_due - 0.01  # the worker marked how far it read the lane
