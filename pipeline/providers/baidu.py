"""Baidu iOCR universal recognition (seed 002): OAuth token, form submit, get_result polling.

The wire models are the client's reading of the seed (the emulator has its own). Where the
seed contradicts itself the client takes both forms: it sends the file name as ``fileName``
(the working example) and ``file_name`` (the table), reads the task id from ``task_result``
(example) or ``result`` (table), and combo leaves and locations as objects or lists.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import sniff, storage
from pipeline.credentials import SharedCredential
from pipeline.errors import AuthExpired, BadInput, Permanent, RateLimited, Transient
from pipeline.limits import Rate
from pipeline.models import DocumentInfo, ExtractedField, Job, NormalizedResult
from pipeline.providers.base import Fetched, PollOutcome, Provider, json_object
from pipeline.runtime import Runtime

if TYPE_CHECKING:
    from pipeline.submission import Submission

TOKEN_PATH = "/oauth/2.0/token"
SUBMIT_PATH = "/rest/2.0/solution/v1/iocr/recognise/universal/request"
RESULT_PATH = "/rest/2.0/solution/v1/iocr/recognise/universal/get_result"

MAX_ENCODED_BYTES = 10 * 1024 * 1024  # "base64编码和urlencode后大小不超过10M"
MIN_SIDE, MAX_SIDE = 15, 8192
SUPPORTED_FORMATS = {"jpeg", "png", "bmp", "pdf", "ofd"}
FILE_FIELD = {"jpeg": "image", "png": "image", "bmp": "image", "pdf": "pdf_file", "ofd": "ofd_file"}

# error_code -> (kind, meaning). Public Baidu AI error codes plus the seed's own.
ERROR_CODES: dict[int, tuple[str, str]] = {
    1: ("transient", "Unknown error"),
    2: ("transient", "Service temporarily unavailable"),
    3: ("permanent", "Unsupported openapi method"),
    4: ("rate_limited", "Open api request limit reached"),
    6: ("permanent", "No permission to access data"),
    14: ("permanent", "IAM Certification failed"),  # the account lacks the permission: a new token cannot help
    17: ("quota", "Open api daily request limit reached"),
    18: ("rate_limited", "Open api qps request limit reached"),
    19: ("quota", "Open api total request limit reached"),
    100: ("permanent", "Invalid parameter"),
    110: ("auth", "Access token invalid or no longer valid"),
    111: ("auth", "Access token expired"),
    216200: ("permanent", "empty image"),
    216201: ("permanent", "image format error"),
    216202: ("permanent", "image size error"),
    282000: ("transient", "internal error"),
    282003: ("permanent", "missing parameters"),
    283016: ("permanent", "parameters value error"),
}


# --- wire models ---------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TokenResponse(_Wire):
    access_token: str
    expires_in: int
    refresh_token: str | None = None
    scope: str | None = None
    session_key: str | None = None
    session_secret: str | None = None


class TokenError(_Wire):
    error: str
    error_description: str


class ErrorResponse(_Wire):
    log_id: str | int | None = None
    error_code: int
    error_msg: str | None = ""
    error_explain: str | None = None
    data: Any = None


class TaskRef(_Wire):
    task_id: str


class SubmitResponse(_Wire):
    error_code: int = 0
    error_msg: str | None = ""
    log_id: str | int | None = None
    result: TaskRef | None = None
    task_result: TaskRef | None = None

    @property
    def task_id(self) -> str | None:
        ref = self.task_result or self.result
        return ref.task_id if ref else None


class Location(_Wire):
    box: list[list[float]] | None = None
    cbox: list[float] | None = None


class Words(_Wire):
    """One value. ``location`` is an object in the seed's example and ``[]dict`` in its table: both are read."""

    words: str | None = ""
    location: Location | list[Location] | None = None

    def first_box(self) -> list[list[float]] | None:
        loc = self.location[0] if isinstance(self.location, list) and self.location else self.location
        return loc.box if isinstance(loc, Location) else None


class KvResult(_Wire):
    single_key: dict[str, list[Words]] | None = None
    # Each combo row maps a leaf name to one value in the seed's example, to ``[]dict`` in its table.
    combo_key: dict[str, list[dict[str, Words | list[Words]]]] | None = None
    full_result: Any = None
    other_result: Any = None


class WordsResult(_Wire):
    page_num: int | None = None
    doc_type: str | None = None
    doc_location: Location | list[Location] | None = None
    kv_result: KvResult | None = None


