"""Unit tests of the idp provider's pure parts: error mapping, token lifetime, normalization,
and the client's requests against ``httpx.MockTransport`` (no Redis, no emulator).

The seed's own result example is annotated pseudo-JSON (``# 抽取字段`` comments inside the
values), so the result bodies here are written out in the shape the emulator answers.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from pydantic import ValidationError

from pipeline.config import Settings
from pipeline.errors import AuthExpired, BadInput, Permanent, Transient
from pipeline.models import DocumentInfo, Job
from pipeline.providers import idp
from pipeline.providers import idp_wire as wire
from pipeline.runtime import Runtime

BASE = "http://idp.invalid"
PASSWORD = "PW-SECRET-1"
EXTRACT_ID = 10_000_001

from tests.conftest import RecordedSubmission


def located(page_no: int, bbox: list[float]) -> str:
    """``after_treatment`` as the platform sends it: JSON text."""
    return json.dumps({"data": "", "locations": [{"page_no": page_no, "bboxes": [bbox], "page_size": [595.0, 842.0]}]})


RESULT_BODY: dict[str, Any] = {
    "code": 200,
    "status": 200,
    "message": wire.RESULT_OK,
    "item": {
        "id": EXTRACT_ID,
        "extract_task_id": 1,
        "origin_name": "invoice.pdf",
        "unique_name": "0f3c.pdf",
        "doc_type": 1,
        "status": 5,
        "status_name": "预标注成功",
        "tag_type_id": 7,
        "content": "Invoice No: INV-1\nTotal: 12.50\n| Item | Qty |\n| Tea | 2 |\fpage two text",
        "result": {
            "status": "OK",
            "doc_prob": 0.95,
            "pdf_path": "/data/files/0f3c.pdf",
            "fuzzy_tag_list": [],
            "tag_list": [
                {"tag_id": 11, "tag_name": "Invoice No", "value": "INV-1", "word": "INV-1", "confidence": 0.97,
                 "index": 12, "after_treatment": located(0, [60, 80, 120, 102]), "ppr": None},
                {"tag_id": 12, "tag_name": "Total", "value": "12.50", "word": "12.50", "confidence": 1,
                 "index": 25, "after_treatment": None, "ppr": None},
            ],
            "relation_extract": [
                {
                    "id": 5576, "name": "表格1", "node_index": 1, "type": "group",
                    "children": [
                        {"type": "card", "confidence": 1, "children": [
                            {"id": 1, "name": "Item", "type": "tag",
                             "value": [{"tag_name": "Item", "value": "Tea", "confidence": 0.9,
                                        "after_treatment": located(1, [60, 136, 96, 158])}]},
                            {"id": 2, "name": "Qty", "type": "tag", "value": [{"tag_name": "Qty", "value": "2"}]},
                        ]},
                        {"type": "card", "confidence": 1, "children": [
                            {"id": 1, "name": "Item", "type": "tag", "value": [{"tag_name": "Item", "value": "Cake"}]},
                            {"id": 2, "name": "Qty", "type": "tag", "value": [{}]},  # the seed's empty value
                        ]},
                    ],
                }
            ],
        },
    },
}


# --- helpers --------------------------------------------------------------------------------


def make_job(fmt: str = "pdf", size: int = 1000, pages: int | None = None, **options: Any) -> Job:
    return Job(
        job_id="job-1",
        provider="idp",
        source="/tmp/invoice.pdf",
        location="s3://staging/invoice.pdf",
        options=options,
        provider_task_id=str(EXTRACT_ID),
        document=DocumentInfo(bucket="staging", key="invoice.pdf", filename="invoice.pdf", size=size, format=fmt, pages=pages),
    )


class StubCredential:
    """Stands in for ``SharedCredential``: hands out tokens and counts re-logins."""

    def __init__(self) -> None:
        self.token = "TOKEN-1"
        self.invalidated: list[str] = []

    def get(self) -> str:
        return self.token

    def invalidate(self, stale: str) -> str:
        self.invalidated.append(stale)
        self.token = f"TOKEN-{len(self.invalidated) + 1}"
        return self.token


def make_provider(handler: Callable[[httpx.Request], httpx.Response], **settings: Any) -> idp.IdpProvider:
    config = Settings(
        idp_base_url=BASE, idp_username="alice", idp_password=PASSWORD, global_limits=False, idp_login_cooldown=7, **settings
    )
    http = httpx.Client(transport=httpx.MockTransport(handler))
    runtime = Runtime(settings=config, redis=None, limiter=None, leases=None, ledger=None, processing=None, http_client=http)
    provider = idp.IdpProvider(runtime)
    provider._credential = StubCredential()
    return provider


def refusal(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"status": status, "message": message})


def result_body(status: int) -> dict[str, Any]:
    body = json.loads(json.dumps(RESULT_BODY))
    body["item"]["status"] = status
    if status not in wire.SUCCEEDED:
        body["item"]["result"] = None
    return body


# --- error mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "message", "kind", "code"),
    [
        (400, wire.LOGIN_LOCKED, Transient, "login_locked_out"),
        (400, wire.BAD_CREDENTIALS, Permanent, "auth_failed"),
        (400, wire.USER_DISABLED, Permanent, "auth_failed"),
        (400, wire.OVER_LIMIT, Permanent, "too_large"),
        (400, wire.ILLEGAL_FILE, Permanent, "rejected_file"),
        (400, wire.SYNC_ONE_FILE, Permanent, "provider_rejected"),
        (422, wire.VALIDATION_ERROR, Permanent, "provider_rejected"),
        (404, wire.EXTRACT_NOT_FOUND, Permanent, "not_found"),
        (400, wire.HIGHLIGHT_NOT_READY, Transient, "not_ready"),
        (401, wire.UNAUTHORIZED, AuthExpired, "auth_expired"),
        (401, None, AuthExpired, "auth_expired"),
        (418, "something new", Permanent, "provider_rejected"),
    ],
)
def test_each_documented_refusal_maps_to_its_kind(http_status, message, kind, code):
    error = idp.error_for("login", http_status, message)
    assert type(error) is kind
    assert error.code == code
    assert error.provider_code == http_status and error.provider_message == message
    assert str(http_status) in str(error)


def test_token_lifetime_is_read_from_the_jwt_exp_without_verifying():
    now = time.time()
    token = jwt.encode({"exp": int(now) + 1234}, "a-key-we-do-not-have-" * 2, algorithm="HS256")
    assert idp.token_lifetime(token, now) == pytest.approx(1234, abs=1)
    assert idp.token_lifetime(jwt.encode({"sub": "1"}, "k" * 32, algorithm="HS256"), now) == idp.DEFAULT_TOKEN_LIFETIME
    assert idp.token_lifetime("not-a-jwt", now) == idp.DEFAULT_TOKEN_LIFETIME
    # A token our clock thinks is already expired is still cached a little: never a login per request.
    assert idp.token_lifetime(jwt.encode({"exp": int(now) - 10}, "k" * 32, algorithm="HS256"), now) == idp.MIN_TOKEN_LIFETIME


# --- normalization --------------------------------------------------------------------------


def test_result_body_normalizes_into_fields_groups_and_pages():
    item = wire.GetResultResponse.model_validate(RESULT_BODY).item
    result = idp.normalize(make_job(), item)

    assert result.provider_task_id == str(EXTRACT_ID) and result.doc_type == "7"
    assert result.field("Invoice No") == "INV-1" and result.field("Total") == "12.50"
    invoice_no = next(f for f in result.fields if f.name == "Invoice No")
    assert invoice_no.confidence == 0.97
    assert invoice_no.page == 1  # page_no 0 is our page 1
    assert invoice_no.box == [[60, 80], [120, 80], [120, 102], [60, 102]]
    total = next(f for f in result.fields if f.name == "Total")
    assert total.page is None and total.box is None  # after_treatment null, as in the seed

    rows = [(f.row, f.name, f.value) for f in result.fields if f.group == "表格1"]
    assert rows == [(0, "Item", "Tea"), (0, "Qty", "2"), (1, "Item", "Cake"), (1, "Qty", "")]
    tea = next(f for f in result.fields if f.value == "Tea")
    assert tea.page == 2 and tea.confidence == 0.9

    assert [(p.number, p.text) for p in result.pages] == [
        (1, "Invoice No: INV-1\nTotal: 12.50\n| Item | Qty |\n| Tea | 2 |"),
        (2, "page two text"),
    ]


def test_a_result_without_content_or_result_normalizes_to_nothing():
    item = wire.ExtractItem(extract_task_id=1, origin_name="a.png", unique_name="b.png", status=5, result={})
    result = idp.normalize(make_job("png"), item)
    assert result.fields == [] and result.pages == [] and result.doc_type is None


# --- check ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "size", "pages", "code"),
    [
        ("gif", 1000, None, "unsupported_format"),
        ("ofd", 1000, None, "unsupported_format"),
        ("pdf", idp.MAX_FILE_BYTES + 1, None, "too_large"),
        ("pdf", 1000, idp.MAX_PAGES + 1, "too_large"),
    ],
)
def test_check_refuses_what_the_platform_does_not_take(fmt, size, pages, code):
    provider = make_provider(lambda request: httpx.Response(500))
    job = make_job(fmt, size, pages)
    with pytest.raises(BadInput) as refused:
        provider.check(job.document, job)
    assert refused.value.code == code and job.label() in str(refused.value)


@pytest.mark.parametrize("fmt", ["pdf", "png", "jpeg", "bmp", "tiff"])
def test_check_accepts_the_platforms_formats_up_to_its_limits(fmt):
    job = make_job(fmt, idp.MAX_FILE_BYTES, idp.MAX_PAGES)
    make_provider(lambda request: httpx.Response(500)).check(job.document, job)


# --- login ----------------------------------------------------------------------------------


def test_login_sends_base64_values_and_reads_the_token_lifetime():
    token = jwt.encode({"exp": int(time.time()) + 600}, "k" * 32, algorithm="HS256")
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"status": 200, "message": wire.LOGIN_OK, "access_token": token})

    value, lifetime = make_provider(handler)._login()
    assert value == token and lifetime == pytest.approx(600, abs=2)
    assert seen == [{"username": base64.b64encode(b"alice").decode(), "password": base64.b64encode(PASSWORD.encode()).decode()}]


def test_auto_login_tries_the_curl_examples_plain_values_once_and_keeps_what_works():
    token = jwt.encode({"exp": int(time.time()) + 600}, "k" * 32, algorithm="HS256")
    seen: list[dict] = []

    def plain_only(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        if seen[-1]["password"] != PASSWORD:
            return refusal(400, wire.BAD_CREDENTIALS)
        return httpx.Response(200, json={"status": 200, "message": wire.LOGIN_OK, "access_token": token})

    provider = make_provider(plain_only)
    assert provider._login()[0] == token and provider._login()[0] == token
    plain = {"username": "alice", "password": PASSWORD}
    assert seen == [{"username": base64.b64encode(b"alice").decode(), "password": base64.b64encode(PASSWORD.encode()).decode()}, plain, plain]


@pytest.mark.parametrize(
    ("message", "kind", "code"),
    [
        (wire.LOGIN_LOCKED, Transient, "login_locked_out"),
        (wire.BAD_CREDENTIALS, Permanent, "auth_failed"),
        (wire.USER_DISABLED, Permanent, "auth_failed"),
    ],
)
def test_failed_logins_raise_without_the_password(message, kind, code):
    provider = make_provider(lambda request: refusal(400, message))
    with pytest.raises(kind) as failed:
        provider._login()
    assert failed.value.code == code
    encoded = base64.b64encode(PASSWORD.encode()).decode()
    for secret in (PASSWORD, encoded):
        assert secret not in str(failed.value) and secret not in repr(failed.value.__dict__)


def test_the_shared_login_cools_down_for_the_configured_time():
    settings = Settings(idp_login_cooldown=7, idp_username="alice")
    provider = idp.IdpProvider(Runtime(settings=settings, redis=None, limiter=None, leases=None, ledger=None, processing=None, http_client=httpx.Client()))
    assert provider._credential._cooldown == 7
    assert "alice" not in provider._credential._key  # keyed by a fingerprint of the username


# --- authenticated calls --------------------------------------------------------------------


def test_a_401_logs_in_again_once_and_resends():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] != "Bearer TOKEN-2":
            return refusal(401, wire.UNAUTHORIZED)
        return httpx.Response(200, json=result_body(7))

    provider = make_provider(handler)
    assert provider.poll(make_job()).done is False
    assert provider._credential.invalidated == ["TOKEN-1"]


def test_a_second_401_is_auth_expired_not_a_login_loop():
    provider = make_provider(lambda request: refusal(401, wire.UNAUTHORIZED))
    with pytest.raises(AuthExpired):
        provider.poll(make_job())
    assert provider._credential.invalidated == ["TOKEN-1"]


@pytest.mark.parametrize(("status", "done"), [(0, False), (6, False), (3, False), (7, False), (5, True), (8, True)])
def test_poll_is_done_at_a_final_success(status, done):
    outcome = make_provider(lambda request: httpx.Response(200, json=result_body(status))).poll(make_job())
    assert outcome.done is done and outcome.error is None


@pytest.mark.parametrize("status", [2, 4, 20001])
def test_poll_ends_a_failed_extraction_as_provider_failed(status):
    outcome = make_provider(lambda request: httpx.Response(200, json=result_body(status))).poll(make_job())
    assert outcome.done is True and isinstance(outcome.error, Permanent)
    assert outcome.error.code == "provider_failed" and outcome.error.provider_code == status


def test_submit_uploads_the_file_with_the_documented_query(monkeypatch):
    monkeypatch.setattr(idp.storage, "ObjectStream", lambda bucket, key, size, etag=None: io.BytesIO(b"%PDF-1.7 bytes"))
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        item = {"id": EXTRACT_ID, "extract_task_id": 3, "origin_name": "invoice.pdf", "unique_name": "x.pdf"}
        body = {"status": 200, "message": wire.TASK_CREATED, "ids": [EXTRACT_ID], "items": [item], "total": 1}
        return httpx.Response(200, json=body)

    accepted = RecordedSubmission()
    task_id = make_provider(handler).submit(make_job(feature_type_id=9, language="zh"), accepted)
    assert task_id == str(EXTRACT_ID) and accepted.accepted_ids == [str(EXTRACT_ID)]
    (request,) = requests
    assert request.method == "POST" and request.url.path == "/api/extracting/v2/task"
    assert request.headers["authorization"] == "Bearer TOKEN-1"
    assert dict(request.url.params) == {
        "async_task": "true", "feature_type_id": "9", "file_types": "1", "task_name": "job-1", "language": "zh"
    }
    body = request.read()
    assert b'name="files"; filename="invoice.pdf"' in body and b"%PDF-1.7 bytes" in body


def test_a_document_s3_fails_to_read_midway_is_not_sent_and_waits_as_an_outage(monkeypatch):
    """The upload streams from S3: when S3 fails before the body is whole, the provider never
    had the request (its Content-Length was not met), so the submit is not 'outcome unknown'."""
    from botocore.exceptions import EndpointConnectionError

    from pipeline import storage
    from pipeline.errors import is_outage

    class Failing:
        def __init__(self) -> None:
            self.reads = 0

        def read(self, size=None):
            self.reads += 1
            if self.reads > 1:
                raise EndpointConnectionError(endpoint_url="http://s3.invalid")
            return b"%PDF-1.7 " + b"x" * 100

        def close(self) -> None:
            pass

    monkeypatch.setattr(storage, "_get", lambda bucket, key, etag, **kw: {"Body": Failing()})
    submission = RecordedSubmission()
    reached = []
    with pytest.raises(EndpointConnectionError) as caught:
        make_provider(lambda request: reached.append(request) or httpx.Response(200)).submit(make_job(), submission)
    assert is_outage(caught.value)
    assert submission.sent is False and not reached  # marked leaving, then told it never left


def test_submit_without_options_uses_the_settings_and_the_image_file_type(monkeypatch):
    monkeypatch.setattr(idp.storage, "ObjectStream", lambda bucket, key, size, etag=None: io.BytesIO(b"\x89PNG"))
    params: list[httpx.QueryParams] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params.append(request.url.params)
        item = {"id": 5, "extract_task_id": 3, "origin_name": "a.png", "unique_name": "x.png"}
        return httpx.Response(200, json={"status": 200, "items": [item]})

    make_provider(handler, idp_feature_type_id=4).submit(make_job("png"), RecordedSubmission())
    assert params[0]["feature_type_id"] == "4" and params[0]["file_types"] == "2" and "language" not in params[0]


def test_an_oversized_upload_is_permanent_too_large(monkeypatch):
    monkeypatch.setattr(idp.storage, "ObjectStream", lambda bucket, key, size, etag=None: io.BytesIO(b"%PDF-"))
    accepted = RecordedSubmission()
    with pytest.raises(Permanent) as refused:
        make_provider(lambda request: refusal(400, wire.OVER_LIMIT)).submit(make_job(), accepted)
    assert refused.value.code == "too_large" and accepted.accepted_ids == []


def test_an_accepted_answer_that_fails_validation_reports_its_extract_id_first(monkeypatch):
    monkeypatch.setattr(idp.storage, "ObjectStream", lambda bucket, key, size, etag=None: io.BytesIO(b"%PDF-"))
    body = {"status": 200, "ids": [EXTRACT_ID], "items": [{"id": EXTRACT_ID, "extract_task_id": 3}]}  # no origin/unique name
    accepted = RecordedSubmission()
    with pytest.raises(ValidationError):
        make_provider(lambda request: httpx.Response(200, json=body)).submit(make_job(), accepted)
    assert accepted.accepted_ids == [str(EXTRACT_ID)]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('{"items": [{"id": 7, "extract_task_id": 1}], "ids": [7]}', "7"),
        ('{"ids": [8]}', "8"),
        ('{"status": 200, "ids": [9], "items": [{"id": 9, "extract_ta', "9"),
        ('{"status": 400, "message": "文件大小或页数超过上限"}', None),
        ("<html>502</html>", None),
    ],
)
def test_the_extract_id_is_read_from_the_raw_answer(text, found):
    assert idp.accepted_extract_id(text) == found


def test_a_404_under_the_prefix_is_tried_once_without_it_and_remembered():
    paths: list[str] = []

    def examples_only(request: httpx.Request) -> httpx.Response:
        """A platform that serves the seed's examples' paths, /extracting/..., and nothing under /api."""
        paths.append(request.url.path)
        if request.url.path.startswith("/api/"):
            return httpx.Response(404, text="Not Found")
        return httpx.Response(200, json=result_body(7))

    provider = make_provider(examples_only)
    assert provider.poll(make_job()).done is False
    assert provider.poll(make_job()).done is False
    assert paths == [f"/api/extracting/v2/{EXTRACT_ID}", f"/extracting/v2/{EXTRACT_ID}", f"/extracting/v2/{EXTRACT_ID}"]


def test_a_step_put_off_while_its_resend_waits_for_a_send_time_comes_back_under_the_other_prefix():
    """The resend under the other prefix is a second request of the step, with a send time of its
    own: refused one (RateWait), the step is re-run later. It must not spend its turn on the path
    that 404'd again, then wait behind the queue for the resend's, and so on forever."""
    from pipeline.errors import RateWait

    paths: list[str] = []

    def examples_only(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(404, text="Not Found") if request.url.path.startswith("/api/") else httpx.Response(200, json=result_body(7))

    provider = make_provider(examples_only)
    tokens = 0
    take_token = provider.take_token

    def the_second_token_is_far(endpoint: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal tokens
        tokens += 1
        if tokens == 2:
            raise RateWait(f"idp:{endpoint}", 1.5)
        return take_token(endpoint, *args, **kwargs)

    provider.take_token = the_second_token_is_far  # type: ignore[method-assign]
    with pytest.raises(RateWait):
        provider.poll(make_job())
    assert provider.poll(make_job()).done is False  # the step, re-run
    assert paths == [f"/api/extracting/v2/{EXTRACT_ID}", f"/extracting/v2/{EXTRACT_ID}"]

def test_a_real_not_found_stays_a_not_found_under_both_prefixes():
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return refusal(404, wire.EXTRACT_NOT_FOUND)

    provider = make_provider(handler, idp_api_prefix="")
    with pytest.raises(Permanent):
        provider.poll(make_job())
    assert paths == [f"/extracting/v2/{EXTRACT_ID}", f"/api/extracting/v2/{EXTRACT_ID}"]
    assert provider._prefix == ""



def test_a_not_found_in_the_apis_own_words_settles_the_prefix_it_came_from():
    """The table's prefix answered by the front server's page (not routed) and the examples' by the
    API's JSON, even to say the task is not there: the examples' prefix is the one served, and it is
    kept, not undone as if neither were."""
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.startswith("/api/"):
            return httpx.Response(404, text="<html><title>404 Not Found</title></html>")
        return refusal(404, wire.EXTRACT_NOT_FOUND)

    provider = make_provider(handler)  # the table's /api first
    for _ in range(2):
        with pytest.raises(Permanent):
            provider.poll(make_job())
    api, examples = f"/api/extracting/v2/{EXTRACT_ID}", f"/extracting/v2/{EXTRACT_ID}"
    assert paths == [api, examples, examples, api]  # the second poll starts where the API answered
    assert provider._prefix == ""

@pytest.mark.parametrize("status", [3, 42])
def test_text_converted_and_unlisted_statuses_keep_polling_and_name_the_status(status):
    outcome = make_provider(lambda request: httpx.Response(200, json=result_body(status))).poll(make_job())
    assert outcome.done is False and outcome.error is None
    assert str(status) in str(outcome.status)


def test_fetch_normalizes_keeps_the_raw_body_and_downloads_the_highlight():
    pdf = b"%PDF-1.4 highlighted"
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == f"/api/extracting/v2/{EXTRACT_ID}":
            return httpx.Response(200, json=RESULT_BODY)
        if request.url.path == f"/api/extracting/v2/{EXTRACT_ID}/export/highlight":
            item = {"file_name": "invoice_highlight.pdf", "url": "/download/highlight/abc.pdf"}
            return httpx.Response(200, json={"code": 200, "status": 200, "message": wire.HIGHLIGHT_OK, "item": item})
        if request.url.path == "/download/highlight/abc.pdf":
            return httpx.Response(200, content=pdf, headers={"content-type": "application/pdf"})
        return refusal(404, wire.EXTRACT_NOT_FOUND)

    fetched = make_provider(handler).fetch(make_job())
    assert fetched.raw == RESULT_BODY
    assert fetched.result.field("Invoice No") == "INV-1"
    assert list(fetched.artifacts) == ["highlight.pdf"] and seen[-1].url.path.endswith("/export/highlight")
    with fetched.artifacts["highlight.pdf"].open() as body:  # downloaded while it is archived
        assert body.read() == pdf
    download = seen[-1]
    assert str(download.url) == f"{BASE}/download/highlight/abc.pdf"
    assert "authorization" not in download.headers  # the token never follows a download link


@pytest.mark.parametrize(
    ("answer", "code"),
    [(httpx.Response(404, text="gone"), "download_failed"), (httpx.Response(200, content=b"<html>oops</html>"), "malformed_answer")],
)
def test_a_highlight_download_that_fails_or_is_not_a_pdf_is_transient(answer, code):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/export/highlight"):
            item = {"file_name": "invoice_highlight.pdf", "url": "/download/highlight/abc.pdf"}
            return httpx.Response(200, json={"code": 200, "status": 200, "message": wire.HIGHLIGHT_OK, "item": item})
        if request.url.path == "/download/highlight/abc.pdf":
            return answer
        return httpx.Response(200, json=RESULT_BODY)

    download = make_provider(handler).fetch(make_job()).artifacts["highlight.pdf"]
    with pytest.raises(Transient) as caught, download.open():
        pass
    assert caught.value.code == code


def test_transport_failures_and_gateway_errors_carry_no_token_or_url():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    for handler in (refuse, lambda request: httpx.Response(502, text="<html>502 Bad Gateway</html>")):
        with pytest.raises(Transient) as caught:
            make_provider(handler).poll(make_job())
        assert "TOKEN-1" not in str(caught.value) and "idp.invalid" not in str(caught.value)
