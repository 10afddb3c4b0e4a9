"""The idp emulator as a real process, checked against seed 000.

The seed's own Python examples run against it unchanged except for what the seed tells its
reader to fill in (host, token, ids): they are independent of our wire models, so a
mistake shared by the emulator and the client cannot hide. The other tests pin the
documented failures: login messages and lock-out, token expiry, task refusals, the status
walk to a final code, the result's content and the highlighted PDF. Messages and statuses
are the seed's own text, written out here rather than taken from the client's ``idp_wire``.
Where the seed's tables and its examples disagree, the emulator answers as the examples do
by default; each such setting is tested both ways.
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
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import requests
from pypdf import PdfReader
from reportlab.pdfgen import canvas

from pipeline.devstack import free_port
from tests.conftest import EmulatorControl
from tests.seeds import SEEDS, seed_text

# Its module-scoped servers start once, on one xdist worker, not once on every worker that runs one of its tests.
pytestmark = pytest.mark.xdist_group("emulator-idp")

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

# The seed's status tables (lines 17-23, 119-125) and item.status (line 333).
LOGIN_OK, LOGIN_FAILED, VALIDATION_ERROR = "登入成功", "登入失败", "参数校验出错"
BAD_CREDENTIALS, USER_DISABLED, LOGIN_LOCKED = "用户名或密码错误", "用户已禁用", "登入失败次数太多，请稍后重试"
TASK_CREATED, TASK_FAILED, SYNC_ONE_FILE = "创建任务成功", "创建任务失败", "同步任务只允许上传一份文件"
ILLEGAL_FILE, OVER_LIMIT = "上传文件包含不合法文件,上传失败!", "文件大小或页数超过上限"
FAILED_STATUSES = {2, 4, 20001}  # 文本转换失败, 预标注失败, 文件检查失败
# Not in the seed: the emulator's own words for what the seed leaves out.
EXTRACT_NOT_FOUND, HIGHLIGHT_NOT_READY = "抽取记录不存在", "文档未抽取成功，无法导出"
TOO_FAST = "请求过于频繁"  # the seed documents no limit: the emulator's 429 for a spurious one


# --- fixtures and helpers -------------------------------------------------------------------



def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def start_emulator(config: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "emulators", "idp", "--port", str(port), "--config", json.dumps(config)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and requests.get(f"{base_url}/_emulator/health", timeout=1).ok, 20, "idp emulator")
    except AssertionError:
        process.kill()
        raise
    return process, base_url


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    process, base_url = start_emulator(EMULATOR)
    try:
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
    base_url: str, headers: dict[str, str], files: list[bytes], async_task: bool = True, prefix: str = "", **data: str
) -> requests.Response:
    return requests.post(
        f"{base_url}{prefix}/extracting/v2/task",
        params={"async_task": async_task, "feature_type_id": 1},
        headers=headers,
        files=[("files", (f"doc{i}.pdf", content, "application/pdf")) for i, content in enumerate(files)],
        data=data,
        timeout=30,
    )


def get_item(base_url: str, headers: dict[str, str], extract_id: int, prefix: str = "") -> dict:
    response = requests.get(f"{base_url}{prefix}/extracting/v2/{extract_id}", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["item"]


def wait_final(
    base_url: str, headers: dict[str, str], extract_id: int, success: int = 5, prefix: str = ""
) -> tuple[dict, list[int]]:
    """Poll until a final status (``success`` or a documented failure); return the last item and
    every distinct status seen, in order."""
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        item = get_item(base_url, headers, extract_id, prefix)
        if not seen or seen[-1] != item["status"]:
            seen.append(item["status"])
        if item["status"] in FAILED_STATUSES | {success}:
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
    assert logged_in["status"] == 200 and logged_in["message"] == LOGIN_OK
    assert set(logged_in) >= {"access_token", "refresh_token", "user_id", "nickname", "need_update_password"}
    token = logged_in["access_token"]

    (tmp_path / "测试.pdf").write_bytes(make_pdf(INVOICE_LINES))  # the file the example opens
    created = run_example(examples["/extracting/v2/task"].replace(SEED_HOST, host).replace("{jwt token}", token), tmp_path)
    assert created["status"] == 200 and created["message"] == TASK_CREATED and created["total"] == 1
    item = created["items"][0]
    assert {"extract_task_id", "origin_name", "unique_name"} <= set(item) and item["origin_name"] == "测试.pdf"
    assert created["ids"] == [item["id"]]

    def fill(code: str, id_placeholder: str) -> str:
        """What the seed tells its reader to replace: host, token and the id."""
        return code.replace(SEED_HOST, host).replace("{jwt token}", token).replace(id_placeholder, str(item["id"]))

    result_code = fill(examples["/extracting/v2/{extract_id}"], "{extract_id}")
    deadline = time.monotonic() + 10
    answer = run_example(result_code, tmp_path)
    while answer["item"]["status"] not in FAILED_STATUSES | {5} and time.monotonic() < deadline:
        assert answer["item"]["result"] is None
        answer = run_example(result_code, tmp_path)
    assert answer["status"] == 200 and answer["item"]["status"] == 5  # 预标注成功
    assert answer["item"]["language"] == "example_string"  # the example's query parameter, kept
    result = answer["item"]["result"]
    assert result["status"] == "OK" and set(result) >= {"doc_prob", "pdf_path", "fuzzy_tag_list", "tag_list", "relation_extract"}
    assert {"tag_name": "Invoice No", "value": "12345"}.items() <= result["tag_list"][0].items()

    highlight = run_example(fill(examples["/extracting/v2/{id}/export/highlight"], "{id}"), tmp_path)
    assert highlight["status"] == 200 and highlight["item"]["file_name"] == "测试_highlight.pdf"
    assert highlight["item"]["url"].startswith(host + "/")


# --- login ----------------------------------------------------------------------------------


def test_login_answers_token_and_documented_refusals(idp: EmulatorControl) -> None:
    body = login(idp.base_url).json()
    assert body["status"] == 200 and body["message"] == LOGIN_OK and body["access_token"] and body["refresh_token"]
    assert set(body) <= {"access_token", "message", "need_update_password", "nickname", "refresh_token", "status", "user_id"}

    assert_error(login(idp.base_url, password="wrong"), 400, BAD_CREDENTIALS)
    assert_error(login(idp.base_url, username="banned", password="anything"), 400, USER_DISABLED)
    missing = requests.post(f"{idp.base_url}/auth/login", json={"username": b64(USERNAME)}, timeout=10)
    assert_error(missing, 422, VALIDATION_ERROR)
    plain = requests.post(f"{idp.base_url}/auth/login", json={"username": USERNAME, "password": "pass-word"}, timeout=10)
    assert_error(plain, 422, VALIDATION_ERROR)  # values must be base64, as the seed's example sends them


def test_repeated_failures_lock_the_user_out_for_a_while(idp: EmulatorControl) -> None:
    idp.config(login_max_failures=3, login_lock_seconds=1.0)
    for _ in range(3):
        assert_error(login(idp.base_url, password="wrong"), 400, BAD_CREDENTIALS)
    assert_error(login(idp.base_url), 400, LOGIN_LOCKED)  # even the right password
    time.sleep(1.1)
    assert login(idp.base_url).status_code == 200
    assert idp.endpoint("login")["accepted"] == 1


def test_expired_or_missing_token_answers_401(idp: EmulatorControl) -> None:
    idp.config(token_expires_in=2)
    headers = bearer(idp.base_url)
    unknown = f"{idp.base_url}/extracting/v2/1"
    assert_error(requests.get(unknown, headers=headers, timeout=10), 404, EXTRACT_NOT_FOUND)
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
    assert_error(create_task(idp.base_url, headers, [pdf, pdf], async_task=False), 400, SYNC_ONE_FILE)
    assert_error(create_task(idp.base_url, headers, [b"just some text"]), 400, ILLEGAL_FILE)
    assert_error(create_task(idp.base_url, headers, []), 422, VALIDATION_ERROR)
    assert_error(create_task(idp.base_url, headers, [pdf], callback_args="[1, 2]"), 422, VALIDATION_ERROR)
    no_async = requests.post(
        f"{idp.base_url}/extracting/v2/task",
        params={"feature_type_id": 1},
        headers=headers,
        files=[("files", pdf)],
        timeout=10,
    )
    assert_error(no_async, 422, VALIDATION_ERROR)
    bad_type = requests.post(
        f"{idp.base_url}/extracting/v2/task",
        params={"async_task": True, "feature_type_id": 1, "file_types": [1, 3]},  # line 152: only 1 and 2
        headers=headers,
        files=[("files", pdf)],
        timeout=10,
    )
    assert_error(bad_type, 422, VALIDATION_ERROR)

    idp.config(max_file_bytes=len(pdf) - 1)
    assert_error(create_task(idp.base_url, headers, [pdf]), 400, OVER_LIMIT)
    idp.config(max_file_bytes=10_000_000, max_pages=1)
    assert_error(create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES, pages=2)]), 400, OVER_LIMIT)
    assert idp.endpoint("task")["accepted"] == 0


def test_async_task_with_several_files_and_callback_args(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    pdf = make_pdf(INVOICE_LINES)
    response = create_task(idp.base_url, headers, [pdf, pdf], callback_args=json.dumps({"job": "j-1"}))
    body = response.json()
    extract_ids = [item["id"] for item in body["items"]]
    assert response.status_code == 200 and body["total"] == 2 and len(set(extract_ids)) == 2 and body["ids"] == extract_ids
    assert {item["extract_task_id"] for item in body["items"]} == {body["items"][0]["extract_task_id"]}
    assert body["items"][0]["extract_task_id"] not in extract_ids  # two kinds of id, never confused
    for item in body["items"]:  # the required fields of items[*] (lines 188, 198, 200)
        assert item["origin_name"].startswith("doc") and item["unique_name"] and item["extract_task_id"]
    assert "result" not in body  # only a synchronous task answers its result


def test_sync_task_answers_the_result(idp: EmulatorControl) -> None:
    response = create_task(idp.base_url, bearer(idp.base_url), [make_pdf(INVOICE_LINES)], async_task=False)
    body = response.json()
    assert response.status_code == 200 and body["message"] == TASK_CREATED and body["name"] == "doc0.pdf"
    assert body["result"] is not None and "Invoice No: 12345" in body["content"]
    assert {tag["tag_name"]: tag["value"] for tag in body["result"]["tag_list"]}["Invoice No"] == "12345"


# --- status, result, highlight --------------------------------------------------------------


def test_status_walks_to_success_with_the_documents_fields(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    created = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()
    item, seen = wait_final(idp.base_url, headers, created["items"][0]["id"])

    walk = [0, 6, 3, 7, 5]
    assert seen[-1] == 5 and {6, 7} <= set(seen) and seen == sorted(seen, key=walk.index)
    assert item["status_name"] == "预标注成功" and item["doc_type"] == 1  # 1: 电子文档
    assert item["result"] is not None and item["result"]["status"] == "OK"
    content = item["content"]
    tags = {tag["tag_name"]: tag for tag in item["result"]["tag_list"]}
    assert {name: tag["value"] for name, tag in tags.items()} == {"Invoice No": "12345", "Date": "2024-01-31", "Total": "99.50"}
    for tag in tags.values():
        # The example's keys (lines 356-365), "index" being where the value is in the content.
        assert set(tag) == {"after_treatment", "color", "confidence", "index", "ppr", "tag_id", "tag_name", "terms_id", "value", "word"}
        assert content[tag["index"] : tag["index"] + len(tag["value"])] == tag["value"]
        assert tag["word"] == tag["value"] and 0.9 <= tag["confidence"] <= 1.0
        assert json.loads(tag["after_treatment"])["locations"][0]["page_no"] == 0

    (group,) = item["result"]["relation_extract"]
    assert group["type"] == "group" and [row["type"] for row in group["children"]] == ["card", "card"]
    rows = [{field["name"]: field["value"][0]["value"] for field in row["children"]} for row in group["children"]]
    assert rows == [{"Item": "Tea", "Qty": "2"}, {"Item": "Cake", "Qty": "1"}]


def test_failures_end_in_a_documented_failure_status(idp: EmulatorControl) -> None:
    idp.config(failure_rate=1.0)
    headers = bearer(idp.base_url)
    created = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()
    extract_id = created["items"][0]["id"]
    item, seen = wait_final(idp.base_url, headers, extract_id)
    assert item["status"] in FAILED_STATUSES and 5 not in seen
    assert item["result"] is None or item["result"]["status"] == "ERROR"
    export = requests.get(f"{idp.base_url}/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10)
    assert_error(export, 400, HIGHLIGHT_NOT_READY)


def test_highlight_export_downloads_a_real_pdf(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    extract_id = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()["items"][0]["id"]
    wait_final(idp.base_url, headers, extract_id)
    response = requests.get(f"{idp.base_url}/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10)
    export = response.json()["item"]
    assert export["file_name"] == "doc0_highlight.pdf" and export["url"].startswith(idp.base_url + "/")

    download = requests.get(export["url"], timeout=10)
    assert download.status_code == 200 and download.headers["content-type"] == "application/pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(download.content)).pages)
    assert "Invoice No: 12345" in text
    assert idp.endpoint("download")["accepted"] == 1


# --- the seed's tables against its examples -------------------------------------------------


def assert_web_server_404(response: requests.Response) -> None:
    """A path the platform does not route: its web server's own page, not the API's JSON refusal."""
    assert response.status_code == 404, response.text
    assert not response.headers["content-type"].startswith("application/json")
    assert EXTRACT_NOT_FOUND not in response.text


def test_api_routes_follow_the_examples_unprefixed_path_by_default(idp: EmulatorControl) -> None:
    """The examples call ``/extracting/...`` (lines 209, 399, 476); the URL tables' ``/api`` is not served."""
    headers = bearer(idp.base_url)
    created = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)])
    assert created.status_code == 200, created.text
    extract_id = created.json()["items"][0]["id"]
    wait_final(idp.base_url, headers, extract_id)
    assert requests.get(f"{idp.base_url}/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10).ok

    assert_web_server_404(create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)], prefix="/api"))
    assert_web_server_404(requests.get(f"{idp.base_url}/api/extracting/v2/{extract_id}", headers=headers, timeout=10))
    highlight = f"{idp.base_url}/api/extracting/v2/{extract_id}/export/highlight"
    assert_web_server_404(requests.get(highlight, headers=headers, timeout=10))
    assert_web_server_404(requests.get(f"{idp.base_url}/extracting/v3/{extract_id}", headers=headers, timeout=10))
    assert_web_server_404(requests.post(f"{idp.base_url}/api/auth/login", json={}, timeout=10))
    stats = idp.stats()["endpoints"]
    assert stats["task"]["requests"] == 1 and stats["unrouted"]["requests"] == 5