class TaskResult(_Wire):
    task_id: str | None = None
    # Running, Success or Failed by the seed; any other value is kept as the provider sent it.
    status: str
    reason: str | None = None
    # The table types them int, the example sends "2025-03-17 15:37:55" (and "" while running).
    created: str | int | None = None
    started: str | int | None = None
    finished: str | int | None = None
    duration: int | float | None = None


class GetResultResponse(_Wire):
    error_code: int = 0
    error_msg: str | None = ""
    log_id: str | int | None = None
    task_result: TaskResult
    words_result_num: int | None = None
    words_result: list[WordsResult] | None = None


# --- reading answers -----------------------------------------------------------------------

STATUSES = ("Running", "Success", "Failed")  # task_result.status, seed line 134
AUTH_CODES = frozenset(code for code, (kind, _) in ERROR_CODES.items() if kind == "auth")
_TASK_ID_IN_TEXT = re.compile(r'"task_id"\s*:\s*"([^"\\]+)"')


def _error_code_of(body: dict[str, Any]) -> int:
    try:
        return int(body.get("error_code") or 0)
    except (TypeError, ValueError):
        raise Transient(f"baidu: error_code {body.get('error_code')!r} is not a number", code="malformed_answer") from None


def _error_code(response: httpx.Response) -> int | None:
    """The answer's error_code, or None when the answer is not the documented JSON."""
    try:
        return _error_code_of(json_object(response, "baidu"))
    except Transient:
        return None


def accepted_task_id(text: str) -> str | None:
    """The task id a submit answer names, read from the raw text before anything is validated.

    An answer that parses and says error_code != 0 accepted nothing. One that does not parse
    at all (cut short, not JSON) is searched for a task id: if the provider named one, it has
    the task, and that must be remembered before the broken answer fails the document.
    """
    try:
        body = json.loads(text)
    except ValueError:
        found = _TASK_ID_IN_TEXT.search(text)
        return found.group(1) if found else None
    if not isinstance(body, dict):
        return None
    try:
        if int(body.get("error_code") or 0) != 0:
            return None
    except (TypeError, ValueError):
        pass
    for key in ("task_result", "result"):  # the example's spelling, then the table's
        ref = body.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("task_id"), str) and ref["task_id"]:
            return ref["task_id"]
    return None


# --- error mapping -------------------------------------------------------------------------


def error_for(code: int, message: str, endpoint: str) -> Exception:
    """The docpipe error class for a Baidu ``error_code``."""
    kind, meaning = ERROR_CODES.get(code, ("permanent", "unknown error code"))
    text = f"baidu {endpoint}: error_code {code} ({message or meaning})"
    common = {"provider_code": code, "provider_message": message or meaning}
    if kind == "rate_limited":
        return RateLimited(text, retry_after=1.0, **common)
    if kind == "quota":
        return RateLimited(text, retry_after=600.0, code="quota_exceeded", **common)
    if kind == "auth":
        return AuthExpired(text, code="auth_expired", **common)
    if kind == "transient":
        return Transient(text, code="provider_transient", **common)
    return Permanent(text, code="provider_rejected", **common)


# --- the provider --------------------------------------------------------------------------


