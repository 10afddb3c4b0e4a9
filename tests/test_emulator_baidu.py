"""The baidu emulator as a real process, against seed 002's tables and its examples.

Where the table and the example disagree (the submit answer's key, the file name's
spelling, the shape of ``location`` and of combo leaves, the type of the task times), the
emulator answers as the example does by default, because that is what the service sent
when the example was captured; a setting gives the table's reading. Each is tested both
ways here, with requests written out from the seed rather than through the client.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import requests
from PIL import Image, PngImagePlugin

from pipeline.devstack import free_port
from emulators.common import EndpointStats, SlidingWindowLimit, max_in_window
from tests.conftest import EmulatorControl

# Its module-scoped servers start once, on one xdist worker, not once on every worker that runs one of its tests.
pytestmark = pytest.mark.xdist_group("emulator-baidu")

API_KEY, SECRET_KEY = "test-ak", "test-sk"
SUBMIT = "/rest/2.0/solution/v1/iocr/recognise/universal/request"  # seed line 14
GET_RESULT = "/rest/2.0/solution/v1/iocr/recognise/universal/get_result"  # seed line 93
EMULATOR = {
    "api_key": API_KEY,
    "secret_key": SECRET_KEY,
    "processing_min": 0.6,
    "processing_max": 0.6,
    # The QPS limits have their own test (test_baidu_seed_examples); here they would only slow things.
    "submit_qps": 1000,
    "get_result_qps": 1000,
}
CARD_LINES = ["Name: Alice", "Number: 4711", "| Item | Qty |", "| Tea | 2 |"]
CLOCK_TEXT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # "2025-03-17 15:37:55", lines 171-173



@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "emulators", "baidu", "--port", str(port), "--config", json.dumps(EMULATOR)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    try:
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else "emulator exited"
            try:
                if requests.get(f"{base_url}/_emulator/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "baidu emulator did not start"
            time.sleep(0.05)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def baidu(emulator_url: str) -> Iterator[EmulatorControl]:
    """The module's emulator with its config and statistics reset around each test."""
    control = EmulatorControl(emulator_url)
    control.reset()
    yield control
    control.reset()


@pytest.fixture
def token(baidu: EmulatorControl) -> str:
    response = requests.post(
        f"{baidu.base_url}/oauth/2.0/token",
        params={"grant_type": "client_credentials", "client_id": API_KEY, "client_secret": SECRET_KEY},
        timeout=10,
    )
    return response.json()["access_token"]


def card_png(lines: list[str] = CARD_LINES) -> bytes:
    """A PNG whose text chunk the emulator "recognises": two key/value lines and a one-row table."""
    info = PngImagePlugin.PngInfo()
    info.add_text("docpipe:text", "\n".join(lines))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def submit_form(name_field: str = "fileName", name: str = "card.png", **extra: str) -> dict[str, str]:
    """The seed's example form (lines 49-54): image, fileName, classifierId, templateSign."""
    form = {"image": base64.b64encode(card_png()).decode(), name_field: name, "classifierId": "project-yht3ia44fyixcwm2"}
    form.update(templateSign="id_card_font", **extra)
    return form


def post(baidu: EmulatorControl, path: str, token: str, form: dict[str, str]) -> requests.Response:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return requests.post(f"{baidu.base_url}{path}", params={"access_token": token}, data=form, headers=headers, timeout=10)


def submit(baidu: EmulatorControl, token: str, **form: str) -> dict[str, Any]:
    return post(baidu, SUBMIT, token, submit_form(**form)).json()


def result(baidu: EmulatorControl, token: str, task_id: str) -> dict[str, Any]:
    return post(baidu, GET_RESULT, token, {"task_id": task_id}).json()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def wait_finished(baidu: EmulatorControl, token: str, task_id: str, running: str = "Running") -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (answer := result(baidu, token, task_id))["task_result"]["status"] == running:
        assert time.monotonic() < deadline, f"{task_id} still {running}"
        time.sleep(0.05)
    return answer


# --- submit --------------------------------------------------------------------------------


def test_submit_answers_task_result_as_the_example_and_result_as_the_table(baidu: EmulatorControl, token: str) -> None:
    example = submit(baidu, token)
    assert set(example) == {"error_code", "error_msg", "log_id", "task_result"}  # lines 73-80
    assert example["error_code"] == 0 and example["task_result"]["task_id"].startswith("task-")

    baidu.config(submit_answer_key="result")
    table = submit(baidu, token)
    assert set(table) == {"error_code", "error_msg", "log_id", "result"}  # lines 63-70
    assert wait_finished(baidu, token, table["result"]["task_id"])["task_result"]["status"] == "Success"


