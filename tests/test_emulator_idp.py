"""The idp emulator as a real process, checked against seed 000.

The seed's own Python examples run against it unchanged except for what the seed tells its
reader to fill in (host, token, ids): they are independent of our wire models, so a
mistake shared by the emulator and the client cannot hide. The other tests pin the
documented failures: login messages and lock-out, token expiry, task refusals, the status
walk to a final code, the result's content and the highlighted PDF.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pypdf import PdfReader
from reportlab.pdfgen import canvas

from pipeline.devstack import free_port, wait_until
from pipeline.providers import idp_wire as wire
from tests.conftest import EmulatorControl
from tests.seeds import SEEDS, seed_text

IDP_SEED = SEEDS / "000_042f2eb730337316.txt"
SEED_HOST = "http://host:port"
# The seed's examples log in as b'username' / b'password': the emulator gets exactly those.
USERNAME, PASSWORD = "username", "password"
EMULATOR = {
    "username": USERNAME,
    "password": PASSWORD,
    "disabled_users": ["banned"],
    "processing_min": 0.8,
    "processing_max": 1.2,
    "seed": 7,
}
INVOICE_LINES = ["Invoice No: 12345", "Date: 2024-01-31", "Total: 99.50", "| Item | Qty |", "| Tea | 2 |", "| Cake | 1 |"]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "emulators", "idp", "--port", str(port), "--config", json.dumps(EMULATOR)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(f"{base_url}/_emulator/health", timeout=1).ok, 20, "idp emulator")
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def idp(emulator_url: str) -> Iterator[EmulatorControl]:
    """The module's emulator with its config and statistics reset around each test."""
    control = EmulatorControl(emulator_url)
    control.reset()
    yield control
    control.reset()


def make_pdf(lines: list[str], pages: int = 1) -> bytes:
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    for _ in range(pages):
        for index, line in enumerate(lines):
            pdf.drawString(72, 760 - 20 * index, line)
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def login(base_url: str, username: str = USERNAME, password: str = PASSWORD) -> requests.Response:
    return requests.post(f"{base_url}/auth/login", json={"username": b64(username), "password": b64(password)}, timeout=10)