class BaiduProvider(Provider):
    name: ClassVar[str] = "baidu"
    limits: ClassVar[dict[str, Rate]] = {
        "token": Rate(1, per=1.0),
        "submit": Rate(2, per=1.0),
        "get_result": Rate(10, per=1.0),
    }
    first_poll_delay: ClassVar[float] = 30.0  # "建议提交请求后30秒开始轮询"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._base = self.settings.baidu_base_url.rstrip("/")
        self._credential = SharedCredential(runtime.redis, f"baidu:{self.account()}", self._fetch_token)

    def account(self) -> str:
        key = self.settings.baidu_api_key.get_secret_value()
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    # -- token ------------------------------------------------------------------------------

    def _fetch_token(self) -> tuple[str, float]:
        request = self.rt.http.build_request(
            "POST",
            self._base + TOKEN_PATH,
            params={
                "grant_type": "client_credentials",
                "client_id": self.settings.baidu_api_key.get_secret_value(),
                "client_secret": self.settings.baidu_secret_key.get_secret_value(),
            },
        )
        response = self.send("token", request)
        if response.status_code == 401 or response.status_code == 400:
            err = TokenError.model_validate(response.json())
            raise Permanent(
                f"baidu token: {err.error} ({err.error_description}); check DOCPIPE_BAIDU_API_KEY/SECRET_KEY",
                code="auth_failed",
                provider_code=err.error,
                provider_message=err.error_description,
            )
        try:
            token = TokenResponse.model_validate(response.json())
        except (ValueError, ValidationError):  # never the pydantic text: it would quote the token
            raise Transient("baidu token: answer without access_token/expires_in", code="malformed_answer") from None
        return token.access_token, float(token.expires_in)

    # -- one authenticated call -------------------------------------------------------------

    def _send_form(
        self,
        endpoint: str,
        path: str,
        form: dict[str, str],
        *,
        max_wait: float | None = None,
        alone: bool = False,
        submission: Submission | None = None,
        body: Callable[[], tuple[Iterator[bytes], int]] | None = None,
    ) -> httpx.Response:
        """POST a form with the shared token; on 110/111 refresh once (single flight) and resend.

        ``body`` streams an already encoded form instead (its chunks and their total length),
        made anew for each attempt: a stream is sent once."""
        token = self._credential.get()
        for attempt in (1, 2):
            params = {"access_token": token}
            if body is None:
                request = self.rt.http.build_request("POST", self._base + path, params=params, data=form)
            else:
                chunks, length = body()
                headers = {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(length)}
                request = self.rt.http.build_request("POST", self._base + path, params=params, content=chunks, headers=headers)
            response = self.send(endpoint, request, max_wait=max_wait, alone=alone, submission=submission)
            if attempt == 1 and _error_code(response) in AUTH_CODES:
                token = self._credential.invalidate(token)
                continue
            return response
        raise AssertionError("unreachable")

    def _call(self, endpoint: str, path: str, form: dict[str, str], **kwargs: Any) -> dict[str, Any]:
        """The answer's JSON object; a Baidu error code raised as its docpipe error."""
        body = json_object(self._send_form(endpoint, path, form, **kwargs), f"baidu {endpoint}")
        code = _error_code_of(body)
        if code:
            raise error_for(code, str(body.get("error_msg") or ""), endpoint)
        return body

    # -- the verbs --------------------------------------------------------------------------

    def check(self, document: DocumentInfo, job: Job) -> None:
        if document.format not in SUPPORTED_FORMATS:
            raise BadInput(
                f"{job.label()}: format {document.format!r} is not accepted by baidu (jpg, png, bmp, pdf, ofd)",
                code="unsupported_format",
            )
        if document.width is not None and document.height is not None:
            short, long = sorted((document.width, document.height))
            if short < MIN_SIDE or long > MAX_SIDE:
                raise BadInput(
                    f"{job.label()}: image is {document.width}x{document.height}px; baidu needs sides of "
                    f"{MIN_SIDE}..{MAX_SIDE}px",
                    code="bad_dimensions",
                )
        # base64 grows by 4/3 before url-encoding adds more: skip the exact count when that alone is over.
        if document.size * 4 / 3 > MAX_ENCODED_BYTES:
            encoded = None
        else:
            # A document the stage read whole is measured from memory (storage.READ_WHOLE), not read again.
            encoded = sniff.urlencoded_base64_size(storage.iter_object(document.bucket, document.key, etag=document.etag))
        document.encoded_size = encoded  # the streamed submit's Content-Length: not measured twice
        if encoded is None or encoded > MAX_ENCODED_BYTES:
            shown = f"{encoded} bytes" if encoded else f"about {int(document.size * 4 / 3)} bytes"
            raise BadInput(
                f"{job.label()}: {document.size} bytes is {shown} after base64+urlencode; baidu accepts at most "
                f"{MAX_ENCODED_BYTES} (10 MB)",
                code="too_large",
            )

    def submit(self, job: Job, submission: Submission) -> str:
        doc = job.document
        assert doc is not None
        stem = doc.filename.rsplit(".", 1)[0] or "document"
        name = f"{stem}.{sniff.FORMAT_EXTENSIONS[doc.format]}"
        # The table names the field file_name, the working example sends fileName: send both.
        form = {"fileName": name, "file_name": name}
        template = job.options.get("template_sign", self.settings.baidu_template_sign)
        classifier = job.options.get("classifier_id", self.settings.baidu_classifier_id)
        if template:
            form["templateSign"] = template
        if classifier:
            form["classifierId"] = classifier
        # The document's field first, as before, then the rest: base64 and url-encoded as it
        # streams from S3, so a 10 MB document is never held whole (nor its 14 MB encoding).
        head, tail = f"{FILE_FIELD[doc.format]}=".encode(), ("&" + urlencode(form)).encode()
        encoded = doc.encoded_size
        if encoded is None:  # staged before the size was kept: measured now, one more read
            encoded = sniff.urlencoded_base64_size(storage.iter_object(doc.bucket, doc.key, etag=doc.etag))

        def body() -> tuple[Iterator[bytes], int]:
            def chunks() -> Iterator[bytes]:
                yield head
                yield from storage.request_body(sniff.urlencoded_base64(storage.iter_object(doc.bucket, doc.key, etag=doc.etag)))
                yield tail

            return chunks(), len(head) + encoded + len(tail)

        response = self._send_form("submit", SUBMIT_PATH, {}, body=body, submission=submission)
        task_id = accepted_task_id(response.text)
        if task_id is not None:
            submission.accepted(task_id)
        body = json_object(response, "baidu submit")
        code = _error_code_of(body)
        if code:
            raise error_for(code, str(body.get("error_msg") or ""), "submit")
        parsed = SubmitResponse.model_validate(body)
        if not parsed.task_id:
            # error_code 0 without a task id: the task may exist, so sending again could bill it twice.
            raise Permanent("baidu submit: success answer without a task_id; not sending again", code="malformed_answer")
        return parsed.task_id

    def _get_result(
        self, job: Job, *, max_wait: float | None = None, alone: bool = False
    ) -> tuple[GetResultResponse, dict[str, Any]]:
        form = {"task_id": job.provider_task_id or ""}
        body = self._call("get_result", RESULT_PATH, form, max_wait=max_wait, alone=alone)
        return GetResultResponse.model_validate(body), body

    def poll(self, job: Job) -> PollOutcome:
        parsed, body = self._get_result(job, max_wait=self.settings.poll_inline_wait, alone=True)
        status = parsed.task_result.status
        if status == "Success":
            return PollOutcome(done=True, status=status, reported=_reported(parsed.task_result), answer=body)
        if status == "Failed":
            reason = parsed.task_result.reason or "no reason given"
            return PollOutcome(
                done=True,
                status=status,
                error=Permanent(
                    f"baidu task failed: {reason}", code="provider_failed", provider_code=status, provider_message=reason
                ),
            )
        # Running, or a status the seed does not list: the task is not done, ask again until the deadline.
        detail = status if status in STATUSES else f"{status} (not a status the seed lists)"
        return PollOutcome(done=False, status=status, detail=detail)

    def fetch(self, job: Job, answer: Any = None) -> Fetched:
        if answer is not None:
            parsed, body = GetResultResponse.model_validate(answer), answer
        else:
            parsed, body = self._get_result(job)
        if parsed.task_result.status != "Success":
            raise Transient(f"baidu get_result: status {parsed.task_result.status} after Success", code="status_regressed")
        return Fetched(result=normalize(job, parsed), raw=body)


