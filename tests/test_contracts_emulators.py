"""The emulators answer in the shapes the seeds document: the same keys and types as the fixtures.

Each request here is written out as the seed's example writes it (not through the client), sent
to the session's emulator processes, and the answer's shape compared with the verbatim fixture
(``tests/contracts``). Where the fixture was built from a field table because the seed shows no
example, the answer may leave out optional fields but may not add or retype any.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pipeline.devstack import DEMO_BAIDU_KEY, DEMO_BAIDU_SECRET, DEMO_IDP_PASSWORD, DEMO_IDP_USER, DEMO_TUPUTECH_SECRET_ID
from pipeline.providers.tuputech_wire import Doc, open_sealed, signed_submit_body
from pipeline.samples import make_invoice_pdf, png_bytes
from tests import contracts

BAIDU_SUBMIT = "/rest/2.0/solution/v1/iocr/recognise/universal/request"
BAIDU_RESULT = "/rest/2.0/solution/v1/iocr/recognise/universal/get_result"
BAIDU_MAPS = ("words_result[].kv_result.single_key", "words_result[].kv_result.combo_key", "words_result[].kv_result.combo_key.*[]")
TUPUTECH_MAPS = ("pages[].images[].details", "pages[].text.details")


def _until(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def _same_shape(answer: Any, provider: str, fixture: str, maps: tuple[str, ...] = ()) -> None:
    problems = contracts.shape_mismatches(answer, contracts.load(provider, fixture), maps=maps)
    assert problems == [], f"{provider}/{fixture}: {problems}"


def _within_table(answer: Any, provider: str, fixture: str, maps: tuple[str, ...] = ()) -> None:
    """A table fixture lists every field the seed documents: the answer may omit some, add or retype none."""
    problems = contracts.shape_mismatches(answer, contracts.load(provider, fixture), maps=maps)
    assert [p for p in problems if not p.endswith(": missing")] == [], f"{provider}/{fixture}: {problems}"


def test_baidu_answers_have_the_examples_shapes(baidu, docs):
    token = httpx.post(
        f"{baidu.base_url}/oauth/2.0/token",
        params={"grant_type": "client_credentials", "client_id": DEMO_BAIDU_KEY, "client_secret": DEMO_BAIDU_SECRET},
    ).json()["access_token"]
    form = contracts.load("baidu", "submit_request.json")  # the seed's own form, its template id included
    form["image"] = base64.b64encode(png_bytes(["Invoice No: 7", "Total: 3.00", "| Item | Qty |", "| Tea | 2 |"])).decode()
    url = f"{baidu.base_url}{BAIDU_SUBMIT}?access_token={token}"
    submitted = httpx.post(url, data=form).json()
    _same_shape(submitted, "baidu", "submit_response_success.json")
    refused = httpx.post(url, data={k: v for k, v in form.items() if k not in ("templateSign", "classifierId")}).json()
    _same_shape(refused, "baidu", "submit_response_error.json")

    result_url = f"{baidu.base_url}{BAIDU_RESULT}?access_token={token}"
    get = lambda: httpx.post(result_url, data={"task_id": submitted["task_result"]["task_id"]}).json()  # noqa: E731
    _same_shape(get(), "baidu", "get_result_response_running.json")
    success = _until(get, lambda body: body["task_result"]["status"] == "Success")
    _same_shape(success, "baidu", "get_result_response_success.json", BAIDU_MAPS)


def _idp_result_fixture() -> dict[str, Any]:
    """The result envelope, with the example's ``"value":[{}]`` ("同上面tag_list内容") read as a tag_list entry."""
    fixture = contracts.load("idp", "result_response_from_table.json")
    result = fixture["item"]["result"]
    for group in result["relation_extract"]:
        for row in group["children"]:
            for cell in row["children"]:
                cell["value"] = [result["tag_list"][0]]
    return fixture