def test_api_prefix_serves_the_url_tables_path_only() -> None:
    """With ``api_prefix="/api"`` (lines 136, 261, 438) the examples' paths are the ones that 404."""
    process, base_url = start_emulator({**EMULATOR, "api_prefix": "/api"})
    try:
        headers = bearer(base_url)  # /auth/login has no prefix in either reading (line 29)
        created = create_task(base_url, headers, [make_pdf(INVOICE_LINES)], prefix="/api")
        assert created.status_code == 200, created.text
        extract_id = created.json()["items"][0]["id"]
        item, _ = wait_final(base_url, headers, extract_id, prefix="/api")
        assert item["status"] == 5
        export = requests.get(f"{base_url}/api/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10)
        assert export.json()["item"]["url"].startswith(base_url + "/")

        assert_web_server_404(create_task(base_url, headers, [make_pdf(INVOICE_LINES)]))
        assert_web_server_404(requests.get(f"{base_url}/extracting/v2/{extract_id}", headers=headers, timeout=10))
        assert_web_server_404(requests.get(f"{base_url}/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10))
        # An id the platform does not know, on a routed path, is the API's own refusal.
        assert_error(requests.get(f"{base_url}/api/extracting/v2/1", headers=headers, timeout=10), 404, EXTRACT_NOT_FOUND)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_api_prefix_can_be_switched_at_run_time(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    idp.config(api_prefix="/api")
    assert create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)], prefix="/api").status_code == 200
    assert_web_server_404(create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]))


