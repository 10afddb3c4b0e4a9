"""The tuputech emulator as a client meets it: a real emulator process, a real file server
for the document (HEAD included) and a real callback receiver.

The seed has no example code, only the documented request shape (2.6), the callback's
example (4.7) and pseudo-code for reading a callback (4.6); these tests write requests and
checks out with ``requests`` and ``cryptography`` directly, never through the client's
``tuputech_wire``, so that a misreading of the seed shared by client and emulator cannot
hide. Where the seed's table and its example disagree, the emulator answers as the example
does by default; each such setting is tested both ways.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from cryptography.exceptions import InvalidSignature
from PIL import Image
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

from pipeline.devstack import free_port
from emulators.tuputech import document_pages
from tests.tuputech_signing import generate_key_pair, open_sealed, rsa_sign, rsa_verify, signed_submit_body

# Its module-scoped servers start once, on one xdist worker, not once on every worker that runs one of its tests.
pytestmark = pytest.mark.xdist_group("emulator-tuputech")

SECRET_ID = "test-secret-id"
TEXT_TASK_ID = "57c4036c557603652aeeb222"  # the text task's id in the seed's callback example (4.7)
IMAGE_TASK_ID = "54bcfc6c329af61034f7c2fc"  # the image task's
# For submits refused or faulted before any download.
UNUSED_DOC = {"url": "http://127.0.0.1:8080/a.pdf", "callback": "http://127.0.0.1:8080/cb"}
# The top-level keys of the seed's callback example (4.7), which has no "message".
EXAMPLE_CALLBACK_KEYS = {"code", "requestId", "riskType", "suggestion", "docInfo", "customInfo", "pages", "timestamp", "nonce"}


# --- servers the test runs -----------------------------------------------------------------


def _serve(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class _NoHeadFiles(_QuietFiles):
    """Like a presigned S3 GET URL: the signature covers the method, so HEAD is refused."""

    def do_HEAD(self) -> None:
        self.send_error(403)


@dataclass
class FileServer:
    directory: Path
    base_url: str

    def put(self, name: str, data: bytes) -> str:
        (self.directory / name).write_bytes(data)
        return f"{self.base_url}/{name}"


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(tmp_path)))
    yield FileServer(tmp_path, _serve(server))
    server.shutdown()
    server.server_close()


class CallbackReceiver:
    """Records every callback POST; ``plan[path]`` lists the statuses to answer before 200."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any], float]] = []
        self.plan: dict[str, list[int]] = {}
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._changed:
                    receiver.received.append((self.path, body, time.monotonic()))
                    statuses = receiver.plan.get(self.path, [])
                    status = statuses.pop(0) if statuses else 200
                    receiver._changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"message": "ok"}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = _serve(self.server)

    def count(self, path: str) -> int:
        with self._changed:
            return sum(1 for p, _, _ in self.received if p == path)

    def wait(self, path: str, count: int = 1, timeout: float = 15.0) -> list[tuple[dict[str, Any], float]]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(got := [(b, t) for p, b, t in self.received if p == path]) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(got)} of {count} callbacks to {path} arrived"
                self._changed.wait(left)
        return got


@pytest.fixture
def callbacks() -> Iterator[CallbackReceiver]:
    receiver = CallbackReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


# --- the emulator process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_keys() -> tuple[str, str]:
    return generate_key_pair()


@dataclass
class Emulator:
    base_url: str

    @property
    def submit_url(self) -> str:
        return f"{self.base_url}/v3.1/recognition/doc/async/{SECRET_ID}"

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.base_url}/_emulator/stats", timeout=5).json()

    def public_key(self) -> str:
        return requests.get(f"{self.base_url}/_emulator/public_key", timeout=5).text