def bearer(base_url: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {login(base_url).json()['access_token']}"}


def create_task(
    base_url: str, headers: dict[str, str], files: list[bytes], async_task: bool = True, prefix: str = "/api", **data: str
) -> requests.Response:
    return requests.post(
        f"{base_url}{prefix}/extracting/v2/task",
        params={"async_task": async_task, "feature_type_id": 1},
        headers=headers,
        files=[("files", (f"doc{i}.pdf", content, "application/pdf")) for i, content in enumerate(files)],
        data=data,
        timeout=30,
    )


def get_item(base_url: str, headers: dict[str, str], extract_id: int, prefix: str = "/api") -> dict:
    response = requests.get(f"{base_url}{prefix}/extracting/v2/{extract_id}", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["item"]


def wait_final(base_url: str, headers: dict[str, str], extract_id: int) -> tuple[dict, list[int]]:
    """Poll until a final status; return the last item and every distinct status seen, in order."""
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        item = get_item(base_url, headers, extract_id)
        if not seen or seen[-1] != item["status"]:
            seen.append(item["status"])
        if item["status"] in wire.FINAL:
            return item, seen
        time.sleep(0.05)
    raise AssertionError(f"no final status after 10 s: {seen}")


def assert_error(response: requests.Response, http_status: int, message: str) -> None:
    assert response.status_code == http_status, response.text
    assert response.json() == {"status": http_status, "message": message}


# --- the seed's own examples ----------------------------------------------------------------


def seed_python_examples() -> dict[str, str]:
    """Each endpoint's Python example from the seed, keyed by the path it calls.

    The login block carries its curl twin after ``# curl``; the result example was split
    across two fenced blocks by the web copy, so a block without its ``pprint`` takes the next.
    """
    blocks = re.findall(r"```\n(.*?)```", seed_text(IDP_SEED), re.S)
    examples = {}
    for index, block in enumerate(blocks):
        if "import requests" not in block:
            continue
        code = block.split("# curl")[0]
        if "pprint(response.json())" not in code:
            code += blocks[index + 1]
        url = re.search(r"""['"](http://host:port[^'"]*)['"]""", code)
        assert url is not None, code
        examples[url.group(1).removeprefix(SEED_HOST)] = code
    return examples


def run_example(code: str, cwd: Path) -> dict:
    completed = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return ast.literal_eval(completed.stdout.strip())


def test_seed_examples_run_against_the_emulator(idp: EmulatorControl, tmp_path: Path) -> None:
    examples = seed_python_examples()
    assert set(examples) == {
        "/auth/login",
        "/extracting/v2/task",
        "/extracting/v2/{extract_id}",
        "/extracting/v2/{id}/export/highlight",
    }
    host = idp.base_url

    logged_in = run_example(examples["/auth/login"].replace(SEED_HOST, host), tmp_path)
    assert logged_in["status"] == 200 and logged_in["message"] == wire.LOGIN_OK
    assert set(logged_in) >= {"access_token", "refresh_token", "user_id", "nickname", "need_update_password"}
    token = logged_in["access_token"]

    (tmp_path / "测试.pdf").write_bytes(make_pdf(INVOICE_LINES))  # the file the example opens
    created = run_example(examples["/extracting/v2/task"].replace(SEED_HOST, host).replace("{jwt token}", token), tmp_path)
    assert created["status"] == 200 and created["message"] == wire.TASK_CREATED and created["total"] == 1
    item = created["items"][0]
    assert {"extract_task_id", "origin_name", "unique_name"} <= set(item) and item["origin_name"] == "测试.pdf"
    assert created["ids"] == [item["id"]]

    def fill(code: str, id_placeholder: str) -> str:
        """What the seed tells its reader to replace: host, token and the id."""
        return code.replace(SEED_HOST, host).replace("{jwt token}", token).replace(id_placeholder, str(item["id"]))

    result_code = fill(examples["/extracting/v2/{extract_id}"], "{extract_id}")
    deadline = time.monotonic() + 10
    answer = run_example(result_code, tmp_path)
    while answer["item"]["status"] not in wire.FINAL and time.monotonic() < deadline:
        assert answer["item"]["result"] is None
        answer = run_example(result_code, tmp_path)
    assert answer["status"] == 200 and answer["item"]["status"] == wire.ExtractStatus.PRELABEL_SUCCEEDED
    assert answer["item"]["language"] == "example_string"  # the example's query parameter, kept
    result = answer["item"]["result"]
    assert result["status"] == "OK" and set(result) >= {"doc_prob", "pdf_path", "fuzzy_tag_list", "tag_list", "relation_extract"}
    assert {"tag_name": "Invoice No", "value": "12345"}.items() <= result["tag_list"][0].items()

    highlight = run_example(fill(examples["/extracting/v2/{id}/export/highlight"], "{id}"), tmp_path)
    assert highlight["status"] == 200 and highlight["item"]["file_name"] == "测试_highlight.pdf"
    assert highlight["item"]["url"].startswith(host + "/")


# --- login ----------------------------------------------------------------------------------


def test_login_answers_token_and_documented_refusals(idp: EmulatorControl) -> None:
    body = wire.LoginResponse.model_validate(login(idp.base_url).json())
    assert body.status == 200 and body.message == wire.LOGIN_OK and body.access_token and body.refresh_token

    assert_error(login(idp.base_url, password="wrong"), 400, wire.BAD_CREDENTIALS)
    assert_error(login(idp.base_url, username="banned", password="anything"), 400, wire.USER_DISABLED)
    missing = requests.post(f"{idp.base_url}/auth/login", json={"username": b64(USERNAME)}, timeout=10)
    assert_error(missing, 422, wire.VALIDATION_ERROR)
    plain = requests.post(f"{idp.base_url}/auth/login", json={"username": USERNAME, "password": "pass-word"}, timeout=10)
    assert_error(plain, 422, wire.VALIDATION_ERROR)  # values must be base64, as the seed's example sends them


def test_repeated_failures_lock_the_user_out_for_a_while(idp: EmulatorControl) -> None:
    idp.config(login_max_failures=3, login_lock_seconds=1.0)
    for _ in range(3):
        assert_error(login(idp.base_url, password="wrong"), 400, wire.BAD_CREDENTIALS)
    assert_error(login(idp.base_url), 400, wire.LOGIN_LOCKED)  # even the right password
    time.sleep(1.1)
    assert login(idp.base_url).status_code == 200
    assert idp.endpoint("login")["accepted"] == 1


def test_expired_or_missing_token_answers_401(idp: EmulatorControl) -> None:
    idp.config(token_expires_in=2)
    headers = bearer(idp.base_url)
    unknown = f"{idp.base_url}/api/extracting/v2/1"
    assert_error(requests.get(unknown, headers=headers, timeout=10), 404, wire.EXTRACT_NOT_FOUND)
    wait_until(lambda: requests.get(unknown, headers=headers, timeout=10).status_code == 401, 5, "token expiry")
    assert requests.get(unknown, headers=headers, timeout=10).json()["status"] == 401
    assert requests.get(unknown, timeout=10).status_code == 401
    assert requests.get(unknown, headers={"Authorization": "Bearer not-a-jwt"}, timeout=10).status_code == 401

    fresh = bearer(idp.base_url)
    idp.post("/_emulator/expire_tokens")
    assert requests.get(unknown, headers=fresh, timeout=10).status_code == 401


# --- task creation --------------------------------------------------------------------------


def test_task_refusals(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    pdf = make_pdf(INVOICE_LINES)
    assert_error(create_task(idp.base_url, headers, [pdf, pdf], async_task=False), 400, wire.SYNC_ONE_FILE)
    assert_error(create_task(idp.base_url, headers, [b"just some text"]), 400, wire.ILLEGAL_FILE)
    assert_error(create_task(idp.base_url, headers, []), 422, wire.VALIDATION_ERROR)
    assert_error(create_task(idp.base_url, headers, [pdf], callback_args="[1, 2]"), 422, wire.VALIDATION_ERROR)
    no_async = requests.post(
        f"{idp.base_url}/api/extracting/v2/task",
        params={"feature_type_id": 1},
        headers=headers,
        files=[("files", pdf)],
        timeout=10,
    )
    assert_error(no_async, 422, wire.VALIDATION_ERROR)

    idp.config(max_file_bytes=len(pdf) - 1)
    assert_error(create_task(idp.base_url, headers, [pdf]), 400, wire.OVER_LIMIT)
    idp.config(max_file_bytes=10_000_000, max_pages=1)
    assert_error(create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES, pages=2)]), 400, wire.OVER_LIMIT)
    assert idp.endpoint("task")["accepted"] == 0