def test_login_takes_base64_values_by_default_and_plain_ones_when_set(idp: EmulatorControl) -> None:
    """The python example (lines 80-81) sends base64, the curl one (88-89) the plain text."""
    url = f"{idp.base_url}/auth/login"
    plain = {"username": USERNAME, "password": PASSWORD}
    encoded = {"username": b64(USERNAME), "password": b64(PASSWORD)}
    assert requests.post(url, json=encoded, timeout=10).json()["message"] == LOGIN_OK
    assert_error(requests.post(url, json={**plain, "password": "pass-word"}, timeout=10), 422, VALIDATION_ERROR)

    idp.config(login_encoding="plain")
    # The seed's curl example, as written (host filled in).
    curl = requests.post(url, data='{"username":\n"username", "password": "password"}', headers={"Content-Type": "application/json"}, timeout=10)
    assert curl.status_code == 200 and curl.json()["message"] == LOGIN_OK
    assert_error(requests.post(url, json=encoded, timeout=10), 400, BAD_CREDENTIALS)  # base64 is now a wrong password


def test_doc_type_is_spelled_as_configured(idp: EmulatorControl) -> None:
    """Line 306 ``doc_type``, line 307 ``docType`` (deprecated): one item carries one of them."""
    headers = bearer(idp.base_url)
    extract_id = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()["items"][0]["id"]
    item = get_item(idp.base_url, headers, extract_id)
    assert item["doc_type"] == 1 and "docType" not in item

    idp.config(doc_type_key="docType")
    item = get_item(idp.base_url, headers, extract_id)
    assert item["docType"] == 1 and "doc_type" not in item