@pytest.mark.parametrize(
    ("setting", "sent", "accepted"),
    [
        (None, "fileName", True),  # the working example, line 51
        (None, "file_name", False),
        ("file_name", "file_name", True),  # the table, line 27
        ("file_name", "fileName", False),
        ("either", "fileName", True),
        ("either", "file_name", True),
    ],
)
def test_file_name_field(baidu: EmulatorControl, token: str, setting: str | None, sent: str, accepted: bool) -> None:
    if setting is not None:
        baidu.config(file_name_field=setting)
    answer = submit(baidu, token, name_field=sent)
    if accepted:
        assert answer["error_code"] == 0 and answer["task_result"]["task_id"]
    else:
        assert answer["error_code"] == 282003 and answer["error_msg"] == "missing parameters"
        assert baidu.endpoint("submit")["accepted"] == 0


def test_a_file_name_whose_suffix_lies_is_refused(baidu: EmulatorControl, token: str) -> None:
    """Line 27: "注意: 文件名称后缀需与文件实际类型一致"."""
    answer = submit(baidu, token, name="card.pdf")
    assert answer["error_code"] == 283016 and answer["error_msg"] == "parameters value error"
    baidu.config(check_name_suffix=False)
    assert submit(baidu, token, name="card.pdf")["error_code"] == 0


# --- get_result ----------------------------------------------------------------------------


@pytest.mark.parametrize("location_shape", ["object", "list"])
@pytest.mark.parametrize("combo_leaf_shape", ["object", "list"])
def test_locations_and_combo_leaves(baidu: EmulatorControl, token: str, location_shape: str, combo_leaf_shape: str) -> None:
    """The example nests objects (lines 186-190, 295-300); the table types both as []dict (150, 155, 157)."""
    task_id = submit(baidu, token)["task_result"]["task_id"]
    wait_finished(baidu, token, task_id)
    settings = {"location_shape": location_shape, "combo_leaf_shape": combo_leaf_shape}
    baidu.config(**{key: value for key, value in settings.items() if value != "object"})  # "object" is the default
    [page] = result(baidu, token, task_id)["words_result"]
    single, combo = page["kv_result"]["single_key"], page["kv_result"]["combo_key"]

    def location(words: dict[str, Any]) -> dict[str, Any]:
        if location_shape == "list":
            assert isinstance(words["location"], list) and len(words["location"]) == 1
            return words["location"][0]
        assert isinstance(words["location"], dict)
        return words["location"]

    [name] = single["Name"]
    assert name["words"] == "Alice" and set(location(name)) == {"box", "cbox"}
    assert len(location(name)["box"]) == 4 and len(location(name)["cbox"]) == 4  # [4][2]int, [4]int
    [row] = combo["items"]
    assert set(row) == {"Item", "Qty"}
    leaf = row["Item"]
    if combo_leaf_shape == "list":
        assert isinstance(leaf, list) and len(leaf) == 1
        leaf = leaf[0]
    assert leaf["words"] == "Tea" and set(location(leaf)) == {"box", "cbox"}


def test_times_are_text_as_in_the_examples_and_int_as_in_the_table(baidu: EmulatorControl, token: str) -> None:
    """Lines 171-173 and 427-429 send "2025-03-17 15:37:55" (finished "" while running); 135-137 type them int."""
    baidu.config(processing_min=2.0, processing_max=2.0)
    before = int(time.time())
    task_id = submit(baidu, token)["task_result"]["task_id"]

    running = result(baidu, token, task_id)
    info = running["task_result"]
    assert info["status"] == "Running" and running["words_result"] is None and "words_result_num" not in running
    assert set(info) == {"task_id", "status", "reason", "created", "started", "finished", "duration"}  # lines 423-431
    assert CLOCK_TEXT.fullmatch(info["created"]) and CLOCK_TEXT.fullmatch(info["started"]) and info["finished"] == ""
    baidu.config(time_format="int")
    info = result(baidu, token, task_id)["task_result"]
    assert info["status"] == "Running" and info["finished"] == 0
    assert isinstance(info["created"], int) and before <= info["created"] <= time.time()

    done = wait_finished(baidu, token, task_id)
    info = done["task_result"]
    assert set(done) == {"error_code", "error_msg", "log_id", "task_result", "words_result_num", "words_result"}
    assert set(info) == {"task_id", "status", "created", "started", "finished", "duration"}  # lines 168-175
    assert isinstance(info["finished"], int) and info["finished"] - info["created"] == info["duration"] == 2
    baidu.config(time_format="text")
    assert CLOCK_TEXT.fullmatch(result(baidu, token, task_id)["task_result"]["finished"])