def test_idp_answers_stay_within_the_documented_fields(idp, docs):
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    login = httpx.post(f"{idp.base_url}/auth/login", json={"username": b64(DEMO_IDP_USER), "password": b64(DEMO_IDP_PASSWORD)})
    _within_table(login.json(), "idp", "login_response_from_table.json")
    wrong = httpx.post(f"{idp.base_url}/auth/login", json={"username": b64("nobody"), "password": b64("x")})
    _within_table(wrong.json(), "idp", "login_error_from_table.json")

    headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    params = contracts.load("idp", "task_request_params.json")
    pdf = make_invoice_pdf(docs / "invoice.pdf", 3).path.read_bytes()
    created = httpx.post(f"{idp.base_url}/extracting/v2/task", params=params, headers=headers, files=[("files", ("测试.pdf", pdf))])
    _within_table(created.json(), "idp", "task_response_from_table.json")
    extract_id = created.json()["items"][0]["id"]

    get = lambda: httpx.get(f"{idp.base_url}/extracting/v2/{extract_id}", headers=headers).json()  # noqa: E731
    done = _until(get, lambda body: body["item"]["status"] == 5)
    problems = contracts.shape_mismatches(done, _idp_result_fixture())
    assert [p for p in problems if not p.endswith(": missing")] == []
    # the part the seed shows as an example (item.result) must be there whole, not only within the table
    assert [p for p in problems if p.startswith("item.result")] == []

    exported = httpx.get(f"{idp.base_url}/extracting/v2/{extract_id}/export/highlight", headers=headers).json()
    _within_table(exported, "idp", "highlight_response_from_table.json")
    not_found = httpx.get(f"{idp.base_url}/extracting/v2/{extract_id}x/export/highlight", headers=headers)
    assert not_found.status_code == 404


@pytest.fixture
def document_url(stack, docs) -> str:
    """A report served by the stack's S3 front, presigned: the emulator may GET it (HEAD is not needed here)."""
    from pipeline import storage

    stack.activate()
    sample = make_invoice_pdf(docs / "report.pdf", 5)
    bucket = storage.get_settings().staging_bucket
    storage.s3_client().upload_file(str(sample.path), bucket, "tests/contracts/report.pdf")
    return storage.presign_get(bucket, "tests/contracts/report.pdf", expires=600)


def test_tuputech_answers_and_callbacks_have_the_examples_shapes(stack, tuputech, document_url):
    tuputech.config(strict_head=False)  # the presigned URL refuses HEAD; the links have their own test
    keys = stack.tuputech_keys()
    doc = Doc(url=document_url, format="pdf", callback=f"{stack.env['DOCPIPE_CALLBACK_BASE_URL']}/callbacks/tuputech/{'0' * 32}")
    custom_info = contracts.load("tuputech", "submit_request.json")["customInfo"]  # the example's, echoed back
    body = signed_submit_body(DEMO_TUPUTECH_SECRET_ID, keys["client_private"], doc, custom_info=custom_info)
    answer = httpx.post(f"{tuputech.base_url}/v3.1/recognition/doc/async/{DEMO_TUPUTECH_SECRET_ID}", json=body).json()
    _within_table(answer, "tuputech", "submit_response_envelope_from_table.json")
    payload = open_sealed(keys["provider_public"], answer)
    _same_shape(payload, "tuputech", "submit_response.json")

    request_id = payload["result"]["requestId"]
    state = lambda: httpx.get(f"{tuputech.base_url}/_emulator/tasks/{request_id}").json()  # noqa: E731
    finished = _until(state, lambda s: s.get("result") is not None and s["state"] in ("delivering", "done"))
    _same_shape(finished["result"], "tuputech", "callback.json", TUPUTECH_MAPS)
    assert "message" not in finished["result"] and min(p["page"] for p in finished["result"]["pages"] or [{"page": 0}]) == 0


def test_the_clients_tuputech_request_has_the_examples_shape(stack):
    """The other direction: the client's signed submit uses the example's keys and number types
    (``format`` is in the Doc table, line 57, though the example leaves it out)."""
    example = contracts.load("tuputech", "submit_request.json")
    doc = Doc(url="https://example.com/a.pdf", format="pdf", callback="https://example.com/cb", callback_rule="violation")
    sent = signed_submit_body("sid", stack.tuputech_keys()["client_private"], doc, custom_info={"docId": "d"})
    example["doc"]["format"] = "pdf"
    problems = contracts.shape_mismatches(sent, example)
    assert [p for p in problems if not p.endswith(": missing")] == []