@pytest.mark.parametrize(
    ("success_status", "walk", "extracted"),
    [
        (8, [0, 6, 3, 7, 8], True),  # 已审核
        (3, [0, 6, 3], False),  # 文本转换成功: a text-only end, content but no extraction
        (42, [0, 6, 3, 7, 42], True),  # a status the seed does not list
    ],
)
def test_success_status_ends_the_documented_walk(idp: EmulatorControl, success_status: int, walk: list[int], extracted: bool) -> None:
    idp.config(success_status=success_status, processing_min=1.5, processing_max=1.5)
    headers = bearer(idp.base_url)
    extract_id = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).json()["items"][0]["id"]
    item, seen = wait_final(idp.base_url, headers, extract_id, success=success_status)

    assert seen[-1] == success_status and set(seen) <= set(walk) and seen == sorted(seen, key=walk.index)
    assert len(seen) >= len(walk) - 1  # polled every 50 ms over 1.5 s: at most the 0 may be missed
    assert "Invoice No: 12345" in item["content"]
    assert (item["result"] is not None) == extracted
    if extracted:
        assert {tag["tag_name"] for tag in item["result"]["tag_list"]} == {"Invoice No", "Date", "Total"}
    export = requests.get(f"{idp.base_url}/extracting/v2/{extract_id}/export/highlight", headers=headers, timeout=10)
    assert export.status_code == 200 and export.json()["item"]["file_name"] == "doc0_highlight.pdf"