def test_status_words_follow_the_seed_unless_configured(baidu: EmulatorControl, token: str) -> None:
    """Line 134 lists Success/Running/Failed; a test may make the service answer words it does not list."""
    task_id = submit(baidu, token)["task_result"]["task_id"]
    assert result(baidu, token, task_id)["task_result"]["status"] == "Running"
    assert wait_finished(baidu, token, task_id)["task_result"]["status"] == "Success"

    baidu.config(running_status="Queued", success_status="Succeeded", failed_status="Error")
    task_id = submit(baidu, token)["task_result"]["task_id"]
    assert result(baidu, token, task_id)["task_result"]["status"] == "Queued"
    done = wait_finished(baidu, token, task_id, running="Queued")
    assert done["task_result"]["status"] == "Succeeded" and done["words_result_num"] == 1

    baidu.config(failure_rate=1.0)
    task_id = submit(baidu, token)["task_result"]["task_id"]
    failed = wait_finished(baidu, token, task_id, running="Queued")
    assert failed["task_result"]["status"] == "Error" and failed["task_result"]["reason"]
    assert failed["words_result"] is None


# --- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("answer_key", ["task_result", "result"])
def test_a_malformed_accept_is_cut_off_after_the_task_id(baidu: EmulatorControl, token: str, answer_key: str) -> None:
    baidu.config(submit_answer_key=answer_key, faults={"malformed_accept_rate": 1.0})
    created_before = baidu.stats()["tasks"]["created"]
    response = post(baidu, SUBMIT, token, submit_form())

    assert response.status_code == 200
    text = response.text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    cut = re.fullmatch(r'\{"error_code": ?0, ?"error_msg": ?"", ?"log_id": ?"\d+", ?"%s": ?\{"task_id": ?"(task-[a-z0-9]+)"' % answer_key, text)
    assert cut is not None, text
    task_id = cut.group(1)

    # The task is real: it runs to its result and was counted as accepted.
    baidu.config(faults={"malformed_accept_rate": 0.0})
    assert wait_finished(baidu, token, task_id)["task_result"]["status"] == "Success"
    stats = baidu.stats()
    assert stats["endpoints"]["submit"]["accepted"] == 1 and stats["endpoints"]["submit"]["faults_injected"] == 1
    assert stats["tasks"]["created"] == created_before + 1


