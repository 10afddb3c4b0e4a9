"""The adaptive poll schedule, one function at a time (the end-to-end figures are ``bench.polling``)."""

from __future__ import annotations

import math
import random

import pytest

from pipeline.polling import LearnedSchedule, Observation, observed_processing


def _documents(count: int, *, size_predicts: bool, seed: int = 7) -> list[Observation]:
    """Processing times with a long tail: proportional to size with a 10% spread, or unrelated to it."""
    rng = random.Random(seed)
    seen = []
    for _ in range(count):
        size = int(350_000 * math.exp(rng.gauss(0, 0.9)))
        seconds = (size / 50_000 if size_predicts else 7.0 * math.exp(rng.gauss(0, 0.9))) * math.exp(rng.gauss(0, 0.1))
        seen.append(Observation(seconds, size, None))
    return seen


def _replayed(schedule: LearnedSchedule, documents: list[Observation]) -> tuple[float, float]:
    """Calls per document and median delay share of polling ``documents`` (not those learnt from) so."""
    calls, shares = [], []
    for doc in documents:
        predicted = schedule.predict(doc.size, doc.pages)
        assert predicted is not None
        k = 0
        while schedule.poll_at(k, predicted) < doc.seconds:
            k += 1
        calls.append(k + 1)
        shares.append((schedule.poll_at(k, predicted) - doc.seconds) / doc.seconds)
    return sum(calls) / len(calls), sorted(shares)[len(shares) // 2]


def test_nothing_is_learnt_from_too_few_documents():
    assert LearnedSchedule.fit(_documents(9, size_predicts=True), budget=1.4, min_samples=10) is None


def test_where_size_predicts_the_time_the_schedule_uses_it_and_sees_documents_finish_within_the_budget():
    schedule = LearnedSchedule.fit(_documents(200, size_predicts=True), budget=1.4, min_samples=10)
    assert schedule is not None and schedule.predictor == "size"
    calls, share = _replayed(schedule, _documents(400, size_predicts=True, seed=99))  # documents it never saw
    assert calls <= 1.5 and share <= 0.10, (calls, share)


def test_where_size_predicts_nothing_the_schedule_falls_back_to_the_providers_spread_and_keeps_the_budget():
    schedule = LearnedSchedule.fit(_documents(200, size_predicts=False), budget=1.4, min_samples=10)
    assert schedule is not None and schedule.predictor == "none"
    calls, _ = _replayed(schedule, _documents(400, size_predicts=False, seed=99))
    assert calls <= 1.6  # slower to see a result, but not more calls than planned


@pytest.mark.parametrize(
    ("not_done_at", "done_at", "reported", "expected"),
    [
        (None, 10.0, None, 5.0),  # our polls alone: the middle of (0, 10]
        (6.0, 10.0, None, 8.0),
        (6.0, 10.0, (6.0, 8.0), 7.0),  # the provider's "7 s, to the second", inside what our polls prove
        (None, 10.0, (11.0, 13.0), 5.0),  # the provider's clock disagrees with our polls: ours win
    ],
)
def test_a_processing_time_is_what_both_our_polls_and_the_providers_report_allow(not_done_at, done_at, reported, expected):
    submitted = 1000.0
    observed, uncertainty = observed_processing(submitted, None if not_done_at is None else submitted + not_done_at, submitted + done_at, reported)
    assert observed == pytest.approx(expected)
    assert 0 < uncertainty <= (done_at - (not_done_at or 0.0)) / 3  # the interval's spread, never more than our polls leave


def test_a_provider_that_reports_whole_seconds_does_not_make_the_schedule_poll_late():
    """Learnt from times known only to within a second (baidu's ``duration``), the schedule still
    meets its budget and its delay on the true times: the resolution's share of the spread is
    taken out before planning."""
    rng = random.Random(3)
    truth = _documents(200, size_predicts=True)
    seen = []
    for doc in truth:
        whole = int(doc.seconds + rng.random()) - int(rng.random())  # a difference of two stamps to the second
        estimate, uncertainty = observed_processing(0.0, None, doc.seconds * 1.3, (max(0.0, whole - 1.0), whole + 1.0))
        seen.append(Observation(estimate, doc.size, None, uncertainty))
    schedule = LearnedSchedule.fit(seen, budget=1.4, min_samples=10)
    assert schedule is not None and schedule.predictor == "size"
    calls, share = _replayed(schedule, _documents(400, size_predicts=True, seed=99))
    assert calls <= 1.5 and share <= 0.10, (calls, share)


@pytest.mark.parametrize(("overdue_after", "longest_wait"), [(28.0, 18.3), (None, 990.1)])
def test_a_document_is_looked_at_again_by_its_providers_overdue_time_whatever_the_schedule(monkeypatch, overdue_after, longest_wait):
    """A learnt schedule far beyond the document (its 4th look 1000 s after submit) waits no longer
    than the provider's overdue time (tuputech: the callback bound, past which the document ends)."""
    import time
    from types import SimpleNamespace

    from pipeline import stages
    from pipeline.models import Job
    from pipeline.providers.base import PollOutcome

    far = SimpleNamespace(poll_at=lambda polls, predicted: 1000.0)
    provider = SimpleNamespace(
        overdue_at=lambda job: None if overdue_after is None else job.submitted_at + overdue_after,
        poll=lambda job: PollOutcome(done=False, detail="waiting"),
        first_poll_delay=1.0,
        uses_callbacks=False,  # a polled provider: its schedule decides when to ask
    )
    monkeypatch.setattr(stages, "learned_schedule", lambda job: (far, 4.5))
    monkeypatch.setattr(stages, "get_provider", lambda name: provider)
    job = Job(job_id="a" * 32, provider="tuputech", source="s3://b/k.pdf", location="s3://b/k.pdf",
              provider_task_id="t-1", submitted_at=time.time() - 10.0, polls=3)

    _, delay = stages.await_result(job)

    assert delay is not None and 0.0 <= delay <= longest_wait
    assert delay > longest_wait - 1.0 - stages.LATENESS.typical()


def test_an_answer_whose_artifacts_wait_for_a_rate_token_is_kept_and_not_polled_for_again(monkeypatch):
    """The poll that sees a task done carries its result; an artifact behind its own limit (idp's
    highlight export, 2/s) may make the step wait. The answer is kept (as the archive's raw.json)
    and fetch reads it there: re-running the poll to get it back spent a result call per try."""
    import json
    import time
    from types import SimpleNamespace

    from pipeline import stages, storage
    from pipeline.errors import RateWait
    from pipeline.models import Job
    from pipeline.providers.base import PollOutcome

    answer = {"item": {"status": 5, "content": "text"}}
    seen: dict[str, list] = {"polls": [], "fetches": []}

    def fetch(job, answer=None):
        seen["fetches"].append(answer)
        if len(seen["fetches"]) == 1:
            raise RateWait("idp:test:highlight", 3.0)
        return SimpleNamespace(raw=answer)

    provider = SimpleNamespace(
        poll=lambda job: seen["polls"].append(job) or PollOutcome(done=True, status="5", answer=answer), fetch=fetch, first_poll_delay=1.0,
        uses_callbacks=False,
    )
    written: dict[str, bytes] = {}
    monkeypatch.setattr(stages, "get_provider", lambda name: provider)
    monkeypatch.setattr(stages, "learned_schedule", lambda job: None)
    monkeypatch.setattr(stages, "_learn", lambda *args: None)
    monkeypatch.setattr(stages, "_park", lambda job, fetched: job)
    monkeypatch.setattr(storage, "put_bytes", lambda key, data, content_type, **kw: written.__setitem__(key, data))
    monkeypatch.setattr(storage, "get_json", lambda key: json.loads(written[key]))
    job = Job(job_id="b" * 32, provider="idp", source="s3://b/k.pdf", location="s3://b/k.pdf",
              provider_task_id="7", submitted_at=time.time() - 30.0, polls=1)

    job, delay = stages.await_result(job)

    assert delay is None and job.answer_kept and not job.parked  # on to fetch, the answer kept
    assert json.loads(written[storage.archive_prefix("idp", job.job_id) + "raw.json"]) == answer
    stages.fetch(job)
    assert seen["fetches"] == [answer, answer]  # fetch had the answer without asking the provider
    assert len(seen["polls"]) == 1