# --- faults ---------------------------------------------------------------------------------


def test_injected_faults_answer_the_providers_server_errors(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    idp.config(faults={"internal_error_rate": 1.0})
    assert_error(create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]), 500, TASK_FAILED)
    assert_error(login(idp.base_url), 500, LOGIN_FAILED)

    idp.config(faults={"internal_error_rate": 0.0, "http_5xx_rate": 1.0})
    gateway = requests.get(f"{idp.base_url}/extracting/v2/1", headers=headers, timeout=10)
    assert gateway.status_code in (502, 503, 504) and gateway.headers["content-type"].startswith("text/html")
    stats = idp.stats()["endpoints"]
    assert stats["task"]["faults_injected"] == 1 and stats["result"]["faults_injected"] == 1


def test_a_malformed_accept_creates_the_task_and_drops_required_item_fields(idp: EmulatorControl) -> None:
    idp.config(faults={"malformed_accept_rate": 1.0})
    headers = bearer(idp.base_url)
    response = create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)])
    assert response.status_code == 200
    body = response.json()
    [item] = body["items"]
    assert "origin_name" not in item and "unique_name" not in item  # required by lines 198 and 200
    assert body["ids"] == [item["id"]] and body["message"] == TASK_CREATED

    # The task is real: it is processed like any other, and counted as accepted.
    done, _ = wait_final(idp.base_url, headers, item["id"])
    assert done["status"] == 5 and done["origin_name"] == "doc0.pdf" and done["unique_name"]
    stats = idp.stats()
    assert stats["endpoints"]["task"]["accepted"] == 1 and stats["endpoints"]["task"]["faults_injected"] == 1


