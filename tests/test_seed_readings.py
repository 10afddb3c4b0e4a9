"""Both readings of every place a seed contradicts itself, end to end.

The emulators follow each seed's *example* by default (every other end-to-end test runs on
that); here each emulator is switched, at run time, to the seed's *table* reading of every
contradiction at once, and a small batch must still come out right. Then a few answers the
seeds allow but do not list: statuses and codes no table names, and an accepted task whose
answer is broken, which must fail its document with the task id and never be sent twice.
"""

from __future__ import annotations

import pytest

from pipeline import DocumentFailedError, enqueue, storage
from pipeline.samples import make_batch, make_report_pdf
from tests.conftest import outcomes

TABLE_READINGS = {
    # 002: table says `file_name`, `result.task_id`, combo leaves and locations as []dict, times as int.
    "baidu": {
        "file_name_field": "file_name",
        "submit_answer_key": "result",
        "combo_leaf_shape": "list",
        "location_shape": "list",
        "time_format": "int",
    },
    # 000: the URL table has /api, the curl example sends the login in plain text, docType is the older spelling.
    "idp": {"api_prefix": "/api", "login_encoding": "plain", "doc_type_key": "docType"},
    # 001: the table requires `message` in the callback and counts pages from 1.
    "tuputech": {"callback_message": True, "page_index_base": 1},
}


@pytest.mark.parametrize(("provider", "task_endpoint"), [("baidu", "submit"), ("idp", "task")])
def test_baidu_and_idp_table_readings(request, docs, provider, task_endpoint):
    emulator = request.getfixturevalue(provider)
    emulator.config(**TABLE_READINGS[provider])
    samples = make_batch(docs, 4)
    results = outcomes([enqueue(s.path, provider=provider) for s in samples])
    for sample, result in zip(samples, results):
        values = {f.name: f.value for f in result.fields if f.group is None}
        assert all(values.get(k) == v for k, v in sample.expected.items()), sample.path.name
    rows = [f for f in results[0].fields if f.group]  # the invoice's table: combo leaves / relation groups
    assert rows and all(f.box is None or len(f.box) == 4 for f in rows)
    assert emulator.endpoint(task_endpoint)["accepted"] == len(samples)


def test_tuputech_table_reading(tuputech, docs):
    tuputech.config(**TABLE_READINGS["tuputech"])
    flagged = {1: 2, 2: 1, 4: 1}  # report n has 1 + n % 3 pages
    samples = [make_report_pdf(docs / f"r{n}.pdf", n, flagged_page=page, word="FORBIDDEN") for n, page in flagged.items()]
    # Every page is reported with callback_rule "all", so the numbering shows which reading the provider uses.
    results = outcomes([enqueue(s.path, provider="tuputech", options={"callback_rule": "all"}) for s in samples])
    for sample, result, page in zip(samples, results, flagged.values()):
        pages = int(sample.expected["pages"])
        assert [p.number for p in result.pages] == list(range(1, pages + 1)), sample.path.name
        assert result.moderation.suggestion == "reject" and result.moderation.pages == [page]


def test_tuputech_example_reading_counts_pages_from_zero_without_message(tuputech, docs):
    sample = make_report_pdf(docs / "r.pdf", 4, flagged_page=2, word="FORBIDDEN")  # 2 pages, the 2nd flagged
    handle = enqueue(sample.path, provider="tuputech", options={"callback_rule": "all"})
    result = handle.wait(timeout=120)
    raw = storage.get_json(storage.archive_prefix("tuputech", handle.job_id) + "raw.json")
    assert "message" not in raw and sorted(p["page"] for p in raw["pages"]) == [0, 1]
    assert result.moderation.pages == [2] and [p.number for p in result.pages] == [1, 2]
    assert storage.archive_names("tuputech", handle.job_id) >= {"pages/1.txt", "pages/2.txt"}


@pytest.mark.parametrize("status", ["Queued", "Cancelled"])
def test_a_baidu_status_no_table_lists_keeps_polling_and_names_it_at_the_deadline(baidu, docs, status):
    baidu.config(running_status=status, processing_min=600, processing_max=600)
    sample = make_batch(docs, 1)[0]
    handle = enqueue(sample.path, provider="baidu", options={"deadline": 4})
    with pytest.raises(DocumentFailedError) as failed:
        handle.wait(timeout=90)
    error = failed.value.error
    assert error.stage == "await" and error.code == "deadline_exceeded" and error.provider_code == status
    assert status in error.message and error.provider_task_id


@pytest.mark.parametrize("status", [3, 42])
def test_idp_text_converted_or_an_unlisted_status_ends_at_the_deadline_with_its_name(idp, docs, status):
    idp.config(success_status=status, processing_min=0.5, processing_max=0.5)
    sample = make_batch(docs, 1)[0]
    handle = enqueue(sample.path, provider="idp", options={"deadline": 4})
    with pytest.raises(DocumentFailedError) as failed:
        handle.wait(timeout=90)
    error = failed.value.error
    assert error.code == "deadline_exceeded" and str(status) in error.message and error.provider_task_id


def test_a_tuputech_code_no_table_lists_fails_the_document_with_that_code(tuputech, docs):
    tuputech.config(failure_rate=1.0, failure_code=777)
    handle = enqueue(make_report_pdf(docs / "r.pdf", 1).path, provider="tuputech")
    with pytest.raises(DocumentFailedError) as failed:
        handle.wait(timeout=120)
    error = failed.value.error
    assert error.code == "provider_failed" and error.provider_code == "777" and error.retryable


@pytest.mark.parametrize("provider", ["baidu", "idp", "tuputech"])
def test_an_accepted_task_whose_answer_is_broken_fails_with_its_id_and_is_never_sent_again(request, docs, provider):
    emulator = request.getfixturevalue(provider)
    emulator.config(faults={"malformed_accept_rate": 1.0})
    source = make_report_pdf(docs / "r.pdf", 1).path if provider == "tuputech" else make_batch(docs, 1)[0].path
    handle = enqueue(source, provider=provider)
    with pytest.raises(DocumentFailedError) as failed:
        handle.wait(timeout=120)
    error = failed.value.error
    assert error.stage == "submit" and error.code == "accepted_answer_invalid" and not error.retryable
    assert error.provider_task_id and error.provider_task_id in error.message
    endpoint = {"baidu": "submit", "idp": "task", "tuputech": "submit"}[provider]
    assert emulator.endpoint(endpoint)["accepted"] == 1  # exactly one provider task
