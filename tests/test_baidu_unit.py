"""Unit tests of the baidu provider's pure parts: error mapping, wire models, normalization, size rules."""

from __future__ import annotations

import time

import base64
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import quote_plus, urlencode

import httpx
import pytest

from pipeline import sniff
from pipeline.config import Settings
from pipeline.errors import AuthExpired, Permanent, RateLimited, Transient
from pipeline.limits import RateLimiter
from pipeline.models import DocumentInfo, Job
from pipeline.providers import baidu
from pipeline.runtime import Runtime
from tests.conftest import RecordedSubmission
from tests.seeds import BAIDU_SEED, json_between, seed_text


@pytest.mark.parametrize(
    ("code", "kind", "our_code"),
    [
        (18, RateLimited, "rate_limited"),
        (4, RateLimited, "rate_limited"),
        (17, RateLimited, "quota_exceeded"),
        (110, AuthExpired, "auth_expired"),
        (111, AuthExpired, "auth_expired"),
        (282000, Transient, "provider_transient"),
        (216200, Permanent, "provider_rejected"),
        (216201, Permanent, "provider_rejected"),
        (216202, Permanent, "provider_rejected"),
        (282003, Permanent, "provider_rejected"),
        (283016, Permanent, "provider_rejected"),
        (999999, Permanent, "provider_rejected"),
    ],
)
def test_each_documented_error_code_maps_to_its_kind(code, kind, our_code):
    error = baidu.error_for(code, "message from baidu", "submit")
    assert type(error) is kind
    assert error.code == our_code
    assert error.provider_code == code
    assert str(code) in str(error)


def test_quota_errors_wait_much_longer_than_qps_errors():
    assert baidu.error_for(17, "", "submit").retry_after > 60 * baidu.error_for(18, "", "submit").retry_after


def test_seed_success_example_parses_and_normalizes():
    text = seed_text(BAIDU_SEED)
    body = json_between(text, "识别成功示例", "任务运行中示例:")
    parsed = baidu.GetResultResponse.model_validate(body)
    assert parsed.task_result.status == "Success"
    job = Job(
        job_id="j1",
        provider="baidu",
        source="s3://b/k.pdf",
        location="s3://b/k.pdf",
        provider_task_id=parsed.task_result.task_id,
        document=DocumentInfo(bucket="b", key="k.pdf", filename="k.pdf", size=1, format="pdf"),
    )
    result = baidu.normalize(job, parsed)
    assert result.field("开票日期") == "2019年08月28日"
    assert [f.value for f in result.fields if f.name == "发票号码"] == ["3321192130", "No 07285251"]
    goods = [f for f in result.fields if f.group == "货物或应税劳务、服务信息"]
    assert len(goods) == 8 and {f.row for f in goods} == {0}
    assert next(f.value for f in goods if f.name == "数量") == "1"


def test_seed_running_example_and_both_task_id_spellings_parse():
    text = seed_text(BAIDU_SEED)
    running = json_between(text, "任务运行中示例:", "预置模型清单")
    assert baidu.GetResultResponse.model_validate(running).task_result.status == "Running"
    submitted = json_between(text, "成功返回示例", "失败返回示例")
    assert baidu.SubmitResponse.model_validate(submitted).task_id == "task-2m8g3dhqmrv9cxfe"
    assert baidu.SubmitResponse.model_validate({"error_code": 0, "result": {"task_id": "task-x"}}).task_id == "task-x"


@pytest.mark.parametrize("size", [0, 1, 2, 3, 1000, 65537, 300_001])
def test_urlencoded_base64_size_matches_the_real_encoding(size):
    data = os.urandom(size)
    expected = len(quote_plus(base64.b64encode(data).decode()))
    chunks = [data[i : i + 4099] for i in range(0, len(data), 4099)] or [b""]
    assert sniff.urlencoded_base64_size(chunks) == expected


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"%PDF-1.7\n", "pdf"),
        (b"\x89PNG\r\n\x1a\n....", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"BM" + b"\x00" * 30, "bmp"),
        (b"PK\x03\x04" + b"\x00" * 26 + b"OFD.xml", "ofd"),
        (b"PK\x03\x04" + b"\x00" * 26 + b"word/document.xml", "docx"),
        (b"PK\x03\x04" + b"\x00" * 26 + b"something.bin", None),
        (b"hello", "txt"),
        (b"<!DOCTYPE html><html>", "html"),
        (b"\x00\x01\x02garbage", None),
        (b"", None),
    ],
)
def test_format_is_sniffed_from_bytes(head, fmt):
    assert sniff.sniff_format(head) == fmt


