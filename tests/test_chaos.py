"""A short version of every ``bench.chaos`` scenario, on a stack of its own: each fault played
end to end on real processes, and the invariants checked by the referees (the emulators and
the S3 front): nothing lost, nothing archived twice, no provider task beyond one per
document, no limit exceeded. The benchmark plays the same faults on 210 documents each and
prints the figures; here the batches are small and the outages seconds long.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import chaos

DOCS = 14
OUTAGE = 6.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[chaos.Chaos]:
    chaos.SETTINGS["DOCPIPE_TUPUTECH_CALLBACK_WINDOW"] = "5"
    # Shorter clocks than production's (the benchmark plays those): heartbeats, grace, reconciler.
    chaos.SETTINGS.update(DOCPIPE_HEARTBEAT_EVERY="1", DOCPIPE_HEARTBEAT_TTL="6", DOCPIPE_STEP_GRACE="5", DOCPIPE_RECONCILE_EVERY="1")
    # The session stack's shorter processing times and retry waits: what a scenario checks is
    # where each document ends, not how long production's clocks take to get it there.
    chaos.SETTINGS.update(DOCPIPE_RETRY_MAX_DELAY="2", DOCPIPE_POLL_MAX_DELAY="2")
    emulators = {p: {"processing_min": 0.5, "processing_max": 2.0} for p in chaos.PROVIDERS}
    run = chaos.Chaos(Path(tmp_path_factory.mktemp("chaos")), workers=2, emulator_config=emulators)
    try:
        run.start()
        yield run
    finally:
        run.stack.stop()


def _holds(row: chaos.Row, *, archived_at_least: int) -> None:
    assert (row.lost, row.archived_twice, row.extra_provider_tasks, row.limit_violations) == (0, 0, 0, 0), (row.notes, row.as_json())
    assert row.archived >= archived_at_least, row.as_json()
    assert row.archived + row.failed == row.documents


def _every_stage(run: chaos.Chaos, handles, length):
    played = []
    for stage in ("stage", "submit", "await", "fetch", "archive"):
        played += chaos.kill_during(stage, kills=1)(run, handles, length)
    return played


# Two chaos stacks at most, each playing about half of the scenarios (under pytest-xdist).
FIRST, SECOND = pytest.mark.xdist_group("chaos-1"), pytest.mark.xdist_group("chaos-2")


@pytest.mark.parametrize(
    ("name", "fault", "docs"),
    [
        pytest.param("kill_at_each_stage", _every_stage, 30, marks=FIRST),
        pytest.param("redis_restart", chaos.after(3, chaos._restart_redis), DOCS, marks=SECOND),
        pytest.param("redis_oom", chaos.after(3, chaos._oom, chaos._oom_over, hold=OUTAGE), DOCS, marks=SECOND),
        pytest.param("redis_readonly", chaos.after(3, chaos._readonly, chaos._readonly_over, hold=OUTAGE), DOCS, marks=FIRST),
        pytest.param("s3_outage", chaos._s3_down(OUTAGE), DOCS, marks=SECOND),
        pytest.param("redis_20ms", chaos._latency(20), DOCS, marks=SECOND),
    ],
)
def test_infrastructure_faults_lose_nothing_and_double_nothing(stack, name, fault, docs):
    row = chaos.run(stack, name, fault, docs, OUTAGE, timeout=240)
    if name.startswith("kill"):
        # A submit cut short by a kill may fail with submit_outcome_unknown: honest, and not a loss.
        _holds(row, archived_at_least=row.documents - row.failures.get("submit_outcome_unknown", 0))
        assert row.recovery_s is not None and row.recovery_s <= 60, row.as_json()
        assert row.faults_played == 5, row.as_json()  # a worker killed in each of the five stages
    else:
        # An outage of Redis or S3 delays documents; it fails none (a submit whose document S3
        # stopped serving midway never reached the provider: it is sent again, not 'unknown').
        _holds(row, archived_at_least=row.documents)


@SECOND
def test_provider_faults_are_retried_without_a_second_task(stack):
    faults = {"http_5xx_rate": 0.1, "internal_error_rate": 0.05, "slow_rate": 0.03, "slow_seconds": 8, "drop_rate": 0.05, "spurious_limit_rate": 0.05}
    row = chaos.run(stack, "provider_faults", chaos._emulators({p: {"faults": faults} for p in chaos.PROVIDERS}), DOCS, OUTAGE, timeout=240)
    _holds(row, archived_at_least=1)
    assert set(row.failures) <= {"submit_outcome_unknown"}, row.as_json()  # only where a task may exist


@FIRST
def test_tuputech_callbacks_lost_late_twice_or_with_the_receiver_down(stack):
    lost = chaos.run(stack, "lost_callbacks", chaos._lost_callbacks(3), DOCS, OUTAGE, timeout=240)
    dropped = stack.emulator("tuputech", "/_emulator/stats")["callbacks_dropped"]
    assert dropped >= 3
    _holds(lost, archived_at_least=lost.documents - dropped)
    assert lost.failures == {"callback_missing": dropped}, lost.as_json()  # each lost callback, and nothing else
    twice = chaos.run(stack, "callbacks_twice_and_late", chaos._emulators({"tuputech": {"callback_duplicate_rate": 1.0, "callback_delay": 2.0}}), DOCS, OUTAGE, timeout=240)
    _holds(twice, archived_at_least=twice.documents)
    down = chaos.run(stack, "receiver_down", chaos._receiver_down(OUTAGE), DOCS, OUTAGE, timeout=240)
    _holds(down, archived_at_least=1)
    assert set(down.failures) <= {"callback_missing", "provider_failed"}, down.as_json()
