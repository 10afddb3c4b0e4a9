"""The job ledger, the step driver and the reconciler, on the session's real Redis.

What is replaced here is only what these functions are handed: the stage a step runs (a
function of the test's) and the publish (a list, or one that fails the way a Redis refusing
writes does). End to end, the same paths run in the pipeline tests and in ``bench.chaos``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu.exceptions import OperationalError

from pipeline import driver, jobs, stages
from pipeline.jobs import JobLedger
from pipeline.models import Job
from pipeline.reconcile import Lane, Reconciler, look_again_in
from pipeline.runtime import get_runtime, reset_runtime


@pytest.fixture
def ledger(stack, monkeypatch) -> Iterator[JobLedger]:
    """A Redis database of its own on the session's server: the session's workers and their
    reconcilers never see these jobs (they would re-drive them for real)."""
    stack.activate()
    monkeypatch.setenv("DOCPIPE_REDIS_URL", stack.env["DOCPIPE_REDIS_URL"].rsplit("/", 1)[0] + "/7")
    reset_runtime()
    get_runtime().redis.flushdb()
    yield JobLedger(get_runtime().redis, grace=1.0, stall=30.0)
    monkeypatch.undo()
    stack.activate()


def _job() -> Job:
    job_id = uuid.uuid4().hex
    return Job(job_id=job_id, provider="idp", source="s3://b/k", location="s3://b/k")


def _beat(holder: str, alive: bool = True) -> None:
    client = get_runtime().redis
    if alive:
        client.set(f"{jobs.WORKER_PREFIX}{holder}", "1", ex=30)
    else:
        client.delete(f"{jobs.WORKER_PREFIX}{holder}")


def test_only_the_current_message_may_move_a_job(ledger):
    job = _job()
    first, second = "m1-" + job.job_id, "m2-" + job.job_id
    assert ledger.start(job.job_id, first, "stage", job.model_dump(mode="json"), provider="idp")
    assert not ledger.start(job.job_id, "other", "stage", {})  # in flight: a second enqueue changes nothing
    assert ledger.claim(job.job_id, "other", "w:1") == "stale"
    assert ledger.claim(job.job_id, first, "w:1") == "ok"
    assert ledger.advance(job.job_id, first, second, "submit", {"x": 1}, time.time(), "w:1")
    assert ledger.advance(job.job_id, first, second, "submit", {"x": 1}, time.time(), "w:1")  # asked again: still yes
    assert ledger.claim(job.job_id, first, "w:2") == "stale"  # a copy of the old message, come back
    assert ledger.finish(job.job_id, second, "w:1") and ledger.claim(job.job_id, second, "w:1") == "stale"


def test_a_step_a_live_worker_runs_is_not_run_beside_it_but_a_dead_ones_is_taken_over(ledger):
    job = _job()
    msg = "m-" + job.job_id
    ledger.start(job.job_id, msg, "submit", job.model_dump(mode="json"))
    _beat("live:1")
    assert ledger.claim(job.job_id, msg, "live:1") == "ok"
    assert ledger.claim(job.job_id, msg, "other:2") == "busy"
    _beat("live:1", alive=False)
    assert ledger.claim(job.job_id, msg, "other:2") == "ok"


def test_a_copy_of_a_running_message_in_the_same_process_is_not_run_beside_it(ledger, monkeypatch):
    """Seen in CI: kombu put a running submit's message back when Redis restarted, another thread
    of the same worker took the copy, and the document was submitted (billed) twice."""
    job = _job()
    msg = "m-" + job.job_id
    ledger.start(job.job_id, msg, "submit", job.model_dump(mode="json"))
    _beat("w:1")
    assert ledger.claim(job.job_id, msg, "w:1", "t1") == "ok"
    assert ledger.claim(job.job_id, msg, "w:1", "t1") == "ok"  # the same attempt, asked again (its answer was lost)
    assert ledger.claim(job.job_id, msg, "w:1", "t2") == "running"  # same process, another thread: dropped
    assert get_runtime().redis.sismember(jobs.held_key("w:1"), f"{job.job_id} {msg}")  # the runner's entry stays

    def broken(j):
        raise KeyboardInterrupt  # an error that escapes the stage's own handling

    monkeypatch.setitem(driver.STAGE_FUNCTIONS, "submit", broken)
    ledger.unclaim(job.job_id, msg, "w:1")
    with pytest.raises(KeyboardInterrupt):
        driver.run_step("submit", job.model_dump(mode="json"), msg, publish=lambda *a: None, holder="w:1")
    assert jobs.read(get_runtime().redis, job.job_id)["holder"] == ""  # given back: the next copy may run it
    assert ledger.claim(job.job_id, msg, "w:1") == "ok"


def _held_at_stage(ledger: JobLedger) -> tuple[Job, str]:
    """A job whose first message (``stage``) is about to be run by the live worker ``w:1``."""
    job = _job()
    msg = "m-" + job.job_id
    ledger.start(job.job_id, msg, "stage", job.model_dump(mode="json"))
    _beat("w:1")
    return job, msg


def _stub_stages(monkeypatch, ran: list[str], *, delays: dict[str, float], crash_at: str = "") -> None:
    def stub(name: str):
        def run(j: Job) -> tuple[Job, float | None]:
            ran.append(name)
            if name == crash_at:
                raise KeyboardInterrupt  # the worker dies here, as far as this message is concerned
            return j, delays.get(name)

        return run

    for name in ("stage", "submit", "await", "fetch", "archive"):
        monkeypatch.setitem(driver.STAGE_FUNCTIONS, name, stub(name))


def test_stages_due_at_once_run_under_the_same_message_and_only_the_later_step_is_published(ledger, monkeypatch):
    job, msg = _held_at_stage(ledger)
    ran: list[str] = []
    _stub_stages(monkeypatch, ran, delays={"await": 3.0})  # await: look again in 3 s
    published: list[tuple[str, str, float]] = []
    answer = driver.run_step("stage", job.model_dump(mode="json"), msg, publish=lambda step, p, m, c: published.append((step, m, c)), holder="w:1")
    assert answer == "stage+submit+await: next await"
    assert ran == ["stage", "submit", "await"]
    assert [(step, countdown) for step, _, countdown in published] == [("await", 3.0)]
    assert jobs.read(get_runtime().redis, job.job_id)["msg"] == published[0][1]  # one hand-on, to the one published


def test_a_worker_dying_between_inline_stages_leaves_the_job_to_its_message_which_runs_them_again(ledger, monkeypatch):
    job, msg = _held_at_stage(ledger)
    ran: list[str] = []
    _stub_stages(monkeypatch, ran, delays={}, crash_at="submit")
    with pytest.raises(KeyboardInterrupt):
        driver.run_step("stage", job.model_dump(mode="json"), msg, publish=lambda *a: pytest.fail("nothing is handed on"), holder="w:1")
    record = jobs.read(get_runtime().redis, job.job_id)
    assert (record["msg"], record["step"], record["holder"]) == (msg, "stage", "")  # the claimed message still owns the job
    ran.clear()
    _stub_stages(monkeypatch, ran, delays={})
    assert driver.run_step("stage", job.model_dump(mode="json"), msg, publish=lambda *a: pytest.fail("due at once"), holder="w:2") == (
        "stage+submit+await+fetch+archive: ended"
    )
    assert ran == ["stage", "submit", "await", "fetch", "archive"]
    assert ledger.claim(job.job_id, msg, "w:3") == "stale"  # ended: the message cannot move it again


def test_a_publish_refused_by_redis_is_retried_until_it_goes_and_never_doubled(ledger, monkeypatch):
    job = _job()
    msg = "m-" + job.job_id
    get_runtime().ledger.start(job.job_id, msg, "fetch", job.model_dump(mode="json"))
    monkeypatch.setitem(driver.STAGE_FUNCTIONS, "fetch", lambda j: (j, 5.0))  # fetch again later: a message to publish
    monkeypatch.setattr(driver, "backoff", lambda attempt, cap=60.0: 0.01)
    published: list[tuple[str, str]] = []
    refusals = [redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"), OperationalError("broker gone")]

    def publish(step, payload, next_msg, countdown):
        if refusals:
            raise refusals.pop(0)
        published.append((step, next_msg))

    assert driver.run_step("fetch", job.model_dump(mode="json"), msg, publish=publish, holder="w:1") == "fetch: next fetch"
    assert len(published) == 1 and published[0][0] == "fetch"
    assert jobs.read(get_runtime().redis, job.job_id)["msg"] == published[0][1]  # the record names the one published


def test_the_reconciler_re_drives_a_dead_holders_jobs_and_lost_messages_but_not_a_queue_backlog(ledger):
    client = get_runtime().redis
    published: list[tuple[str, dict, str]] = []
    reconciler = Reconciler(client, ledger, lambda step, payload, msg, countdown: published.append((step, payload, msg)), backlog_grace=60)
    held, lost, waiting = _job(), _job(), _job()
    for job, provider in ((held, "idp"), (lost, "idp"), (waiting, "baidu")):
        job = job.model_copy(update={"provider": provider})
        ledger.start(job.job_id, f"m-{job.job_id}", "await", job.model_dump(mode="json"), provider=provider)
    client.sadd(jobs.held_key("dead:9"), f"{held.job_id} m-{held.job_id}")  # received by a worker that then died
    client.lpush(jobs.lane("baidu", stages.priority("await")), "a message waiting its turn")  # nobody consumes this database
    time.sleep(ledger.grace + 0.1)  # all three are overdue now
    done = reconciler.run_once()
    redriven = {job_id for job_id, _ in done.redriven}
    assert held.job_id in redriven and lost.job_id in redriven and waiting.job_id not in redriven
    assert client.zscore(jobs.ACTIVE, waiting.job_id) >= time.time() + ledger.grace - 0.5  # looked at again later, not every pass
    assert {p["job_id"] for _, p, _ in published} == {held.job_id, lost.job_id}
    for step, payload, msg in published:
        assert step == "await" and jobs.read(client, payload["job_id"])["msg"] == msg
        assert ledger.claim(payload["job_id"], f"m-{payload['job_id']}", "late:1") == "stale"  # the old copy is dead


def test_a_dead_holder_is_found_through_the_holders_its_heartbeat_registered_without_scanning(ledger, monkeypatch):
    """Scanning for held sets walked every key of Redis on every pass (a million job records: 2.4 s
    a pass); after its first pass a reconciler reads the holders that heartbeats registered."""
    from pipeline.liveness import Heartbeat

    client = get_runtime().redis
    published: list[tuple[str, dict, str]] = []
    reconciler = Reconciler(client, ledger, lambda step, payload, msg, countdown: published.append((step, payload, msg)))
    reconciler.run_once()  # the first pass, which also scans
    monkeypatch.setattr(client, "scan_iter", lambda *a, **k: pytest.fail("a later pass scanned the keyspace"))
    job = _job()
    ledger.start(job.job_id, f"m-{job.job_id}", "await", job.model_dump(mode="json"), provider="idp")
    Heartbeat(client, "gone:1", every=60, ttl=60).beat()
    assert client.sismember(jobs.HOLDERS, "gone:1")
    client.sadd(jobs.held_key("gone:1"), f"{job.job_id} m-{job.job_id}")
    client.delete(f"{jobs.WORKER_PREFIX}gone:1")  # its heartbeat lapsed: the process is gone
    assert reconciler.run_once().redriven == [(job.job_id, "worker died")]
    assert not client.sismember(jobs.HOLDERS, "gone:1") and not client.exists(jobs.held_key("gone:1"))


def _waiting(ledger: JobLedger, provider: str, step: str, *, late: float) -> tuple[Job, str]:
    """A job whose unclaimed message has been due for ``late`` seconds (as if it waited that long)."""
    job = _job().model_copy(update={"provider": provider})
    msg = f"m-{job.job_id}"
    ledger.start(job.job_id, msg, step, job.model_dump(mode="json"), provider=provider)
    due = time.time() - late
    get_runtime().redis.hset(jobs.key(job.job_id), "due", due)
    get_runtime().redis.zadd(jobs.ACTIVE, {job.job_id: due + ledger.grace})
    return job, msg


def test_a_message_waiting_its_turn_is_not_taken_for_lost_however_long_it_waits(ledger):
    """A backlog of a million documents waits for days: its messages are not lost, and re-sending
    them every ``backlog_grace`` re-published the whole backlog again and again."""
    client = get_runtime().redis
    published: list[tuple[str, dict, str]] = []
    reconciler = Reconciler(client, ledger, lambda step, payload, msg, countdown: published.append((step, payload, msg)), backlog_grace=60)
    job, msg = _waiting(ledger, "baidu", "stage", late=3600)  # an hour behind the queue, 60 times backlog_grace
    its_lane = jobs.lane("baidu", stages.priority("stage"))
    client.lpush(its_lane, "the backlog ahead of it")
    client.zadd(jobs.RECEIVED, {its_lane: time.time() - 3600 - 0.5})  # read up to messages sent before it
    assert reconciler.run_once().redriven == []
    assert client.zscore(jobs.ACTIVE, job.job_id) >= time.time() + 60 - 1  # looked at again in backlog_grace
    assert jobs.read(client, job.job_id)["msg"] == msg

    client.zadd(jobs.ACTIVE, {job.job_id: time.time() - 1})  # the next look is due
    client.zadd(jobs.RECEIVED, {its_lane: time.time() - 5})  # a worker received a message sent long after it
    assert reconciler.run_once().redriven == [(job.job_id, "message lost")]
    (step, payload, new_msg), = published
    record = jobs.read(client, job.job_id)
    assert step == "stage" and record["msg"] == new_msg and record["ahead"] == new_msg  # it went one lane ahead

    # Its new message is in the lane ahead, which nobody has read past: it waits there, however
    # far the lane it left was read.
    client.lpush(jobs.lane("baidu", stages.priority("stage", redriven=True)), "another re-driven message")
    since = time.time() - 3600
    client.hset(jobs.key(job.job_id), "due", since)
    client.zadd(jobs.ACTIVE, {job.job_id: since + ledger.grace})
    client.zadd(jobs.RECEIVED, {its_lane: time.time()})
    assert reconciler.run_once().redriven == []


def test_the_looks_at_a_waiting_message_space_out_as_it_waits():
    assert look_again_in(0.5, grace=30, longest=600) == 30
    assert [look_again_in(late, grace=30, longest=600) for late in (30, 60, 120, 240, 480, 960)] == [30, 60, 120, 240, 480, 600]
    assert Lane(0, None).passed(due=100.0, grace=30)  # an empty lane holds nothing
    assert not Lane(5, None).passed(due=100.0, grace=30)  # never read since Redis started: waiting
    assert not Lane(5, 120.0).passed(due=100.0, grace=30) and Lane(5, 131.0).passed(due=100.0, grace=30)


def test_a_listings_jobs_are_due_from_when_their_dispatch_publishes_them(ledger):
    """A dispatch message may wait its turn for minutes: the first steps it fans out are sent only
    then, and are not overdue the moment they are."""
    client = get_runtime().redis
    listed = [_job() for _ in range(3)]
    starts = [(job.job_id, f"m-{job.job_id}", "stage", job.model_dump(mode="json"), {"provider": "idp"}) for job in listed]
    assert get_runtime().ledger.start_many(starts) == [1, 1, 1]
    for job in listed:
        client.hset(jobs.key(job.job_id), "due", time.time() - 900)
        client.zadd(jobs.ACTIVE, {job.job_id: time.time() - 900})
    published: list[str] = []
    before = time.time()
    driver.dispatch([(job.model_dump(mode="json"), f"m-{job.job_id}") for job in listed], publish=lambda step, payload, msg, countdown: published.append(msg))
    assert published == [f"m-{job.job_id}" for job in listed]
    for job in listed:
        assert float(jobs.read(client, job.job_id)["due"]) >= before
        assert client.zscore(jobs.ACTIVE, job.job_id) >= before + get_runtime().ledger.grace


def test_a_submit_whose_job_was_handed_on_meanwhile_is_not_sent(ledger):
    """A worker taken for dead (starved of CPU past its heartbeat) may still be inside its submit
    step when the reconciler gives the job to another message: only the new holder may send."""
    job = _job()
    client = get_runtime().redis
    ledger.start(job.job_id, "m1", "submit", job.model_dump(mode="json"))
    assert ledger.claim(job.job_id, "m1", "slow:1") == "ok"
    assert ledger.redrive(job.job_id, "m1", "m2") is not None
    token = jobs.claimed_msg.set("m1")
    try:
        assert jobs.mark_sending(client, job.job_id) == -1
    finally:
        jobs.claimed_msg.reset(token)
    assert "sending_at" not in jobs.read(client, job.job_id)
    token = jobs.claimed_msg.set("m2")
    try:
        assert jobs.mark_sending(client, job.job_id) == 1
    finally:
        jobs.claimed_msg.reset(token)
    assert ledger.cancel(job.job_id) == "at_provider"  # from now on the provider may have it


def test_a_submit_takes_its_slot_and_its_sending_record_together_or_neither(ledger):
    """A submit that waits for no rate token takes its in-flight slot and records that it leaves in
    one script: no slot, nothing recorded; a cancelled or superseded job takes no slot."""
    client = get_runtime().redis
    leases = f"docpipe:test-leases:{uuid.uuid4().hex}"
    full = _job()
    ledger.start(full.job_id, "m1", "submit", full.model_dump(mode="json"))
    client.zadd(leases, {"someone-else": time.time() * 1000 + 60_000})
    token = jobs.claimed_msg.set("m1")
    try:
        assert jobs.mark_sending_in_slot(client, full.job_id, leases, 1, 5.0) == jobs.NO_SLOT
        assert "sending_at" not in jobs.read(client, full.job_id)
        assert jobs.mark_sending_in_slot(client, full.job_id, leases, 2, 5.0) == 1
        assert "sending_at" in jobs.read(client, full.job_id) and client.zscore(leases, full.job_id) is not None
    finally:
        jobs.claimed_msg.reset(token)

    handed_on, cancelled = _job(), _job()
    for job in (handed_on, cancelled):
        ledger.start(job.job_id, "m1", "submit", job.model_dump(mode="json"))
    assert ledger.redrive(handed_on.job_id, "m1", "m2") is not None
    assert ledger.cancel(cancelled.job_id) is not None
    token = jobs.claimed_msg.set("m1")
    try:
        assert jobs.mark_sending_in_slot(client, handed_on.job_id, leases, 10, 5.0) == -1
        assert jobs.mark_sending_in_slot(client, cancelled.job_id, leases, 10, 5.0) == 0
    finally:
        jobs.claimed_msg.reset(token)
    assert set(client.zrange(leases, 0, -1)) == {b"someone-else", full.job_id.encode()}
    for job in (handed_on, cancelled):
        assert "sending_at" not in jobs.read(client, job.job_id)
    client.delete(leases)


def test_a_task_the_provider_holds_is_looked_at_through_more_failures_than_a_submit():
    """Giving up at await throws away a task the provider has billed; at submit nothing is lost yet."""
    from pipeline.errors import RateLimited, Transient

    failure = Transient("baidu get_result: error_code 282000 (internal error)", code="provider_transient")
    assert driver._retry_cap(failure, 5, "submit") == 5
    assert driver._retry_cap(failure, 5, "await") == driver._retry_cap(failure, 5, "fetch") == 15
    assert driver._retry_cap(RateLimited("too fast", code="rate_limited"), 5, "submit") == 50
    # An answer of the wrong shape will be the same next time: no longer patience for it.
    assert driver._retry_cap(Transient("baidu get_result: answer is not JSON", code="malformed_answer"), 5, "await") == 5


def test_a_transient_failure_waits_longer_each_time_up_to_the_configured_cap():
    waits = [[driver.backoff(attempt, cap=4.0) for _ in range(200)] for attempt in range(6)]
    assert all(0.5 * min(4.0, 2.0**a) <= w <= min(4.0, 2.0**a) for a, row in enumerate(waits) for w in row)
    assert max(waits[5]) > 3.0  # the cap, not the doubling, bounds the later waits


def test_a_submit_that_never_left_clears_its_marker_through_a_redis_outage(ledger):
    """Killed Redis, seen by the suite: a submit marked as leaving was held past its send time,
    asked for another, found Redis loading its data, and left its marker behind; the next attempt
    took the marker for a request that may have been taken, and failed a document never sent."""
    from types import SimpleNamespace

    from pipeline.providers import get_provider
    from pipeline.submission import Submission

    job = _job().model_copy(update={"provider": "baidu"})
    client = get_runtime().redis
    client.hset(jobs.key(job.job_id), mapping={"state": "staged", "sending_at": str(time.time())})

    class LoadingAtFirst:
        def __init__(self) -> None:
            self.refusals = 2

        def hdel(self, *args):
            if self.refusals:
                self.refusals -= 1
                raise redis.BusyLoadingError("Redis is loading the dataset in memory")
            return client.hdel(*args)

    flaky = LoadingAtFirst()
    attempt = Submission(job, get_provider("baidu"), SimpleNamespace(redis=flaky, leases=None))
    attempt.refused()
    assert flaky.refusals == 0
    assert "sending_at" not in jobs.read(client, job.job_id)


def test_a_listing_chunk_sent_again_answers_the_same_and_counts_each_document_once(ledger):
    """``start_many`` is sent again whole when Redis refused part of it: a job's own start asked
    again is started (1) and changes nothing; a finished job stays finished and joins once as
    skipped (2); a job another chain runs keeps it (0)."""
    client = get_runtime().redis
    fresh, finished, running = _job(), _job(), _job()
    ledger.start(finished.job_id, "old-1", "stage", finished.model_dump(mode="json"), batch="earlier")
    jobs.record(client, finished.job_id, state="done", stage="archive")
    ledger.start(running.job_id, "old-2", "stage", running.model_dump(mode="json"), batch="earlier")
    starts = [(job.job_id, f"new-{n}", "stage", job.model_dump(mode="json"), {}) for n, job in enumerate((fresh, finished, running))]

    assert ledger.start_many(starts, batch="listed") == [1, 2, 0]
    assert ledger.start_many(starts, batch="listed") == [1, 2, 0]  # the same chunk again: nothing moves

    assert client.hget(jobs.key(fresh.job_id), "msg") == b"new-0"
    assert client.hget(jobs.key(finished.job_id), "state") == b"done" and client.hget(jobs.key(finished.job_id), "msg") == b"old-1"
    assert client.hget(jobs.key(running.job_id), "msg") == b"old-2"
    meta = client.hgetall("docpipe:batch:listed")
    assert int(meta[b"total"]) == 3 and int(meta[b"skipped"]) == 1
    counts = {k.decode(): int(v) for k, v in client.hgetall("docpipe:batch:listed:counts").items()}
    assert {state: n for state, n in counts.items() if n} == {"queued": 2, "done": 1}


def test_a_document_found_archived_twice_is_counted_skipped_once(ledger):
    """A stage step that found the archive and was run again (its worker died before it finished)
    records the same end: the batch's skipped count moves once."""
    client = get_runtime().redis
    job = _job()
    ledger.start(job.job_id, "m1", "stage", job.model_dump(mode="json"), batch="again")
    for _ in range(2):
        jobs.record(client, job.job_id, state="done", stage="archive", skipped=1)
    assert int(client.hget("docpipe:batch:again", "skipped")) == 1
    counts = {k.decode(): int(v) for k, v in client.hgetall("docpipe:batch:again:counts").items()}
    assert {state: n for state, n in counts.items() if n} == {"done": 1}