def test_transport_failures_become_transient_without_the_url_or_token():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    from pipeline.config import Settings
    from pipeline.limits import RateLimiter
    from pipeline.runtime import Runtime

    class NoLimit(RateLimiter):
        def __init__(self):
            pass

        def acquire(self, key, rate, *, max_wait, alone=False, before_send=None, turn=None):
            if before_send is not None:
                before_send()
            return time.time()

        def late_by(self, granted):
            return 0.0

    settings = Settings(baidu_api_key="AK-SECRET", baidu_secret_key="SK-SECRET", baidu_base_url="http://baidu.invalid")
    runtime = Runtime(settings=settings, redis=None, limiter=NoLimit(), leases=None, ledger=None, processing=None, http_client=httpx.Client(transport=httpx.MockTransport(refuse)))
    provider = baidu.BaiduProvider.__new__(baidu.BaiduProvider)
    provider.rt, provider.settings = runtime, settings
    request = runtime.http.build_request("POST", "http://baidu.invalid/x", params={"access_token": "TOKEN-SECRET"})
    with pytest.raises(Transient) as caught:
        provider.send("submit", request)
    for secret in ("TOKEN-SECRET", "AK-SECRET", "SK-SECRET", "baidu.invalid"):
        assert secret not in str(caught.value)


class _Token:
    def get(self) -> str:
        return "TOKEN"

    def invalidate(self, stale: str) -> str:
        return "TOKEN-2"


def _provider(handler) -> baidu.BaiduProvider:
    from pipeline.config import Settings
    from pipeline.runtime import Runtime

    settings = Settings(baidu_api_key="AK", baidu_secret_key="SK", baidu_base_url="http://baidu.invalid", global_limits=False)
    runtime = Runtime(settings=settings, redis=None, limiter=None, leases=None, ledger=None, processing=None, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    provider = baidu.BaiduProvider.__new__(baidu.BaiduProvider)
    provider.rt, provider.settings, provider._base, provider._credential = runtime, settings, settings.baidu_base_url, _Token()
    return provider


def _job(fmt: str = "png") -> Job:
    return Job(
        job_id="j1",
        provider="baidu",
        source="s3://b/k",
        location="s3://b/k",
        provider_task_id="task-1",
        document=DocumentInfo(bucket="b", key="card.png", filename="card.png", size=4, format=fmt),
    )


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('{"error_code":0,"error_msg":"","log_id":"1","task_result":{"task_id":"task-a"}}', "task-a"),
        ('{"error_code":0,"result":{"task_id":"task-b"}}', "task-b"),
        ('{"error_code":0,"error_msg":"","log_id":"1","task_result":{"task_id":"task-c"', "task-c"),  # cut short
        ('{"error_code":283016,"error_msg":"parameters value error","log_id":"2","data":null}', None),
        ('{"error_code":0,"log_id":"3"}', None),
        ("<html>502 Bad Gateway</html>", None),
    ],
)
def test_the_task_id_is_read_from_the_raw_submit_answer(text, found):
    assert baidu.accepted_task_id(text) == found


def test_submit_sends_both_spellings_of_the_file_name_and_reports_the_acceptance_first(monkeypatch):
    # Bytes whose base64 holds "+", "/" and "=", read in chunks that are not multiples of 3.
    content = b"\x89PNG" + b"\xfb\xff\xbf" * 1000 + b"\xfe"
    monkeypatch.setattr(baidu.storage, "iter_object", lambda bucket, key, chunk_size=0, etag=None: iter([content[:7], content[7:2000], content[2000:]]))
    forms: list[httpx.Request] = []

    def cut_short(request: httpx.Request) -> httpx.Response:
        request.read()
        forms.append(request)
        return httpx.Response(200, text='{"error_code":0,"error_msg":"","log_id":"9","task_result":{"task_id":"task-z"')

    accepted = RecordedSubmission()
    with pytest.raises(Transient):
        _provider(cut_short).submit(_job(), accepted)
    assert accepted.accepted_ids == ["task-z"]
    # Streamed, the form is byte for byte what a form built whole would be (the settings' template
    # and classifier follow), with its length.
    whole = urlencode({"image": base64.b64encode(content).decode(), "fileName": "card.png", "file_name": "card.png"}).encode()
    assert forms[0].content.startswith(whole + b"&templateSign=") or forms[0].content == whole
    assert forms[0].headers["content-length"] == str(len(forms[0].content))
    assert b"fileName=card.png" in forms[0].content and b"file_name=card.png" in forms[0].content


def test_a_status_the_seed_does_not_list_keeps_polling_and_is_named():
    body = {"error_code": 0, "log_id": 1, "task_result": {"task_id": "task-1", "status": "Queued", "created": 1742197075}}
    outcome = _provider(lambda request: httpx.Response(200, json=body)).poll(_job())
    assert outcome.done is False and outcome.status == "Queued" and "Queued" in outcome.detail