def _reported(result: TaskResult) -> tuple[float, float] | None:
    """``duration`` is given in whole seconds (the seed's example: 7, from 15:37:55 to 15:38:02):
    the task took between one second less and one second more."""
    if isinstance(result.duration, (int, float)) and result.duration >= 0:
        return max(0.0, result.duration - 1.0), result.duration + 1.0
    return None


def normalize(job: Job, parsed: GetResultResponse) -> NormalizedResult:
    """single_key fields become one field per value; combo_key rows become grouped fields."""
    assert job.document is not None
    fields: list[ExtractedField] = []
    doc_type = None
    for item in parsed.words_result or []:
        doc_type = doc_type or item.doc_type
        kv = item.kv_result or KvResult()
        for name, values in (kv.single_key or {}).items():
            for words in values:
                fields.append(ExtractedField(name=name, value=words.words or "", page=item.page_num, box=words.first_box()))
        for group, rows in (kv.combo_key or {}).items():
            for row_index, row in enumerate(rows):
                for name, leaf in row.items():
                    for words in leaf if isinstance(leaf, list) else [leaf]:
                        fields.append(
                            ExtractedField(
                                name=name,
                                value=words.words or "",
                                page=item.page_num,
                                box=words.first_box(),
                                group=group,
                                row=row_index,
                            )
                        )
    return NormalizedResult(
        job_id=job.job_id,
        provider=job.provider,
        source=job.source,
        document=job.document,
        provider_task_id=job.provider_task_id,
        doc_type=doc_type,
        fields=fields,
    )
