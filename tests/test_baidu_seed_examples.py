"""The seed document's own example code, run against the emulator.

The client and the emulator share wire models, so a mistake in those would hide in tests
that use both. The seed's code is independent of us: it runs unchanged except for what
the seed itself says to replace (host, token, file path, task id), plus the indentation
that copying the page lost.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time

import httpx

from pipeline.devstack import DEMO_BAIDU_KEY, DEMO_BAIDU_SECRET
from pipeline.samples import make_id_card_png
from tests.seeds import BAIDU_SEED, between, seed_text

HOST = "https://aip.baidubce.com"


def restore_indentation(code: str) -> str:
    """The web copy dropped indentation: the one statement after a ``with``/``if`` line belongs to it."""
    lines, out, indent_next = code.strip().splitlines(), [], False
    for line in lines:
        out.append(("    " + line) if indent_next else line)
        indent_next = line.rstrip().endswith(":") and not line.lstrip().startswith("#")
    return "\n".join(out) + "\n"


def fetch_token(base_url: str) -> str:
    return httpx.post(
        f"{base_url}/oauth/2.0/token",
        params={"grant_type": "client_credentials", "client_id": DEMO_BAIDU_KEY, "client_secret": DEMO_BAIDU_SECRET},
    ).json()["access_token"]


def run_example(code: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return ast.literal_eval(completed.stdout.strip())


def test_seed_submit_and_get_result_examples_run_against_the_emulator(baidu, docs):
    text = seed_text(BAIDU_SEED)
    submit_code = "import base64\n" + between(text, "提示二:目前仅提供Python语言\nimport base64\n", "返回说明")
    result_code = "import requests\n" + between(text.split("iOCR 全场景识别-获取结果\n请求说明")[1], "提示二:目前仅提供Python语言\nimport requests\n", "返回说明")
    assert "requests.post" in submit_code and "requests.post" in result_code

    token = fetch_token(baidu.base_url)
    card = make_id_card_png(docs / "card.png", 7)

    submit_code = (
        restore_indentation(submit_code)
        .replace(HOST, baidu.base_url)
        .replace("[本地文件]", str(card.path))
        .replace("[调用鉴权接口获取的token]", token)
    )
    submitted = run_example(submit_code)
    assert submitted["error_code"] == 0 and submitted["error_msg"] == ""
    task_id = submitted["task_result"]["task_id"]
    assert task_id.startswith("task-")

    result_code = (
        restore_indentation(result_code)
        .replace(HOST, baidu.base_url)
        .replace("[调用鉴权接口获取的token]", token)
        .replace('"task-111"', f'"{task_id}"')
    )
    answer = run_example(result_code)
    assert answer["task_result"]["status"] in ("Running", "Success")
    assert set(answer["task_result"]) >= {"task_id", "status", "created", "started", "finished", "duration"}
    deadline = time.monotonic() + 30
    while answer["task_result"]["status"] == "Running" and time.monotonic() < deadline:
        assert answer["words_result"] is None
        time.sleep(0.5)
        answer = run_example(result_code)
    assert answer["task_result"]["status"] == "Success"
    assert answer["words_result_num"] == len(answer["words_result"]) == 1
    page = answer["words_result"][0]
    assert set(page) >= {"page_num", "doc_type", "doc_location", "kv_result"}
    single = page["kv_result"]["single_key"]
    assert single["Name"][0]["words"] == card.expected["Name"]
    assert set(single["Name"][0]["location"]) == {"box", "cbox"}
    assert len(single["Name"][0]["location"]["box"]) == 4


def test_seed_error_example_shape_for_missing_template(baidu):
    token = fetch_token(baidu.base_url)
    answer = httpx.post(
        f"{baidu.base_url}/rest/2.0/solution/v1/iocr/recognise/universal/request",
        params={"access_token": token},
        data={"image": "aGVsbG8=", "fileName": "a.png"},  # the example's spelling (line 51), the default
    ).json()
    assert answer["error_code"] == 283016
    assert answer["error_msg"] == "parameters value error"
    assert answer["error_explain"] == "classifier_id和template_sign不能同时为空"
    assert set(answer) == {"error_code", "error_msg", "error_explain", "log_id", "data"}


def test_token_endpoint_refuses_an_unknown_client_with_401(baidu):
    answer = httpx.post(
        f"{baidu.base_url}/oauth/2.0/token",
        params={"grant_type": "client_credentials", "client_id": "wrong", "client_secret": "wrong"},
    )
    assert answer.status_code == 401
    assert answer.json() == {"error": "invalid_client", "error_description": "unknown client id"}


def test_expired_token_answers_111_and_unknown_token_110(baidu):
    baidu.config(token_expires_in=1)
    token = fetch_token(baidu.base_url)
    url = f"{baidu.base_url}/rest/2.0/solution/v1/iocr/recognise/universal/get_result"
    time.sleep(1.1)
    assert httpx.post(url, params={"access_token": token}, data={"task_id": "x"}).json()["error_code"] == 111
    assert httpx.post(url, params={"access_token": "nope"}, data={"task_id": "x"}).json()["error_code"] == 110


def test_emulator_enforces_qps_with_error_18(baidu):
    token = fetch_token(baidu.base_url)
    url = f"{baidu.base_url}/rest/2.0/solution/v1/iocr/recognise/universal/get_result"
    # One client for the burst: building one per request (~50 ms of TLS set-up) spread 25
    # requests over more than a second, and the test then measured the client, not the limit.
    with httpx.Client() as client:
        codes = [client.post(url, params={"access_token": token}, data={"task_id": "x"}).json()["error_code"] for _ in range(25)]
        assert codes.count(18) >= 10
        answered = client.post(url, params={"access_token": token}, data={"task_id": "x"}).json()
    assert answered.get("error_msg") in ("Open api qps request limit reached", "parameters value error")
    assert baidu.endpoint("get_result")["limit_violations"] == codes.count(18) + (answered["error_code"] == 18)