def _start(client_keys: tuple[str, str], log: Path, **overrides: Any) -> tuple[subprocess.Popen[bytes], Emulator]:
    """An emulator process with the test account, fast processing and fast retries, plus ``overrides``."""
    config = {
        "secret_id": SECRET_ID,
        "client_public_key": client_keys[1],
        "processing_min": 0.2,
        "processing_max": 0.4,
        "callback_retry_delay": 0.05,
        **overrides,
    }
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "emulators", "tuputech", "--port", str(port), "--config", json.dumps(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    emulator = Emulator(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"emulator exited: {log.read_text()}")
        try:
            if requests.get(f"{emulator.base_url}/_emulator/health", timeout=1).ok:
                return process, emulator
        except requests.ConnectionError:
            time.sleep(0.05)
    _stop(process)
    raise RuntimeError("emulator did not start")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def emulator(client_keys: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One emulator with the default test settings, shared by the tests that change none of them."""
    process, shared = _start(client_keys, tmp_path_factory.mktemp("emulator") / "emulator.log")
    yield shared
    _stop(process)


@pytest.fixture
def configure(emulator: Emulator) -> Iterator[Callable[..., None]]:
    """Change the shared emulator's settings for one test; settings and statistics are restored around it."""
    control, reset = f"{emulator.base_url}/_emulator/config", f"{emulator.base_url}/_emulator/reset"
    defaults = requests.get(control, timeout=5).json()
    requests.post(reset, timeout=5).raise_for_status()

    def change(**settings: Any) -> None:
        requests.post(control, json=settings, timeout=5).raise_for_status()

    yield change
    requests.post(control, json=defaults, timeout=5).raise_for_status()
    requests.post(reset, timeout=5).raise_for_status()


@pytest.fixture
def start_emulator(client_keys: tuple[str, str], tmp_path: Path) -> Iterator[Callable[..., Emulator]]:
    """Start emulators of their own for tests that change settings or read the statistics."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(**overrides: Any) -> Emulator:
        process, started = _start(client_keys, tmp_path / f"emulator-{len(processes)}.log", **overrides)
        processes.append(process)
        return started

    yield start
    for process in processes:
        _stop(process)


# --- documents and requests ----------------------------------------------------------------


def _pdf(*pages: str) -> bytes:
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    for text in pages:
        pdf.drawString(72, 720, text)
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def _submit(emulator: Emulator, client_keys: tuple[str, str], url: str, callback: str, **kwargs: Any) -> dict[str, Any]:
    """Submit through the wire helpers; return the verified payload of the signed answer."""
    doc = {"url": url, "callback": callback}
    if "callback_rule" in kwargs:
        doc["callbackRule"] = kwargs.pop("callback_rule")
    body = signed_submit_body(SECRET_ID, client_keys[0], doc, **kwargs)
    response = requests.post(emulator.submit_url, json=body, timeout=5)
    assert response.status_code == 200
    return open_sealed(emulator.public_key(), response.json())


# --- tests ---------------------------------------------------------------------------------


def test_documented_request_and_callback(
    emulator: Emulator, client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    tupu_public_key = emulator.public_key()  # no private_key configured: the emulator made its own
    url = files.put("report.pdf", _pdf("A quarterly report.", "This page is FORBIDDEN reading."))
    callback = f"{callbacks.base_url}/tupu"
    timestamp, nonce = int(time.time()), 1685000000
    body = {  # seed 2.6, the placeholders filled in
        "doc": {"url": url, "callback": callback, "callbackRule": "violation"},
        "tasks": [TEXT_TASK_ID],
        "customInfo": {"docId": "doc-1", "maxImages": 1000, "maxTextLength": 10000},
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": rsa_sign(client_keys[0], f"{SECRET_ID},{timestamp},{nonce}"),
    }
    response = requests.post(emulator.submit_url, json=body, headers={"Content-Type": "application/json"}, timeout=5)

    assert response.status_code == 200
    rsa_verify(tupu_public_key, response.json()["json"], response.json()["signature"])
    answer = json.loads(response.json()["json"])
    assert answer["code"] == 0 and answer["message"] == "success"
    assert {"nonce", "timestamp"} <= answer.keys()
    assert 24 <= len(answer["result"]["requestId"]) <= 128
    assert answer["result"]["url"] == url and answer["result"]["callback"] == callback

    [(envelope, _)] = callbacks.wait("/tupu")
    rsa_verify(tupu_public_key, envelope["json"], envelope["signature"])
    result = json.loads(envelope["json"])  # seed 4.6: result = JSON.parse(CallbackRequest.json)
    assert result["code"] == 0 and result["requestId"] == answer["result"]["requestId"]
    assert result["suggestion"] == 1 and result["riskType"] != 0
    assert result["docInfo"] == {"pages": 2, "images": 0, "textLength": result["docInfo"]["textLength"]}
    assert result["customInfo"] == body["customInfo"]
    texts = [page["text"] for page in result["pages"] if page.get("text", {}).get("suggestion") == 1]
    # "violation": the clean first page is left out; pages count from 0 as in the example (4.7).
    assert [page["page"] for page in result["pages"]] == [1]
    hit = texts[0]["details"][TEXT_TASK_ID]["texts"][0]["details"][0]
    assert hit["keyword"] == "FORBIDDEN" and hit["endPos"] - hit["startPos"] == len("FORBIDDEN")
    page_text = requests.get(texts[0]["url"], timeout=5)
    assert page_text.status_code == 200 and "FORBIDDEN" in page_text.text
    # The 4.7 example's shape, key for key: no "message", which only the table (4.5) asks for.
    assert set(result) == EXAMPLE_CALLBACK_KEYS
    [page] = result["pages"]
    assert set(page) == {"page", "summary", "text"} and set(page["summary"]) == {"suggestion", "riskType"}
    assert set(page["text"]) == {"url", "suggestion", "riskType", "details"}


def test_pdf_images_are_counted_named_and_served(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    emulator = start_emulator()
    picture = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(picture, "PNG")
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    for text in ("first", "second"):
        pdf.drawString(72, 720, text)
        pdf.drawImage(ImageReader(io.BytesIO(picture.getvalue())), 72, 500, 40, 30)
        pdf.showPage()
    pdf.save()
    url = files.put("pictures.pdf", buffer.getvalue())
    request_id = _submit(emulator, client_keys, url, f"{callbacks.base_url}/cb", callback_rule="all")["result"]["requestId"]

    result = open_sealed(emulator.public_key(), callbacks.wait("/cb")[0][0])
    assert result["docInfo"]["pages"] == 2 and result["docInfo"]["images"] == 2
    assert [p["page"] for p in result["pages"]] == [0, 1]
    for page in result["pages"]:
        [image] = page["images"]
        assert image["name"] == f"{request_id}-{page['page']}-0" and image["suggestion"] == 0
        served = requests.get(image["url"], timeout=5)
        assert served.status_code == 200 and served.headers["content-type"].startswith("image/")
        with Image.open(io.BytesIO(served.content)) as decoded:
            assert decoded.size == (40, 30)


@pytest.mark.parametrize(
    ("content", "suggestion"),
    [("Nothing to see here.", 0), ("Please REVIEW this one.", 2), ("REVIEW and FORBIDDEN both.", 1)],
)
def test_verdict_follows_the_content(
    emulator: Emulator,
    client_keys: tuple[str, str],
    files: FileServer,
    callbacks: CallbackReceiver,
    content: str,
    suggestion: int,
) -> None:
    url = files.put("note.txt", content.encode())
    assert _submit(emulator, client_keys, url, f"{callbacks.base_url}/cb")["code"] == 0
    [(envelope, _)] = callbacks.wait("/cb")
    result = open_sealed(emulator.public_key(), envelope)
    assert result["suggestion"] == suggestion
    assert len(result["pages"]) == (0 if suggestion == 0 else 1)


def test_text_is_paged_by_length_and_recognised_up_to_max_text_length(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    emulator = start_emulator(text_page_length=5000)
    text = ("x" * 99 + "\n") * 110 + "FORBIDDEN" + "y" * 991  # 12000 characters, the word at 11000
    url = files.put("novel.txt", text.encode())
    _submit(emulator, client_keys, url, f"{callbacks.base_url}/default", callback_rule="all")
    _submit(emulator, client_keys, url, f"{callbacks.base_url}/long", custom_info={"maxTextLength": 12000})

    default = open_sealed(emulator.public_key(), callbacks.wait("/default")[0][0])
    assert default["docInfo"] == {"pages": 3, "images": 0, "textLength": 12000}
    assert default["suggestion"] == 0  # the word lies past the default 10000 characters
    assert [p["page"] for p in default["pages"]] == [0, 1, 2]
    assert "text" not in default["pages"][2]  # nothing of page 3 was recognised, so no text result
    served = [requests.get(p["text"]["url"], timeout=5).text for p in default["pages"][:2]]
    assert served == [text[:5000], text[5000:10000]]

    longer = open_sealed(emulator.public_key(), callbacks.wait("/long")[0][0])
    assert longer["suggestion"] == 1 and [p["page"] for p in longer["pages"]] == [2]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda body: body.update(signature=base64.b64encode(b"\x00" * 256).decode()), 1),
        (lambda body: body.update(nonce=body["nonce"] + 1), 1),
        (lambda body: body["doc"].pop("callback"), 11),
    ],
    ids=["forged-signature", "tampered-nonce", "no-callback"],
)
def test_refusals(
    emulator: Emulator,
    client_keys: tuple[str, str],
    change: Callable[[dict[str, Any]], None],
    code: int,
) -> None:
    body = signed_submit_body(SECRET_ID, client_keys[0], UNUSED_DOC)
    change(body)
    response = requests.post(emulator.submit_url, json=body, timeout=5)
    answer = open_sealed(emulator.public_key(), response.json())
    assert answer["code"] == code and "result" not in answer


def test_stale_timestamp_and_unknown_secret_id(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str]
) -> None:
    emulator = start_emulator(timestamp_tolerance=60)
    stale = signed_submit_body(SECRET_ID, client_keys[0], UNUSED_DOC, timestamp=int(time.time()) - 600)
    answer = open_sealed(emulator.public_key(), requests.post(emulator.submit_url, json=stale, timeout=5).json())
    assert answer["code"] == 12

    other = signed_submit_body("someone-else", client_keys[0], UNUSED_DOC)
    response = requests.post(emulator.submit_url.replace(SECRET_ID, "someone-else"), json=other, timeout=5)
    assert open_sealed(emulator.public_key(), response.json())["code"] == 6


def test_signature_covers_the_values_as_written(
    emulator: Emulator, client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    url = files.put("a.txt", b"hello")
    timestamp = int(time.time())
    raw = (
        f'{{"doc": {{"url": "{url}", "callback": "{callbacks.base_url}/cb"}}, "timestamp": {timestamp}, '
        f'"nonce": 0.50, "signature": "{rsa_sign(client_keys[0], f"{SECRET_ID},{timestamp},0.50")}"}}'
    )
    response = requests.post(emulator.submit_url, data=raw, headers={"Content-Type": "application/json"}, timeout=5)
    assert open_sealed(emulator.public_key(), response.json())["code"] == 0


def test_file_errors_come_back_as_code_14(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    emulator = start_emulator(max_doc_bytes=1000)
    big = files.put("big.txt", b"z" * 1001)
    assert _submit(emulator, client_keys, big, f"{callbacks.base_url}/big")["code"] == 0  # "超出时回调状态码 14"
    gone = f"http://127.0.0.1:{free_port()}/nowhere.pdf"
    assert _submit(emulator, client_keys, gone, f"{callbacks.base_url}/gone")["code"] == 0
    for path in ("/big", "/gone"):
        result = open_sealed(emulator.public_key(), callbacks.wait(path)[0][0])
        assert result["code"] == 14 and result["docInfo"] == {"pages": 0, "images": 0, "textLength": 0}
    privileged = _submit(emulator, client_keys, "http://127.0.0.1:81/a.pdf", f"{callbacks.base_url}/x")
    assert privileged["code"] == 14  # the seed's port rule is checked at submit


def test_links_that_refuse_head_are_code_14_unless_lenient(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], tmp_path: Path, callbacks: CallbackReceiver
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_NoHeadFiles, directory=str(tmp_path)))
    url = f"{_serve(server)}/signed.txt"
    (tmp_path / "signed.txt").write_bytes(b"a presigned document")
    try:
        # 2.5 Doc.url 4: "链接须支持 HEAD 请求,以便进行文档大小探测" -- strict by default.
        strict, lenient = start_emulator(), start_emulator(strict_head=False)
        small = start_emulator(strict_head=False, max_doc_bytes=10, callback_message=True)
        _submit(lenient, client_keys, url, f"{callbacks.base_url}/lenient")
        _submit(strict, client_keys, url, f"{callbacks.base_url}/strict")
        _submit(small, client_keys, url, f"{callbacks.base_url}/small")
        assert open_sealed(lenient.public_key(), callbacks.wait("/lenient")[0][0])["code"] == 0
        assert open_sealed(strict.public_key(), callbacks.wait("/strict")[0][0])["code"] == 14
        too_big = open_sealed(small.public_key(), callbacks.wait("/small")[0][0])
        assert too_big["code"] == 14 and "over 10" in too_big["message"]
    finally:
        server.shutdown()
        server.server_close()


def test_at_most_max_in_flight_are_processed_and_the_rest_queue(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    # The ten submits go at once: one after another, a loaded machine sent them slower than three
    # tasks of a second end, and nothing ever queued (seen under make test with a CPU hog).
    emulator = start_emulator(max_in_flight=3, processing_min=1.0, processing_max=1.0)
    url = files.put("a.txt", b"plain")
    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: _submit(emulator, client_keys, url, f"{callbacks.base_url}/many"), range(10)))
    assert [a["code"] for a in answers] == [0] * 10
    samples = []
    while callbacks.count("/many") < 10 and time.monotonic() - started < 30:
        samples.append(emulator.stats())
    assert max(s["processing"] for s in samples) <= 3
    assert max(s["queued"] for s in samples) > 0  # the file interface queues what exceeds the concurrency
    assert all(s["queued"] + s["processing"] <= s["in_flight"] for s in samples)

    arrivals = sorted(t - started for _, t in callbacks.wait("/many", 10))
    assert arrivals[-1] >= 4 * 1.0  # ceil(10 / 3) rounds of processing
    stats = emulator.stats()
    assert stats["tasks_accepted"] == 10 and stats["endpoints"]["submit"]["accepted"] == 10
    assert stats["max_processing_seen"] == 3
    assert stats["max_in_flight_seen"] > 3  # accepted and not called back: the queued ones count
    time.sleep(0.1)
    stats = emulator.stats()
    assert stats["called_back"] == 10 and stats["in_flight"] == stats["processing"] == stats["queued"] == 0


def test_callbacks_are_retried_three_times_on_non_200(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    emulator = start_emulator()
    url = files.put("a.txt", b"plain")
    callbacks.plan = {"/flaky": [500, 503], "/down": [500] * 10}
    flaky = _submit(emulator, client_keys, url, f"{callbacks.base_url}/flaky")["result"]["requestId"]
    down = _submit(emulator, client_keys, url, f"{callbacks.base_url}/down")["result"]["requestId"]

    flaky_calls = callbacks.wait("/flaky", 3)
    callbacks.wait("/down", 4)
    assert len({body["json"] for body, _ in flaky_calls}) == 1  # the same signed result each time
    time.sleep(0.5)
    assert len(callbacks.wait("/down", 4)) == 4  # 1 attempt + 3 retries, then it gives up
    state = {rid: requests.get(f"{emulator.base_url}/_emulator/tasks/{rid}", timeout=5).json() for rid in (flaky, down)}
    assert (state[flaky]["callback_attempts"], state[flaky]["delivered"]) == (3, True)
    assert (state[down]["callback_attempts"], state[down]["delivered"]) == (4, False)
    stats = emulator.stats()
    assert (stats["callback_attempts"], stats["callback_failures"], stats["callbacks_abandoned"]) == (7, 6, 1)
    assert stats["called_back"] == 1 and stats["in_flight"] == 0


def test_fault_injection_on_submit(start_emulator: Callable[..., Emulator], client_keys: tuple[str, str]) -> None:
    broken = start_emulator(faults={"http_5xx_rate": 1.0})
    response = requests.post(broken.submit_url, json=signed_submit_body(SECRET_ID, client_keys[0], UNUSED_DOC), timeout=5)
    assert response.status_code in (500, 502, 503)
    failing = start_emulator(faults={"internal_error_rate": 1.0})
    response = requests.post(failing.submit_url, json=signed_submit_body(SECRET_ID, client_keys[0], UNUSED_DOC), timeout=5)
    assert open_sealed(failing.public_key(), response.json())["code"] == 100
    assert failing.stats()["endpoints"]["submit"]["faults_injected"] == 1


def _zip(parts: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in parts.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_office_and_html_page_model() -> None:
    slide = '<p:sld><p:txBody><a:p><a:r><a:t>{}</a:t></a:r></a:p></p:txBody></p:sld>'
    pptx = _zip(
        {
            "ppt/presentation.xml": "<p/>",
            "ppt/slides/slide2.xml": slide.format("two"),
            "ppt/slides/slide1.xml": slide.format("one"),
        }
    )
    assert [(p.number, p.text) for p in document_pages(pptx, "pptx", 5000)] == [(1, "one"), (2, "two")]

    docx = _zip(
        {
            "word/document.xml": '<w:body><w:p><w:r><w:t>first &amp; page</w:t></w:r></w:p>'
            '<w:p><w:r><w:br w:type="page"/><w:t xml:space="preserve">second</w:t></w:r></w:p></w:body>'
        }
    )
    assert [p.text for p in document_pages(docx, "docx", 5000)] == ["first & page", "second"]

    xlsx = _zip(
        {
            "xl/workbook.xml": "<w/>",
            "xl/sharedStrings.xml": "<sst><si><t>name</t></si><si><t>FORBIDDEN</t></si></sst>",
            "xl/worksheets/sheet1.xml": '<ws><row><c t="s"><v>0</v></c><c><v>42</v></c></row></ws>',
            "xl/worksheets/sheet2.xml": '<ws><row><c t="s"><v>1</v></c><c r="B1"/></row></ws>',
        }
    )
    assert [p.text for p in document_pages(xlsx, "xlsx", 5000)] == ["name\t42", "FORBIDDEN\t"]

    page = "<html><head><style>p {}</style></head><body><p>Hello &amp; bye</p></body></html>"
    assert [p.text for p in document_pages(page.encode(), "html", 5000)] == ["Hello & bye\n"]


def _delivered_state(emulator: Emulator, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The emulator's view of a task once it has seen its callback answered (just after the receiver has it)."""
    deadline = time.monotonic() + timeout
    while True:
        state = requests.get(f"{emulator.base_url}/_emulator/tasks/{request_id}", timeout=5).json()
        if state["delivered"]:
            return state
        assert time.monotonic() < deadline, f"task {request_id} not delivered: {state}"
        time.sleep(0.02)


# --- the seed's table against its example ---------------------------------------------------


def test_page_numbers_and_message_follow_the_example_unless_the_table_is_asked_for(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    """4.7 counts pages from 0 and has no ``message``; the table (4.5) says from 1 and requires it."""
    example, table = start_emulator(), start_emulator(page_index_base=1, callback_message=True)
    url = files.put("two.pdf", _pdf("first page", "second page"))
    _submit(example, client_keys, url, f"{callbacks.base_url}/example", callback_rule="all")
    _submit(table, client_keys, url, f"{callbacks.base_url}/table", callback_rule="all")

    as_example = open_sealed(example.public_key(), callbacks.wait("/example")[0][0])
    assert "message" not in as_example and set(as_example) == EXAMPLE_CALLBACK_KEYS - {"customInfo"}
    assert [p["page"] for p in as_example["pages"]] == [0, 1]
    assert requests.get(as_example["pages"][0]["text"]["url"], timeout=5).text.strip() == "first page"

    as_table = open_sealed(table.public_key(), callbacks.wait("/table")[0][0])
    assert as_table["message"] == "success" and set(as_table) - {"message"} == set(as_example)
    assert [p["page"] for p in as_table["pages"]] == [1, 2]
    assert requests.get(as_table["pages"][0]["text"]["url"], timeout=5).text.strip() == "first page"


@pytest.mark.parametrize("failure_code", [None, 4242], ids=["default-100", "undocumented-4242"])
def test_failing_tasks_call_back_with_the_configured_code(
    start_emulator: Callable[..., Emulator],
    client_keys: tuple[str, str],
    files: FileServer,
    callbacks: CallbackReceiver,
    failure_code: int | None,
) -> None:
    settings: dict[str, Any] = {"failure_rate": 1.0}
    if failure_code is not None:
        settings["failure_code"] = failure_code
    emulator = start_emulator(**settings)
    answer = _submit(emulator, client_keys, files.put("a.txt", b"plain"), f"{callbacks.base_url}/fails")
    assert answer["code"] == 0  # accepted: the failure comes with the result

    result = open_sealed(emulator.public_key(), callbacks.wait("/fails")[0][0])
    assert result["code"] == (failure_code or 100) and "message" not in result
    assert result["docInfo"] == {"pages": 0, "images": 0, "textLength": 0} and "pages" not in result
    state = _delivered_state(emulator, answer["result"]["requestId"])
    assert state["reason"] and state["result"] == result


def test_a_malformed_accept_is_a_real_task_with_an_unverifiable_answer(
    start_emulator: Callable[..., Emulator], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    emulator = start_emulator(faults={"malformed_accept_rate": 1.0})
    url = files.put("note.txt", b"Please REVIEW this one.")
    body = signed_submit_body(SECRET_ID, client_keys[0], {"url": url, "callback": f"{callbacks.base_url}/cb"})
    response = requests.post(emulator.submit_url, json=body, timeout=5)

    assert response.status_code == 200
    envelope = response.json()
    assert set(envelope) == {"json", "signature"}  # the documented shape...
    with pytest.raises(InvalidSignature):  # ...whose signature is not over its json
        rsa_verify(emulator.public_key(), envelope["json"], envelope["signature"])
    answer = json.loads(envelope["json"])
    assert answer["code"] == 0 and answer["result"]["url"] == url
    request_id = answer["result"]["requestId"]

    # The task is real: processed and called back, with a callback that does verify.
    result = open_sealed(emulator.public_key(), callbacks.wait("/cb")[0][0])
    assert result["requestId"] == request_id and result["suggestion"] == 2
    assert _delivered_state(emulator, request_id)["result"] == result
    stats = emulator.stats()
    assert stats["endpoints"]["submit"]["accepted"] == 1 and stats["endpoints"]["submit"]["faults_injected"] == 1
    assert stats["tasks_accepted"] == 1


def test_config_changes_at_run_time_take_effect(
    emulator: Emulator, client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    """Clients' end-to-end tests switch readings on a running emulator through /_emulator/config."""
    url = files.put("one.txt", b"one page FORBIDDEN")
    control = f"{emulator.base_url}/_emulator/config"
    defaults = requests.get(control, timeout=5).json()
    assert (defaults["page_index_base"], defaults["callback_message"], defaults["strict_head"]) == (0, False, True)
    assert defaults["failure_code"] == 100 and defaults["faults"]["malformed_accept_rate"] == 0.0
    try:
        requests.post(control, json={"page_index_base": 1, "callback_message": True}, timeout=5).raise_for_status()
        _submit(emulator, client_keys, url, f"{callbacks.base_url}/switched")
        result = open_sealed(emulator.public_key(), callbacks.wait("/switched")[0][0])
        assert result["message"] == "success" and [p["page"] for p in result["pages"]] == [1]
    finally:
        requests.post(control, json=defaults, timeout=5)


# --- faults on the shared emulator ----------------------------------------------------------


def _task_when(emulator: Emulator, request_id: str, ready: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not ready(state := requests.get(f"{emulator.base_url}/_emulator/tasks/{request_id}", timeout=5).json()):
        assert time.monotonic() < deadline, f"task {request_id}: {state}"
        time.sleep(0.02)
    return state


def test_a_dropped_submit_gets_no_answer_and_creates_no_task(
    emulator: Emulator, configure: Callable[..., None], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    """The connection is closed with nothing sent: a transport error, not a status, and no task."""
    configure(faults={"drop_rate": 1.0})
    doc = {"url": files.put("a.txt", b"plain"), "callback": f"{callbacks.base_url}/cb"}
    with pytest.raises(httpx.TransportError):
        httpx.post(emulator.submit_url, json=signed_submit_body(SECRET_ID, client_keys[0], doc), timeout=5)
    stats = emulator.stats()
    submit = stats["endpoints"]["submit"]
    assert (submit["requests"], submit["accepted"], submit["faults_injected"]) == (1, 0, 1)
    assert stats["tasks_accepted"] == 0 and stats["in_flight"] == 0

    configure(faults={"drop_rate": 0.0})
    assert _submit(emulator, client_keys, doc["url"], doc["callback"])["code"] == 0
    callbacks.wait("/cb")


def test_a_slow_submit_is_still_processed_after_the_client_gave_up(
    emulator: Emulator, configure: Callable[..., None], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    configure(faults={"slow_rate": 1.0, "slow_seconds": 1.0})
    doc = {"url": files.put("a.txt", b"plain"), "callback": f"{callbacks.base_url}/slow"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(emulator.submit_url, json=signed_submit_body(SECRET_ID, client_keys[0], doc), timeout=0.3)
    callbacks.wait("/slow")  # accepted, processed and called back although nobody read the answer
    stats = emulator.stats()
    assert stats["tasks_accepted"] == 1 and stats["endpoints"]["submit"]["faults_injected"] == 1


def test_a_dropped_callback_is_never_sent(
    emulator: Emulator, configure: Callable[..., None], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    configure(callback_drop_rate=1.0)
    request_id = _submit(emulator, client_keys, files.put("a.txt", b"plain"), f"{callbacks.base_url}/lost")["result"]["requestId"]
    # "done" comes only after a callback's answer: had one been sent, the receiver would hold it now.
    state = _task_when(emulator, request_id, lambda s: s["state"] == "done")
    assert state["callback_dropped"] and not state["delivered"] and state["callback_attempts"] == 0
    assert state["result"]["code"] == 0  # processed all the same
    assert callbacks.count("/lost") == 0
    stats = emulator.stats()
    assert (stats["callbacks_dropped"], stats["called_back"], stats["callback_attempts"]) == (1, 0, 0)
    assert stats["in_flight"] == 0 and stats["documents"]["submitted"] == 1


def test_a_duplicated_callback_comes_again_a_second_later(
    emulator: Emulator, configure: Callable[..., None], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    configure(callback_duplicate_rate=1.0)
    request_id = _submit(emulator, client_keys, files.put("a.txt", b"plain"), f"{callbacks.base_url}/twice")["result"]["requestId"]
    (first, first_at), (second, second_at) = callbacks.wait("/twice", 2)
    assert second == first and 0.9 <= second_at - first_at < 3  # the same signed callback
    assert open_sealed(emulator.public_key(), second)["requestId"] == request_id
    state = _task_when(emulator, request_id, lambda s: s["duplicated"])
    assert state["delivered"] and state["callback_attempts"] == 1
    stats = emulator.stats()
    assert (stats["callbacks_duplicated"], stats["called_back"], stats["callback_attempts"]) == (1, 1, 1)


def test_a_late_callback_waits_callback_delay(
    emulator: Emulator, configure: Callable[..., None], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    configure(callback_delay=1.5)
    started = time.monotonic()
    request_id = _submit(emulator, client_keys, files.put("a.txt", b"plain"), f"{callbacks.base_url}/late")["result"]["requestId"]
    # Processed (0.2-0.4 s) and out of the in-flight count well before its callback leaves.
    _task_when(emulator, request_id, lambda s: s["state"] == "delivering")
    assert emulator.stats()["in_flight"] == 0 and callbacks.count("/late") == 0
    [(envelope, arrived)] = callbacks.wait("/late")
    assert arrived - started >= 1.5
    assert open_sealed(emulator.public_key(), envelope)["requestId"] == request_id


def test_documents_count_downloaded_documents_by_content(
    emulator: Emulator, configure: Callable[..., None], client_keys: tuple[str, str], files: FileServer, callbacks: CallbackReceiver
) -> None:
    first, copy = files.put("a.txt", b"one document"), files.put("copy-of-a.txt", b"one document")
    for url in (first, copy, files.put("b.txt", b"another document")):
        assert _submit(emulator, client_keys, url, f"{callbacks.base_url}/docs")["code"] == 0
    callbacks.wait("/docs", 3)
    documents = {"submitted": 3, "distinct": 2, "repeated": 1, "max_per_document": 2}  # by content, not by URL
    assert emulator.stats()["documents"] == documents
    requests.post(f"{emulator.base_url}/_emulator/reset", timeout=5).raise_for_status()
    assert emulator.stats()["documents"] == {"submitted": 0, "distinct": 0, "repeated": 0, "max_per_document": 0}