def test_combo_leaves_and_locations_as_lists_as_the_table_reads_them():
    leaf = [{"words": "2.30", "location": [{"box": [[1, 2], [3, 2], [3, 4], [1, 4]], "cbox": [1, 2, 2, 2]}]}]
    body = {
        "error_code": 0,
        "task_result": {"task_id": "task-1", "status": "Success"},
        "words_result": [{"page_num": 1, "kv_result": {"single_key": {}, "combo_key": {"rows": [{"单价": leaf}]}}}],
    }
    result = baidu.normalize(_job(), baidu.GetResultResponse.model_validate(body))
    (field,) = result.fields
    assert (field.name, field.value, field.group, field.row, field.box) == ("单价", "2.30", "rows", 0, leaf[0]["location"][0]["box"])


@contextmanager
def _posts_answered(on_post: Callable[[], None]) -> Iterator[str]:
    """A plain HTTP server that answers every POST ``{}`` and calls ``on_post`` once its body is in;
    yields its base URL."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            on_post()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def _submit_through(limiter: RateLimiter, base_url: str) -> httpx.Response:
    """One submit request sent by a baidu provider whose limiter is ``limiter``."""
    settings = Settings(baidu_api_key="AK", baidu_secret_key="SK", baidu_base_url=base_url)
    runtime = Runtime(settings=settings, redis=None, limiter=limiter, leases=None, ledger=None, processing=None, http_client=httpx.Client())
    provider = baidu.BaiduProvider.__new__(baidu.BaiduProvider)
    provider.rt, provider.settings = runtime, settings
    return provider.send("submit", runtime.http.build_request("POST", f"{base_url}/x", content=b"body"))


def test_a_request_held_up_past_its_send_time_is_stopped_before_it_leaves_and_sent_on_a_new_grant():
    """A worker thread the machine holds between the grant check and its socket: the request is
    stopped right before its headers go out (httpcore's trace), a new send time is asked for,
    and the provider sees it once."""

    class LateOnce(RateLimiter):
        def __init__(self):
            self.grants, self.lateness, self._safety = 0, [0.5, 0.0], 0.97  # the first grant is met 500 ms late
            self.given_back = []

        def acquire(self, key, rate, *, max_wait, alone=False, before_send=None, turn=None):
            self.grants += 1
            return float(self.grants)

        def late_by(self, granted):
            return self.lateness[int(granted) - 1]

        def left_at(self, key, rate, granted, left):
            return False

        def give_back(self, key, granted):
            self.given_back.append(granted)

    arrivals: list[float] = []
    limiter = LateOnce()
    with _posts_answered(lambda: arrivals.append(time.time())) as base_url:
        assert _submit_through(limiter, base_url).status_code == 200
    assert limiter.grants == 2 and len(arrivals) == 1  # held back once, sent once
    assert limiter.given_back == [1.0]  # the unused grant went back to the log


def test_a_departure_is_told_to_the_limiter_as_the_headers_leave_before_the_body_and_the_answer():
    """A request that left late moves its place in the limiter's log; told only once its answer
    came (after the upload and the provider's work), the move could come after a grant a window
    later had been made from the old place, and three requests shared the provider's second."""

    class Recording(RateLimiter):
        def __init__(self):
            self._safety, self.told = 0.97, []

        def acquire(self, key, rate, *, max_wait, alone=False, before_send=None, turn=None):
            return 1.0

        def late_by(self, granted):
            return 0.0

        def left_at(self, key, rate, granted, left):
            self.told.append(left)
            return True

    limiter = Recording()
    told_when_body_came: list[list[float]] = []
    with _posts_answered(lambda: told_when_body_came.append(list(limiter.told))) as base_url:
        assert _submit_through(limiter, base_url).status_code == 200
    assert len(limiter.told) == 1  # once, and already when the provider had the body
    assert told_when_body_came == [limiter.told]


def test_a_document_the_stage_read_whole_is_measured_for_the_size_limit_without_reading_it_again(monkeypatch):
    """baidu's 10 MB is counted after base64 and url-encoding, which depends on the bytes. A small
    document the stage has read whole already (its first 64 kB) is measured from those bytes: a
    second read of it from S3 was one of the S3 requests each document cost (bench.overhead)."""
    from pipeline import storage

    content = os.urandom(3000)

    def no_second_read(*args, **kwargs):
        raise AssertionError("read from S3 again")

    monkeypatch.setattr(storage, "_get", no_second_read)
    storage.READ_WHOLE.keep("b", "scan.png", "etag-1", content)  # what the stage's read_head leaves
    document = DocumentInfo(bucket="b", key="scan.png", filename="scan.png", size=len(content), format="png", width=800, height=600, etag="etag-1")
    _provider(lambda request: httpx.Response(500)).check(document, _job())
    assert document.encoded_size == len(quote_plus(base64.b64encode(content).decode()))
    replaced = document.model_copy(update={"etag": "etag-2"})  # another version of the key is read from S3
    with pytest.raises(AssertionError, match="read from S3 again"):
        _provider(lambda request: httpx.Response(500)).check(replaced, _job())
