"""tuputech end to end: signed submits, signed callbacks, the 30-task lease, on real processes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import DocumentFailedError, enqueue, storage
from pipeline.devstack import LocalStack, wait_until
from pipeline.samples import make_report_pdf
from tests.conftest import FAST_POLLING, EmulatorControl


def _reports(folder: Path, count: int) -> list:
    samples = []
    for n in range(count):
        flagged = None if n % 3 == 0 else 1
        word = "FORBIDDEN" if n % 3 == 1 else "REVIEW"
        samples.append(make_report_pdf(folder / f"report-{n:03d}.pdf", n, flagged_page=flagged, word=word))
    return samples


def test_batch_is_moderated_with_verdicts_and_page_texts(tuputech, docs):
    tuputech.config(callback_rule="all")
    samples = _reports(docs, 21)
    handles = [enqueue(s.path, provider="tuputech", options={"callback_rule": "all"}) for s in samples]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda h: h.wait(timeout=240), handles))
    for sample, handle, result in zip(samples, handles, results):
        assert result.moderation is not None
        assert result.moderation.suggestion == sample.expected["verdict"], sample.path.name
        pages = int(sample.expected["pages"])
        assert result.document.pages == pages
        if sample.expected["verdict"] != "pass":
            assert result.moderation.pages == [1]
        names = storage.archive_names("tuputech", handle.job_id)
        assert {"result.json", "raw.json"} <= names
        assert {f"pages/{n}.txt" for n in range(1, pages + 1)} <= names
        assert "Quarterly report" in result.pages[0].text
        raw = json.dumps(storage.get_json(storage.archive_prefix("tuputech", handle.job_id) + "raw.json"))
        assert "X-Amz-Signature=REDACTED" in raw or "X-Amz-Signature" not in raw
        assert "signature" not in json.loads(raw)
    stats = tuputech.stats()
    assert stats["max_in_flight_seen"] <= 30
    assert stats["endpoints"]["submit"]["accepted"] == len(samples)


def test_a_document_the_provider_cannot_read_fails_with_code_14(tuputech, docs):
    tuputech.config(max_doc_bytes=100)
    sample = _reports(docs, 1)[0]
    handle = enqueue(sample.path, provider="tuputech")
    with pytest.raises(DocumentFailedError) as failure:
        handle.wait(timeout=120)
    assert failure.value.error.stage == "await"
    assert failure.value.error.provider_code == "14"


# --- the concurrency limit on its own stack (the workers read the limit at start) --------------


LIMIT = 3
# The tests on this stack run on one xdist worker: a module fixture starts once per worker that needs it.
LIMITED = pytest.mark.xdist_group("limited")


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory: pytest.TempPathFactory):
    local = LocalStack(
        tmp_path_factory.mktemp("limited"),
        emulator_config={"tuputech": {"processing_min": 0.5, "processing_max": 1.5}},
        settings={**FAST_POLLING, "DOCPIPE_TUPUTECH_MAX_IN_FLIGHT": str(LIMIT), "DOCPIPE_LEASE_GRACE": "4"},
    )
    try:
        local.start_base(["tuputech"], callbacks=True)
        local.start_worker("l1", ["docpipe.tuputech"], wait=False)
        local.start_worker("l2", ["docpipe.tuputech"], wait=False)
        local.wait_workers(["l1", "l2"])
        yield local
    finally:
        local.stop()


@LIMITED
def test_never_more_than_the_limit_in_flight_at_the_provider(limited_stack, tmp_path):
    limited_stack.activate()
    control = EmulatorControl(limited_stack.emulator_url("tuputech"))
    control.reset()
    handles = [enqueue(s.path, provider="tuputech") for s in _reports(tmp_path, 20)]
    for handle in handles:
        handle.wait(timeout=240)
    stats = control.stats()
    assert stats["tasks_accepted"] == 20
    assert stats["max_in_flight_seen"] == LIMIT


@LIMITED
def test_a_killed_worker_does_not_hold_its_lease_past_the_grace(limited_stack, tmp_path):
    """A worker killed between taking a lease and submitting: the slot is free again within the grace."""
    limited_stack.activate()
    from pipeline.runtime import get_runtime
    from pipeline.providers import get_provider

    rt = get_runtime()
    provider = get_provider("tuputech")
    key = provider.lease_key()
    # Hold the slots as a dead worker would: taken with the grace TTL, never confirmed.
    for n in range(LIMIT):
        assert rt.leases.try_acquire(key, f"dead-worker-{n}", LIMIT, rt.settings.lease_grace)
    started = time.monotonic()
    handle = enqueue(_reports(tmp_path, 1)[0].path, provider="tuputech")
    handle.wait(timeout=120)
    waited = time.monotonic() - started
    assert waited >= rt.settings.lease_grace - 1  # it really had to wait for the dead leases...
    assert waited < rt.settings.lease_grace + 30  # ...and not longer than their grace (plus the work)


@LIMITED
def test_kill_9_of_a_worker_mid_batch_loses_nothing_and_leaks_no_lease(limited_stack, tmp_path):
    limited_stack.activate()
    control = EmulatorControl(limited_stack.emulator_url("tuputech"))
    control.reset()
    victim = limited_stack.start_worker("victim", ["docpipe.tuputech"])
    handles = [enqueue(s.path, provider="tuputech") for s in _reports(tmp_path, 12)]
    # Killed once the batch is under way: tasks at the provider, slots held, submits waiting for one.
    wait_until(lambda: control.endpoint("submit")["accepted"] >= LIMIT, 120, "the first tasks at tuputech")
    victim.kill()
    limited_stack.procs.pop("worker-victim")
    failures = []
    for handle in handles:
        try:
            handle.wait(timeout=300)
        except DocumentFailedError as failed:
            failures.append(failed.error.code)
    # A submit the kill cut after it left may have made a task (tuputech's callback would say so;
    # none came): the document fails saying so rather than be sent twice. Nothing else may fail.
    assert set(failures) <= {"submit_outcome_unknown"} and len(failures) <= LIMIT, failures  # at most the slots it held
    stats = control.stats()
    assert stats["endpoints"]["submit"]["accepted"] <= len(handles)  # no document made two tasks
    assert stats["max_in_flight_seen"] <= LIMIT
    from pipeline.runtime import get_runtime
    from pipeline.providers import get_provider

    assert get_runtime().leases.held(get_provider("tuputech").lease_key()) == 0


@LIMITED
def test_submits_wait_while_no_callback_receiver_is_alive(limited_stack, tmp_path):
    """A result posted while the receiver is down is lost once tuputech stops retrying, and the
    document ends as callback_missing: while no receiver beats, no document is submitted; they go
    as soon as one is back."""
    from pipeline import jobs, liveness
    from pipeline.runtime import get_runtime

    limited_stack.activate()
    client = get_runtime().redis
    control = EmulatorControl(limited_stack.emulator_url("tuputech"))
    control.reset()
    limited_stack.procs.pop("callbacks").stop()
    try:
        assert not liveness.receiver_alive(client)  # a receiver that stops takes its heartbeat with it
        handles = [enqueue(s.path, provider="tuputech") for s in _reports(tmp_path, 2)]

        def waiting_at_submit() -> dict[str, str]:
            records = {h.job_id: jobs.read(client, h.job_id) for h in handles}
            return {j: r.get("msg", "") for j, r in records.items() if r.get("step") == "submit"}

        wait_until(lambda: len(waiting_at_submit()) == 2, 60, "both documents at their submit")
        first = waiting_at_submit()
        # Each submit has looked and been put off (its message re-published) at least once.
        wait_until(lambda: all(msg != first[j] for j, msg in waiting_at_submit().items()) and len(waiting_at_submit()) == 2, 60,
                   "both submits to be put off")
        assert control.endpoint("submit")["accepted"] == 0
    finally:
        limited_stack.start_callbacks()
    assert liveness.receiver_alive(client)
    for handle in handles:
        handle.wait(timeout=120)
    assert control.endpoint("submit")["accepted"] == 2


# --- a callback wakes the step that waits for it ---------------------------------------------


@pytest.mark.xdist_group("slow-polling")
def test_a_callback_wakes_its_waiting_step_however_far_off_its_next_poll(tmp_path_factory, tmp_path):
    """Polls a minute apart: the documents are archived within seconds of their callbacks, because
    the receiver hands each waiting step to a message due now (``callbacks.wake``)."""
    minute = {"DOCPIPE_POLL_FIRST_DELAY": "60", "DOCPIPE_POLL_BASE_DELAY": "60", "DOCPIPE_POLL_MAX_DELAY": "60", "DOCPIPE_POLL_POLICY": "backoff"}
    local = LocalStack(tmp_path_factory.mktemp("slow-polling"), emulator_config={"tuputech": {"processing_min": 0.5, "processing_max": 1.5}}, settings=minute)
    try:
        local.start_base(["tuputech"], callbacks=True)
        local.start_worker("w1", ["docpipe.tuputech"])
        local.activate()
        started = time.monotonic()
        handles = [enqueue(s.path, provider="tuputech") for s in _reports(tmp_path, 3)]
        for handle in handles:
            handle.wait(timeout=40)  # without the wake: a minute after each submit
        assert time.monotonic() - started < 40
    finally:
        local.stop()
