"""The idp chain end to end: real Redis, S3, emulator and Celery workers.

The login tests read the workers' cool-down from the settings the stack gives every
process (``DOCPIPE_IDP_LOGIN_COOLDOWN``), so their timing follows whatever conftest sets.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time

import pytest
from PIL import Image
from pypdf import PdfReader

from pipeline import DocumentFailedError, enqueue, storage
from pipeline.config import get_settings
from pipeline.devstack import DEMO_IDP_PASSWORD, DEMO_IDP_USER, local_http
from pipeline.providers import idp_wire as wire
from pipeline.samples import make_batch
from tests.conftest import EmulatorControl, outcomes


def _archived(job_id: str, name: str) -> bytes:
    return storage.read_object(storage.get_settings().results_bucket, storage.archive_prefix("idp", job_id) + name)


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen after {timeout:.0f}s")
        time.sleep(0.05)


def _bad_login(idp: EmulatorControl) -> str:
    """A login with a stale password, as another client of the same account would send it."""
    body = {"username": base64.b64encode(DEMO_IDP_USER.encode()).decode(), "password": base64.b64encode(b"stale").decode()}
    return local_http().post(f"{idp.base_url}{wire.LOGIN_PATH}", json=body).json()["message"]


def test_batch_of_documents_is_archived_with_results_and_highlight(idp, docs):
    samples = make_batch(docs, 22)
    handles = [enqueue(s.path, provider="idp") for s in samples]
    results = outcomes(handles)

    for sample, handle, result in zip(samples, handles, results):
        assert not isinstance(result, Exception), result
        assert result.job_id == handle.job_id and result.provider == "idp"
        assert result.provider_task_id and result.provider_task_id.isdigit()
        assert result.document.filename == sample.path.name
        values = {f.name: f.value for f in result.fields if f.group is None}
        for name, value in sample.expected.items():
            assert values.get(name) == value, (sample.path.name, name)
        if sample.kind == "invoice-pdf":
            rows = [f for f in result.fields if f.group is not None]
            assert {f.name for f in rows} == {"Item", "Qty", "Amount"} and {f.row for f in rows} == {0, 1, 2}
            assert all(f.page is not None and f.box for f in result.fields)
        if sample.kind == "receipt-jpeg":
            assert values["Document hash"]  # derived from the bytes by the emulator
        assert result.pages and result.artifacts == ["highlight.pdf"]

        assert storage.archive_names("idp", handle.job_id) == {"result.json", "raw.json", "highlight.pdf"}
        raw = json.loads(_archived(handle.job_id, "raw.json"))
        assert raw["item"]["status"] == wire.ExtractStatus.PRELABEL_SUCCEEDED
        assert str(raw["item"]["id"]) == result.provider_task_id
        highlight = PdfReader(io.BytesIO(_archived(handle.job_id, "highlight.pdf")))
        text = "\n".join(page.extract_text() for page in highlight.pages)
        for name, value in sample.expected.items():
            assert f"{name}: {value}" in text

    assert idp.endpoint("task")["accepted"] == len(samples)  # one upload per document, none twice
    assert idp.endpoint("download")["accepted"] == len(samples)
    assert idp.endpoint("login")["requests"] <= 1  # one shared login (none if an earlier test left a token)


def test_token_expiry_mid_batch_is_survived_with_exactly_one_relogin(idp, docs):
    samples = make_batch(docs, 12)
    handles = [enqueue(s.path, provider="idp") for s in samples]
    _wait_for(lambda: idp.endpoint("task")["accepted"] >= 4, 90, "4 uploads")
    logins_before = idp.endpoint("login")["requests"]
    idp.post("/_emulator/expire_tokens")

    results = outcomes(handles)

    assert not [r for r in results if isinstance(r, Exception)]
    stats = idp.stats()["endpoints"]
    refused = sum(stats[name]["requests"] - stats[name]["accepted"] for name in ("task", "result", "highlight") if name in stats)
    assert refused >= 1  # the workers met the expired token...
    assert stats["login"]["requests"] - logins_before == 1  # ...and logged in again once, for all of them
    assert stats["task"]["accepted"] == len(samples)


def test_a_locked_out_account_is_waited_for_without_a_login_storm(idp, docs):
    cooldown = get_settings().idp_login_cooldown
    lock_seconds = 2 * cooldown
    # Another client with a stale password locks the account (the platform briefly has a password
    # the workers do not know, and an operator fixes it while the lock still holds).
    idp.config(password="other", login_max_failures=2, login_lock_seconds=lock_seconds)
    assert [_bad_login(idp) for _ in range(3)] == [wire.BAD_CREDENTIALS, wire.BAD_CREDENTIALS, wire.LOGIN_LOCKED]
    # Fixed at once: a lock that ran out while this test was still enqueueing (a loaded box) met
    # the workers' first login with the wrong password, and the document failed for good.
    idp.config(password=DEMO_IDP_PASSWORD)
    ours = idp.endpoint("login")["requests"]
    idp.post("/_emulator/expire_tokens")  # the workers' shared token is gone too

    samples = make_batch(docs, 4)
    handles = [enqueue(s.path, provider="idp") for s in samples]
    _wait_for(lambda: idp.endpoint("login")["requests"] > ours, 60, "a worker's login")
    time.sleep(lock_seconds)
    # While four documents waited out the lock: one login per cool-down, not one per document or retry.
    assert idp.endpoint("login")["requests"] - ours <= math.ceil(lock_seconds / cooldown) + 1

    results = outcomes(handles)

    assert not [r for r in results if isinstance(r, Exception)]  # the lock passed and every document completed
    logins = idp.endpoint("login")
    assert logins["accepted"] == 1
    assert logins["requests"] - ours <= math.ceil(lock_seconds / cooldown) + 2
    assert idp.endpoint("task")["accepted"] == len(samples)


def test_wrong_credentials_fail_the_batch_after_a_single_login(idp, docs):
    idp.config(password="other", login_max_failures=100)
    idp.post("/_emulator/expire_tokens")
    samples = make_batch(docs, 3)
    started = time.monotonic()
    handles = [enqueue(s.path, provider="idp") for s in samples]

    results = outcomes(handles)
    elapsed = time.monotonic() - started

    for handle, result in zip(handles, results):
        assert isinstance(result, DocumentFailedError), result
        error = result.error
        assert (error.stage, error.code, error.retryable) == ("submit", "auth_failed", False)
        assert "DOCPIPE_IDP_PASSWORD" in error.message  # says what to fix...
        body = json.dumps(storage.get_json(storage.archive_prefix("idp", handle.job_id) + "error.json"))
        for secret in (DEMO_IDP_PASSWORD, base64.b64encode(DEMO_IDP_PASSWORD.encode()).decode(), "Bearer"):
            assert secret not in body  # ...and never the secret itself
    # The refusal is remembered for every worker during the cool-down: the other documents fail
    # with it at once instead of each trying a login that could lock the account out. One
    # attempt is one request, or two for a worker that has not logged in yet in auto mode (the
    # seed's base64 reading, then its plain one); a slow machine may see one more cool-down pass.
    attempts = 1 + int(elapsed // get_settings().idp_login_cooldown)
    assert 1 <= idp.endpoint("login")["requests"] <= 2 * attempts


def test_provider_failure_ends_in_error_json_at_await(idp, docs):
    idp.config(failure_rate=1.0)
    sample = make_batch(docs, 1)[0]
    handle = enqueue(sample.path, provider="idp")
    with pytest.raises(DocumentFailedError) as failure:
        handle.wait(timeout=120)
    error = failure.value.error
    assert (error.stage, error.code, error.retryable) == ("await", "provider_failed", False)
    assert error.provider_code in {"2", "4", "20001"} and error.provider_task_id
    assert storage.archive_names("idp", handle.job_id) == {"error.json"}


def test_an_unsupported_format_fails_at_stage_without_a_provider_request(idp, docs):
    path = docs / "scan.gif"
    Image.new("RGB", (64, 64), (200, 200, 200)).save(path, format="GIF")
    handle = enqueue(path, provider="idp")
    with pytest.raises(DocumentFailedError) as failure:
        handle.wait(timeout=120)
    error = failure.value.error
    assert (error.stage, error.code) == ("stage", "unsupported_format") and "scan.gif" in error.message
    assert idp.endpoint("task")["requests"] == 0 and idp.endpoint("login")["requests"] == 0