def test_async_task_with_several_files_and_callback_args(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    pdf = make_pdf(INVOICE_LINES)
    response = create_task(idp.base_url, headers, [pdf, pdf], callback_args=json.dumps({"job": "j-1"}))
    body = wire.CreateTaskResponse.model_validate(response.json())
    assert response.status_code == 200 and body.total == 2 and len(set(body.extract_ids)) == 2
    assert {item.extract_task_id for item in body.items} == {body.items[0].extract_task_id}
    assert body.items[0].extract_task_id not in body.extract_ids  # two kinds of id, never confused
    assert "result" not in response.json()  # only a synchronous task answers its result


def test_sync_task_answers_the_result(idp: EmulatorControl) -> None:
    response = create_task(idp.base_url, bearer(idp.base_url), [make_pdf(INVOICE_LINES)], async_task=False)
    body = wire.CreateTaskResponse.model_validate(response.json())
    assert response.status_code == 200 and body.message == wire.TASK_CREATED and body.name == "doc0.pdf"
    assert body.result is not None and "Invoice No: 12345" in (body.content or "")
    assert {tag.tag_name: tag.value for tag in body.result.tag_list}["Invoice No"] == "12345"


# --- status, result, highlight --------------------------------------------------------------


def test_status_walks_to_success_with_the_documents_fields(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    created = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()
    item, seen = wait_final(idp.base_url, headers, created["items"][0]["id"])

    walk = [0, 6, 3, 7, 5]
    assert seen[-1] == 5 and {6, 7} <= set(seen) and seen == sorted(seen, key=walk.index)
    parsed = wire.GetResultResponse.model_validate({"status": 200, "item": item}).item
    assert parsed is not None and parsed.succeeded and parsed.result is not None
    assert parsed.status_name == "预标注成功" and parsed.doc_type == wire.DOC_TYPE_ELECTRONIC
    content = parsed.content or ""
    tags = {tag.tag_name: tag for tag in parsed.result.tag_list}
    assert {name: tag.value for name, tag in tags.items()} == {"Invoice No": "12345", "Date": "2024-01-31", "Total": "99.50"}
    for tag in tags.values():
        assert tag.index is not None and content[tag.index : tag.index + len(tag.value or "")] == tag.value
        assert tag.word == tag.value and 0.9 <= (tag.confidence or 0) <= 1.0
        located = tag.located()
        assert located is not None and located.locations[0].page_no == 0

    (group,) = parsed.result.relation_extract
    assert group.type == "group" and [row.type for row in group.children] == ["card", "card"]
    rows = [{field.name: field.value[0].value for field in row.children} for row in group.children]
    assert rows == [{"Item": "Tea", "Qty": "2"}, {"Item": "Cake", "Qty": "1"}]


def test_failures_end_in_a_documented_failure_status(idp: EmulatorControl) -> None:
    idp.config(failure_rate=1.0)
    headers = bearer(idp.base_url)
    created = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()
    extract_id = created["items"][0]["id"]
    item, seen = wait_final(idp.base_url, headers, extract_id)
    assert item["status"] in {2, 4, 20001} and 5 not in seen
    assert item["result"] is None or item["result"]["status"] == "ERROR"
    export = requests.get(f"{idp.base_url}/api/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10)
    assert_error(export, 400, wire.HIGHLIGHT_NOT_READY)


def test_highlight_export_downloads_a_real_pdf(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    extract_id = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()["items"][0]["id"]
    wait_final(idp.base_url, headers, extract_id)
    response = requests.get(f"{idp.base_url}/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10)
    export = wire.HighlightResponse.model_validate(response.json())
    assert export.item is not None and export.item.file_name == "doc0_highlight.pdf"
    assert export.item.url and export.item.url.startswith(idp.base_url + "/")

    download = requests.get(export.item.url, timeout=10)
    assert download.status_code == 200 and download.headers["content-type"] == "application/pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(download.content)).pages)
    assert "Invoice No: 12345" in text
    assert idp.endpoint("download")["accepted"] == 1


def test_both_url_prefixes_are_served(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    for prefix in ("/api", ""):
        response = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)], prefix=prefix)
        assert response.status_code == 200, response.text
        extract_id = response.json()["items"][0]["id"]
        assert get_item(idp.base_url, headers, extract_id, "/api")["id"] == extract_id
        assert get_item(idp.base_url, headers, extract_id, "")["id"] == extract_id
    assert idp.endpoint("task")["accepted"] == 2 and idp.endpoint("result")["requests"] == 4


# --- faults ---------------------------------------------------------------------------------


def test_injected_faults_answer_the_providers_server_errors(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    idp.config(faults={"internal_error_rate": 1.0})
    assert_error(create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]), 500, wire.TASK_FAILED)
    assert_error(login(idp.base_url), 500, wire.LOGIN_FAILED)

    idp.config(faults={"internal_error_rate": 0.0, "http_5xx_rate": 1.0})
    gateway = requests.get(f"{idp.base_url}/api/extracting/v2/1", headers=headers, timeout=10)
    assert gateway.status_code in (502, 503, 504) and gateway.headers["content-type"].startswith("text/html")
    stats = idp.stats()["endpoints"]
    assert stats["task"]["faults_injected"] == 1 and stats["result"]["faults_injected"] == 1