def test_a_dropped_request_gets_no_answer_and_creates_no_task(baidu: EmulatorControl, token: str) -> None:
    """The connection is closed with nothing sent: a transport error, not a status, and no task."""
    created_before = baidu.stats()["tasks"]["created"]
    baidu.config(faults={"drop_rate": 1.0})
    url = f"{baidu.base_url}{SUBMIT}"
    with pytest.raises(httpx.TransportError):
        httpx.post(url, params={"access_token": token}, data=submit_form(), timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{baidu.base_url}/oauth/2.0/token", params={"grant_type": "client_credentials"}, timeout=10)

    stats = baidu.stats()
    assert stats["tasks"]["created"] == created_before and stats["documents"]["submitted"] == 0
    submit_stats, token_stats = stats["endpoints"]["submit"], stats["endpoints"]["token"]
    assert (submit_stats["requests"], submit_stats["accepted"], submit_stats["faults_injected"]) == (1, 0, 1)
    assert (token_stats["requests"], token_stats["accepted"], token_stats["faults_injected"]) == (2, 1, 1)  # 1: the fixture's
    baidu.config(faults={"drop_rate": 0.0})
    assert submit(baidu, token)["error_code"] == 0  # the emulator lives on; only that connection was cut


def test_a_spurious_limit_answers_error_18_within_the_limit(baidu: EmulatorControl, token: str) -> None:
    created_before = baidu.stats()["tasks"]["created"]
    baidu.config(faults={"spurious_limit_rate": 1.0})
    answer = submit(baidu, token)
    assert answer["error_code"] == 18 and answer["error_msg"] == "Open api qps request limit reached"
    stats = baidu.stats()
    ends = stats["endpoints"]["submit"]
    assert (ends["faults_injected"], ends["limit_violations"], ends["accepted"]) == (1, 0, 0)  # QPS here is 1000
    assert stats["tasks"]["created"] == created_before


def test_tokens_expire_every_period(baidu: EmulatorControl) -> None:
    baidu.config(faults={"token_expiry_every": 1.0})
    oauth = {"grant_type": "client_credentials", "client_id": API_KEY, "client_secret": SECRET_KEY}

    def fresh_token() -> str:
        return requests.post(f"{baidu.base_url}/oauth/2.0/token", params=oauth, timeout=10).json()["access_token"]

    def code(token: str) -> int:
        return result(baidu, token, "task-unknown")["error_code"]

    old = fresh_token()
    assert code(old) == 283016  # good: the task is what is unknown
    wait_until(lambda: code(old) in (110, 111), 3, "the token's expiry")
    assert code(old) == 111 and code(fresh_token()) == 283016


def test_documents_count_accepted_submits_by_content(baidu: EmulatorControl, token: str) -> None:
    other = base64.b64encode(card_png(["Name: Bob"])).decode()
    for form in (submit_form(), submit_form(), submit_form(image=other)):
        assert post(baidu, SUBMIT, token, form).json()["error_code"] == 0
    assert submit(baidu, token, name="card.pdf")["error_code"] == 283016  # refused: not counted
    assert baidu.stats()["documents"] == {"submitted": 3, "distinct": 2, "repeated": 1, "max_per_document": 2}
    baidu.post("/_emulator/reset")
    assert baidu.stats()["documents"] == {"submitted": 0, "distinct": 0, "repeated": 0, "max_per_document": 0}


def test_a_slow_answer_is_still_processed_after_the_client_gave_up(baidu: EmulatorControl, token: str) -> None:
    created_before = baidu.stats()["tasks"]["created"]
    baidu.config(faults={"slow_rate": 1.0, "slow_seconds": 1.0})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{baidu.base_url}{SUBMIT}", params={"access_token": token}, data=submit_form(), timeout=0.3)
    wait_until(lambda: baidu.stats()["tasks"]["created"] == created_before + 1, 5, "the slow submit's task")
    ends = baidu.stats()["endpoints"]["submit"]
    assert ends["accepted"] == 1 and ends["faults_injected"] == 1


def test_a_request_over_the_limit_is_recorded_with_the_doubt_of_every_stamp_in_its_window(baidu: EmulatorControl, token: str) -> None:
    """The referee's record of a violation says how far each stamp of the window it closed may trail
    its arrival: the lateness of the window's first stamp shortens the window as much as the last's."""
    baidu.config(submit_qps=2.0)
    with ThreadPoolExecutor(3) as pool:  # together: three in a second whatever the load of the machine
        answers = sorted(pool.map(lambda _: submit(baidu, token)["error_code"], range(3)))
    assert answers == [0, 0, 18]
    ends = baidu.stats()["endpoints"]["submit"]
    assert ends["limit_violations"] == 1
    (record,) = ends["violations"]
    assert len(record["window"]) == 2
    assert 0.0 <= record["stamp_doubt_ms"] <= record["window_stamp_doubt_max_ms"] <= record["loop_lag_max_ms"] + 5


def test_a_request_is_stamped_when_its_first_bytes_are_read_not_when_its_route_runs(baidu: EmulatorControl, token: str) -> None:
    """The referee counts a limit by the wire's clock (emulators.wire): stamped in its route, a
    request carried the server's own delays, and on a loaded box they were bursts the client never sent."""
    body = urlencode(submit_form()).encode()
    head = (
        f"POST {SUBMIT}?access_token={token} HTTP/1.1\r\nHost: emulator\r\nConnection: close\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = baidu.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        first_sent = time.time()
        conn.sendall(head[:10])
        time.sleep(0.5)  # a slow client: its route can only run once the rest is here
        rest_sent = time.time()
        conn.sendall(head[10:] + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"error_code":0' in answer.replace(b" ", b""), answer[:300]
    ends = baidu.stats()["endpoints"]["submit"]
    assert ends["accepted"] == 1
    assert first_sent <= ends["first_at"] < rest_sent
    assert ends["route_lag_max_ms"] >= 1000 * (rest_sent - ends["first_at"]) - 0.1  # the route ran after the rest came


def test_the_limit_checks_every_window_a_stamp_that_reached_its_route_late_falls_in() -> None:
    """Stamps taken off the wire reach the limit a little out of order (two connections, two routes)."""
    window = SlidingWindowLimit()
    assert window.allow("k", 2, now=10.0)
    assert window.allow("k", 2, now=11.5)
    assert window.allow("k", 2, now=10.6)  # arrived between them: (9.6, 10.6] and (10.5, 11.5] hold two each
    assert not window.allow("k", 2, now=10.3)  # (9.3, 10.3] would hold two, (9.65, 10.65] three
    assert not window.allow("k", 2, now=11.55)  # after the newest: (10.55, 11.55] would hold three
    assert window.allow("k", 2, now=11.7)  # (10.7, 11.7] holds 11.5 and itself


def test_the_most_arrivals_in_a_second_counts_stamps_that_reached_their_route_late():
    stats = EndpointStats()
    for stamp in [0.0003, 0.0004, 0.5, 1.0011, 0.9999]:  # the last stamped before the one ahead of it
        stats.arrived(stamp)
    assert stats.max_in_1s == 4 == max_in_window(stats.arrivals)  # the second up to 0.9999 holds four