def test_a_result_parks_in_redis_and_one_redis_lost_is_fetched_again_not_lost(ledger, monkeypatch):
    """fetch parks a small normalized result in Redis for archive (the S3 work area cost three
    requests per document); archive commits it and clears it. A parked result Redis lost (a
    restart without its data) is fetched again from the provider and archived, not lost."""
    from pipeline import stages, storage
    from pipeline.models import DocumentInfo, NormalizedResult
    from pipeline.providers import get_provider
    from pipeline.providers.base import Fetched

    provider = get_provider("baidu")
    fetches = []

    def fetch(job, answer=None):
        fetches.append(job.job_id)
        document = DocumentInfo(bucket="b", key="k.png", filename="k.png", size=3, format="png")
        result = NormalizedResult(job_id=job.job_id, provider="baidu", source=job.source, document=document, provider_task_id="t-1")
        return Fetched(result=result, raw={"task_result": {"status": "Success"}})

    monkeypatch.setattr(provider, "fetch", fetch)
    client = get_runtime().redis
    settings = get_runtime().settings
    for lost in (False, True):
        job = _job().model_copy(update={"provider": "baidu", "provider_task_id": "t-1"})
        stages.fetch(job)
        assert client.exists(stages.parked_key(job))
        assert storage.head(settings.staging_bucket, stages.work_key(job)) is None  # nothing in the work area
        if lost:
            client.delete(stages.parked_key(job))
        stages.archive(job)
        assert storage.finished("baidu", job.job_id) == "result.json"
        assert storage.get_json(storage.archive_prefix("baidu", job.job_id) + "result.json")["job_id"] == job.job_id
        assert not client.exists(stages.parked_key(job))
        assert fetches.count(job.job_id) == (2 if lost else 1)
        assert jobs.read(client, job.job_id)["state"] == "done"
