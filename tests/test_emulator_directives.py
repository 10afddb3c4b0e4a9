"""Per-document directives: one batch in which single documents make a provider misbehave.

A document whose recognised text holds a line ``EMULATE: <behaviour> [argument]`` gets the
documented misbehaviour from the emulator that reads it, like a payment provider's magic
card numbers, while the documents around it in the same batch are handled as always. For
each provider one batch (the directed documents first, a plain one last) runs through a
real emulator process; each behaviour then has a test of its own on that batch's answers.
Requests are written out from the seeds, not made through the client.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import (
    BaseHTTPRequestHandler,
    SimpleHTTPRequestHandler,
    ThreadingHTTPServer,
)
from typing import Any, TypeVar

import pytest
import requests
from reportlab.pdfgen import canvas

from pipeline.devstack import free_port
from emulators.documents import directive, find_directive
from pipeline import samples
from tests.tuputech_signing import generate_key_pair, open_sealed, signed_submit_body

# Its module-scoped servers start once, on one xdist worker, not once on every worker that runs one of its tests.
pytestmark = pytest.mark.xdist_group("emulator-directives")

T = TypeVar("T")

# The seed's own messages (000, lines 119-125) and failure statuses (line 333).
ILLEGAL_FILE, OVER_LIMIT = "上传文件包含不合法文件,上传失败!", "文件大小或页数超过上限"
IDP_FAILURES = (2, 4, 20001)


# --- helpers -------------------------------------------------------------------------------


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """``check()``'s first truthy value, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.03)
    return value