def test_a_dropped_request_gets_no_answer_and_creates_no_task(idp: EmulatorControl) -> None:
    """The connection is closed with nothing sent: a transport error, not a status, and no task."""
    headers = bearer(idp.base_url)
    created_before = idp.stats()["tasks"]["created"]
    idp.config(faults={"drop_rate": 1.0})
    files = {"files": ("doc0.pdf", make_pdf(INVOICE_LINES), "application/pdf")}
    params = {"async_task": True, "feature_type_id": 1}
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{idp.base_url}/extracting/v2/task", params=params, headers=headers, files=files, timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{idp.base_url}/auth/login", json={"username": b64(USERNAME), "password": b64(PASSWORD)}, timeout=10)

    stats = idp.stats()
    assert stats["tasks"]["created"] == created_before and stats["documents"]["submitted"] == 0
    task = stats["endpoints"]["task"]
    assert (task["requests"], task["accepted"], task["faults_injected"]) == (1, 0, 1)
    assert stats["endpoints"]["login"]["faults_injected"] == 1
    idp.config(faults={"drop_rate": 0.0})
    assert create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]).status_code == 200


def test_a_spurious_limit_answers_429_in_the_error_shape(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    created_before = idp.stats()["tasks"]["created"]
    idp.config(faults={"spurious_limit_rate": 1.0})
    assert_error(create_task(idp.base_url, headers, [make_pdf(INVOICE_LINES)]), 429, TOO_FAST)
    stats = idp.stats()
    task = stats["endpoints"]["task"]
    assert (task["faults_injected"], task["limit_violations"], task["accepted"]) == (1, 0, 0)
    assert stats["tasks"]["created"] == created_before


def test_tokens_expire_every_period(idp: EmulatorControl) -> None:
    idp.config(faults={"token_expiry_every": 1.0})
    unknown = f"{idp.base_url}/extracting/v2/1"
    old = bearer(idp.base_url)
    assert_error(requests.get(unknown, headers=old, timeout=10), 404, EXTRACT_NOT_FOUND)  # good: the id is what is unknown
    wait_until(lambda: requests.get(unknown, headers=old, timeout=10).status_code == 401, 3, "the token's expiry")
    assert requests.get(unknown, headers=old, timeout=10).json()["status"] == 401
    assert_error(requests.get(unknown, headers=bearer(idp.base_url), timeout=10), 404, EXTRACT_NOT_FOUND)


def test_documents_count_accepted_uploads_by_content(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    invoice, other = make_pdf(INVOICE_LINES), make_pdf(["Something else: entirely"])
    assert create_task(idp.base_url, headers, [invoice]).status_code == 200
    assert create_task(idp.base_url, headers, [invoice, other]).status_code == 200  # each file is a document
    assert create_task(idp.base_url, headers, [b"just some text"]).status_code == 400  # refused: not counted
    assert idp.stats()["documents"] == {"submitted": 3, "distinct": 2, "repeated": 1, "max_per_document": 2}
    idp.post("/_emulator/reset")
    assert idp.stats()["documents"] == {"submitted": 0, "distinct": 0, "repeated": 0, "max_per_document": 0}


def test_a_slow_answer_is_still_processed_after_the_client_gave_up(idp: EmulatorControl) -> None:
    headers = bearer(idp.base_url)
    created_before = idp.stats()["tasks"]["created"]
    idp.config(faults={"slow_rate": 1.0, "slow_seconds": 1.0})
    files = {"files": ("doc0.pdf", make_pdf(INVOICE_LINES), "application/pdf")}
    params = {"async_task": True, "feature_type_id": 1}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{idp.base_url}/extracting/v2/task", params=params, headers=headers, files=files, timeout=0.3)
    wait_until(lambda: idp.stats()["tasks"]["created"] == created_before + 1, 5, "the slow task")
    task = idp.stats()["endpoints"]["task"]
    assert task["accepted"] == 1 and task["faults_injected"] == 1