def _healthy(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/_emulator/health", timeout=1).ok
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def start() -> Iterator[Callable[[str, dict[str, Any]], str]]:
    """Start ``python -m emulators <provider>`` processes; all are stopped after the module."""
    processes: list[subprocess.Popen[bytes]] = []

    def run(provider: str, config: dict[str, Any]) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "emulators", provider, "--port", str(port), "--config", json.dumps(config)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        processes.append(process)
        base_url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else "emulator exited"
            return _healthy(base_url)

        wait_for(up, f"{provider} emulator", timeout=20)
        return base_url

    yield run
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def png(*lines: str) -> bytes:
    """A PNG whose ``docpipe:text`` chunk holds the lines, as the pipeline's samples make it."""
    return samples.png_bytes(list(lines))


def pdf(*pages: list[str]) -> bytes:
    buffer = io.BytesIO()
    document = canvas.Canvas(buffer)
    for lines in pages:
        for index, line in enumerate(lines):
            document.drawString(72, 760 - 20 * index, line)
        document.showPage()
    document.save()
    return buffer.getvalue()


def stats(base_url: str) -> dict[str, Any]:
    return requests.get(f"{base_url}/_emulator/stats", timeout=5).json()


# --- the shared parser ---------------------------------------------------------------------


def test_the_first_directive_line_of_any_page_is_read() -> None:
    assert find_directive(["Name: A\nTotal: 3", "x\n  EMULATE: fail  bad scan \nEMULATE: error 18"]) == ("fail", "bad scan")
    assert find_directive(["EMULATE: not-json"]) == ("not-json", "")
    assert find_directive(["EMULATE:", "The text says EMULATE: error 18 mid-line", "Emulate: error 18"]) is None
    assert directive(pdf(["Title: report"], ["Name: B", "EMULATE: fail 4"]), "pdf") == ("fail", "4")
    assert directive(png("Name: C", f"EMULATE: refuse {ILLEGAL_FILE}"), "png") == ("refuse", ILLEGAL_FILE)
    assert directive(png("Name: C"), "png") is None


# --- baidu ---------------------------------------------------------------------------------

BAIDU_KEYS = {"api_key": "test-ak", "secret_key": "test-sk"}
BAIDU_SUBMIT = "/rest/2.0/solution/v1/iocr/recognise/universal/request"  # seed 002 line 14
BAIDU_RESULT = "/rest/2.0/solution/v1/iocr/recognise/universal/get_result"  # line 93
BAIDU_BATCH = {  # the plain document last: with a fixed processing time it is done last
    "error": png("Name: Bob", "EMULATE: error 216201"),
    "unknown-error": png("EMULATE: error 987654"),
    "fail": png("Name: Carol", "EMULATE: fail 模板不匹配"),
    "fail-plain": png("EMULATE: fail"),
    "not-json": png("Name: Dave", "EMULATE: not-json"),
    "bad-shape": png("Name: Erin", "EMULATE: bad-shape"),
    "pdf-fail": pdf(["Page one"], ["EMULATE: fail from a PDF"]),
    "plain": png("Name: Alice", "Number: 4711"),
}


@dataclass
class BaiduBatch:
    base_url: str
    token: str
    submitted: dict[str, dict[str, Any]]
    finished: dict[str, requests.Response] = field(default_factory=dict)

    def result(self, name: str) -> requests.Response:
        task_id = self.submitted[name]["task_result"]["task_id"]
        return requests.post(
            f"{self.base_url}{BAIDU_RESULT}", params={"access_token": self.token}, data={"task_id": task_id}, timeout=10
        )


@pytest.fixture(scope="module")
def baidu(start: Callable[[str, dict[str, Any]], str]) -> BaiduBatch:
    config = {**BAIDU_KEYS, "processing_min": 0.4, "processing_max": 0.4, "submit_qps": 1000, "get_result_qps": 1000}
    base_url = start("baidu", config)
    token = requests.post(
        f"{base_url}/oauth/2.0/token",
        params={"grant_type": "client_credentials", "client_id": "test-ak", "client_secret": "test-sk"},
        timeout=10,
    ).json()["access_token"]
    submitted = {}
    for name, data in BAIDU_BATCH.items():
        is_pdf = data.startswith(b"%PDF-")
        form = {  # the seed's example form (lines 49-54)
            "pdf_file" if is_pdf else "image": base64.b64encode(data).decode(),
            "fileName": f"{name}.{'pdf' if is_pdf else 'png'}",
            "classifierId": "project-yht3ia44fyixcwm2",
            "templateSign": "id_card_font",
        }
        response = requests.post(f"{base_url}{BAIDU_SUBMIT}", params={"access_token": token}, data=form, timeout=10)
        assert response.status_code == 200
        submitted[name] = response.json()
    batch = BaiduBatch(base_url, token, submitted)

    def settled(name: str) -> requests.Response | None:
        answer = batch.result(name)
        return None if answer.json()["task_result"]["status"] == "Running" else answer

    for name in ("fail", "fail-plain", "pdf-fail", "plain"):
        batch.finished[name] = wait_for(partial(settled, name), f"baidu task {name}")
    return batch


def test_baidu_the_plain_document_of_the_batch_completes(baidu: BaiduBatch) -> None:
    answer = baidu.finished["plain"].json()
    assert answer["error_code"] == 0 and answer["task_result"]["status"] == "Success"
    [page] = answer["words_result"]
    assert page["kv_result"]["single_key"]["Name"][0]["words"] == "Alice"
    counted = stats(baidu.base_url)
    # Every submit but the two directed errors made a task and was billed.
    assert counted["tasks"]["created"] == len(BAIDU_BATCH) - 2 and counted["documents"]["submitted"] == len(BAIDU_BATCH) - 2
    assert counted["endpoints"]["submit"]["accepted"] == len(BAIDU_BATCH) - 2


def test_baidu_error_directive_answers_the_code_in_the_seeds_failure_shape(baidu: BaiduBatch) -> None:
    answer = baidu.submitted["error"]
    # The seed's failure example (002, lines 82-88), key for key.
    assert set(answer) == {"error_code", "error_msg", "error_explain", "log_id", "data"}
    assert answer["error_code"] == 216201 and answer["error_msg"] == "image format error"
    assert answer["data"] is None and answer["error_explain"] and answer["log_id"]
    unknown = baidu.submitted["unknown-error"]
    assert set(unknown) == set(answer) and unknown["error_code"] == 987654 and unknown["error_msg"] == "Unknown error"
    assert "task_result" not in answer and "result" not in answer  # no task
    counted = stats(baidu.base_url)
    assert counted["directives"]["error"] == 2 and counted["endpoints"]["submit"]["faults_injected"] == 2


def test_baidu_fail_directive_ends_the_task_failed_with_its_reason(baidu: BaiduBatch) -> None:
    failed = baidu.finished["fail"].json()
    assert failed["error_code"] == 0 and failed["words_result"] is None
    assert failed["task_result"]["status"] == "Failed" and failed["task_result"]["reason"] == "模板不匹配"
    plain_reason = baidu.finished["fail-plain"].json()["task_result"]
    assert plain_reason["status"] == "Failed" and plain_reason["reason"]  # the emulator's usual reason
    from_pdf = baidu.finished["pdf-fail"].json()["task_result"]
    assert from_pdf["status"] == "Failed" and from_pdf["reason"] == "from a PDF"


def test_baidu_not_json_directive_answers_get_result_with_html(baidu: BaiduBatch) -> None:
    for _ in range(2):  # every poll, also once the task's processing time is over
        response = baidu.result("not-json")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert response.text.lstrip().startswith("<html")
        with pytest.raises(ValueError):
            response.json()
    assert baidu.submitted["not-json"]["error_code"] == 0  # the submit itself was as always


def test_baidu_bad_shape_directive_answers_get_result_without_task_result(baidu: BaiduBatch) -> None:
    response = baidu.result("bad-shape")
    assert response.status_code == 200
    answer = response.json()
    assert answer["error_code"] == 0 and "task_result" not in answer
    assert baidu.submitted["bad-shape"]["error_code"] == 0


# --- idp -----------------------------------------------------------------------------------

IDP_BATCH: dict[str, bytes] = {
    "refuse-illegal": png("Name: A", f"EMULATE: refuse {ILLEGAL_FILE}"),
    "refuse-too-big": png(f"EMULATE: refuse {OVER_LIMIT}"),
    **{f"fail-{status}": png("Name: B", f"EMULATE: fail {status}") for status in IDP_FAILURES},
    "pdf-fail": pdf(["Invoice No: 1"], [f"EMULATE: fail {IDP_FAILURES[0]}"]),
    "not-json": png("Name: C", "EMULATE: not-json"),
    "bad-shape": png("Name: D", "EMULATE: bad-shape"),
    "plain": png("Invoice No: 12345", "Total: 99.50"),
}
IDP_REFUSED = ("refuse-illegal", "refuse-too-big")


@dataclass
class IdpBatch:
    base_url: str
    headers: dict[str, str]
    created: dict[str, requests.Response]
    final: dict[str, dict[str, Any]] = field(default_factory=dict)

    def result(self, name: str) -> requests.Response:
        extract_id = self.created[name].json()["items"][0]["id"]
        return requests.get(f"{self.base_url}/extracting/v2/{extract_id}", headers=self.headers, timeout=10)


@pytest.fixture(scope="module")
def idp(start: Callable[[str, dict[str, Any]], str]) -> IdpBatch:
    base_url = start("idp", {"username": "u", "password": "p", "processing_min": 0.4, "processing_max": 0.4})
    credentials = {key: base64.b64encode(value.encode()).decode() for key, value in (("username", "u"), ("password", "p"))}
    login = requests.post(f"{base_url}/auth/login", json=credentials, timeout=10)  # base64 values, seed lines 80-81
    headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    created = {}
    for name, data in IDP_BATCH.items():
        kind = ("pdf", "application/pdf") if data.startswith(b"%PDF-") else ("png", "image/png")
        created[name] = requests.post(
            f"{base_url}/extracting/v2/task",
            params={"async_task": True, "feature_type_id": 1},
            headers=headers,
            files=[("files", (f"{name}.{kind[0]}", data, kind[1]))],
            timeout=30,
        )
    batch = IdpBatch(base_url, headers, created)

    def final(name: str) -> dict[str, Any] | None:
        item = batch.result(name).json()["item"]
        return item if item["status"] in {*IDP_FAILURES, 5} else None

    for name in [*(f"fail-{status}" for status in IDP_FAILURES), "pdf-fail", "plain"]:
        batch.final[name] = wait_for(partial(final, name), f"idp extract {name}")
    return batch


def test_idp_the_plain_document_of_the_batch_completes(idp: IdpBatch) -> None:
    item = idp.final["plain"]
    assert item["status"] == 5 and {tag["tag_name"]: tag["value"] for tag in item["result"]["tag_list"]}["Total"] == "99.50"
    counted = stats(idp.base_url)
    assert counted["tasks"]["created"] == len(IDP_BATCH) - len(IDP_REFUSED)
    assert counted["endpoints"]["task"]["accepted"] == len(IDP_BATCH) - len(IDP_REFUSED)


def test_idp_refuse_directive_answers_400_with_its_message(idp: IdpBatch) -> None:
    for name, message in zip(IDP_REFUSED, (ILLEGAL_FILE, OVER_LIMIT), strict=True):
        response = idp.created[name]
        assert response.status_code == 400 and response.json() == {"status": 400, "message": message}
    counted = stats(idp.base_url)
    assert counted["directives"]["refuse"] == 2 and counted["endpoints"]["task"]["faults_injected"] == 2


@pytest.mark.parametrize("status", IDP_FAILURES)
def test_idp_fail_directive_ends_at_its_failure_status(idp: IdpBatch, status: int) -> None:
    assert idp.created[f"fail-{status}"].status_code == 200
    item = idp.final[f"fail-{status}"]
    assert item["status"] == status
    assert item["result"] is None or item["result"]["status"] == "ERROR"


def test_idp_fail_directive_is_read_from_a_pdf_page(idp: IdpBatch) -> None:
    assert idp.final["pdf-fail"]["status"] == IDP_FAILURES[0]


def test_idp_not_json_directive_answers_the_result_with_html(idp: IdpBatch) -> None:
    assert idp.created["not-json"].status_code == 200  # the upload was as always
    response = idp.result("not-json")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()


def test_idp_bad_shape_directive_answers_the_result_without_item(idp: IdpBatch) -> None:
    assert idp.created["bad-shape"].status_code == 200
    response = idp.result("bad-shape")
    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == 200 and answer["status"] == 200 and answer["message"] and "item" not in answer


# --- tuputech ------------------------------------------------------------------------------

TUPU_SECRET_ID = "test-secret-id"
TUPU_BATCH = {
    "code-14": b"Some text.\nEMULATE: code 14\n",
    "code-4242": pdf(["Cover"], ["EMULATE: code 4242"]),
    "bad-shape": pdf(["Page one"], ["EMULATE: bad-shape", "This page is FORBIDDEN reading."]),
    "plain": b"A plain note that asks for REVIEW.\n",
}


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class Callbacks:
    """Records every callback body by path and answers 200."""

    def __init__(self) -> None:
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.received.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def first(self, path: str) -> dict[str, Any] | None:
        with self.lock:
            return (self.received.get(path) or [None])[0]


@dataclass
class TupuBatch:
    public_key: str
    request_ids: dict[str, str]
    callbacks: dict[str, dict[str, Any]]  # name -> the verified json of its callback
    stats: dict[str, Any]


@pytest.fixture(scope="module")
def tuputech(start: Callable[[str, dict[str, Any]], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TupuBatch]:
    private_key, public_key = generate_key_pair()
    config = {"secret_id": TUPU_SECRET_ID, "client_public_key": public_key, "processing_min": 0.2, "processing_max": 0.3}
    base_url = start("tuputech", config)
    folder = tmp_path_factory.mktemp("tuputech-files")
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(folder)))
    threading.Thread(target=files.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    receiver = Callbacks()
    try:
        tupu_key = requests.get(f"{base_url}/_emulator/public_key", timeout=5).text
        request_ids = {}
        for name, data in TUPU_BATCH.items():
            suffix = "pdf" if data.startswith(b"%PDF-") else "txt"
            (folder / f"{name}.{suffix}").write_bytes(data)
            doc = {
                "url": f"http://127.0.0.1:{files.server_address[1]}/{name}.{suffix}",
                "callback": f"{receiver.base_url}/cb/{name}",
                "callbackRule": "all",
            }
            body = signed_submit_body(TUPU_SECRET_ID, private_key, doc)
            response = requests.post(f"{base_url}/v3.1/recognition/doc/async/{TUPU_SECRET_ID}", json=body, timeout=5)
            answer = open_sealed(tupu_key, response.json())
            assert answer["code"] == 0, answer
            request_ids[name] = answer["result"]["requestId"]
        # Each callback is verified against the emulator's key before it is read (seed 4.6).
        arrived = {name: open_sealed(tupu_key, wait_for(partial(receiver.first, f"/cb/{name}"), f"callback {name}")) for name in TUPU_BATCH}
        # The receiver records a callback before it answers: wait for the emulator to count the 200s.
        counted = wait_for(lambda: (now := stats(base_url))["called_back"] == len(TUPU_BATCH) and now, "callbacks counted")
        yield TupuBatch(tupu_key, request_ids, arrived, counted)
    finally:
        files.shutdown()
        files.server_close()
        receiver.server.shutdown()
        receiver.server.server_close()


def test_tuputech_the_plain_document_of_the_batch_gets_its_verdict(tuputech: TupuBatch) -> None:
    result = tuputech.callbacks["plain"]
    assert result["code"] == 0 and result["requestId"] == tuputech.request_ids["plain"]
    assert result["suggestion"] == 2 and result["docInfo"]["pages"] == 1 and isinstance(result["pages"], list)
    assert tuputech.stats["called_back"] == len(TUPU_BATCH)


def test_tuputech_code_directive_calls_back_with_that_business_code(tuputech: TupuBatch) -> None:
    for name, code in (("code-14", 14), ("code-4242", 4242)):
        result = tuputech.callbacks[name]
        assert result["code"] == code and result["requestId"] == tuputech.request_ids[name]
        assert "suggestion" not in result and "pages" not in result  # no verdict
        assert result["docInfo"] == {"images": 0, "pages": 0, "textLength": 0}
    assert tuputech.stats["directives"]["code"] == 2


def test_tuputech_bad_shape_directive_sends_a_verified_callback_of_the_wrong_shape(tuputech: TupuBatch) -> None:
    result = tuputech.callbacks["bad-shape"]  # verified by the fixture: signed as any callback
    assert result["requestId"] == tuputech.request_ids["bad-shape"] and result["code"] == 0
    assert "docInfo" not in result
    assert isinstance(result["pages"], str)
    assert tuputech.stats["directives"]["bad-shape"] == 1
