"""Baidu iOCR universal recognition (seed 002): OAuth token, form submit, get_result polling.

Wire models here describe the API once for both the client and the emulator; the seed's
inconsistent spellings (``file_name``/``fileName``, ``result``/``task_result``) are all accepted.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import sniff, storage
from pipeline.credentials import SharedCredential
from pipeline.errors import AuthExpired, BadInput, Permanent, RateLimited, Transient
from pipeline.limits import Rate
from pipeline.models import DocumentInfo, ExtractedField, Job, NormalizedResult
from pipeline.providers.base import Fetched, PollOutcome, Provider
from pipeline.runtime import Runtime

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
    error_msg: str = ""
    error_explain: str | None = None
    data: Any = None


class TaskRef(_Wire):
    task_id: str


class SubmitResponse(_Wire):
    error_code: int = 0
    error_msg: str = ""
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
    words: str = ""
    location: Location | list[Location] | None = None

    def first_box(self) -> list[list[float]] | None:
        loc = self.location[0] if isinstance(self.location, list) and self.location else self.location
        return loc.box if isinstance(loc, Location) else None


class KvResult(_Wire):
    single_key: dict[str, list[Words]] = Field(default_factory=dict)
    combo_key: dict[str, list[dict[str, Words]]] = Field(default_factory=dict)
    full_result: Any = None
    other_result: Any = None


class WordsResult(_Wire):
    page_num: int | None = None
    doc_type: str | None = None
    doc_location: Location | dict | None = None
    kv_result: KvResult | None = None


class TaskResult(_Wire):
    task_id: str
    status: Literal["Running", "Success", "Failed"]
    reason: str | None = ""
    created: str | int | None = None
    started: str | int | None = None
    finished: str | int | None = None
    duration: int | None = None


class GetResultResponse(_Wire):
    error_code: int = 0
    error_msg: str = ""
    log_id: str | int | None = None
    task_result: TaskResult
    words_result_num: int | None = None
    words_result: list[WordsResult] | None = None


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

    def _call(
        self, endpoint: str, path: str, form: dict[str, str], *, max_wait: float | None = None, alone: bool = False
    ) -> dict[str, Any]:
        """POST a form with the shared token; on 110/111 refresh once (single flight) and resend."""
        token = self._credential.get()
        for attempt in (1, 2):
            request = self.rt.http.build_request("POST", self._base + path, params={"access_token": token}, data=form)
            body = self.send(endpoint, request, max_wait=max_wait, alone=alone).json()
            code = int(body.get("error_code") or 0)
            if code == 0:
                return body
            error = error_for(code, str(body.get("error_msg") or ""), endpoint)
            if isinstance(error, AuthExpired) and attempt == 1:
                token = self._credential.invalidate(token)
                continue
            raise error
        raise AssertionError("unreachable")

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
            encoded = sniff.urlencoded_base64_size(storage.iter_object(document.bucket, document.key))
        if encoded is None or encoded > MAX_ENCODED_BYTES:
            shown = f"{encoded} bytes" if encoded else f"about {int(document.size * 4 / 3)} bytes"
            raise BadInput(
                f"{job.label()}: {document.size} bytes is {shown} after base64+urlencode; baidu accepts at most "
                f"{MAX_ENCODED_BYTES} (10 MB)",
                code="too_large",
            )

    def submit(self, job: Job) -> str:
        doc = job.document
        assert doc is not None
        content = storage.read_object(doc.bucket, doc.key)
        stem = doc.filename.rsplit(".", 1)[0] or "document"
        form = {
            FILE_FIELD[doc.format]: base64.b64encode(content).decode(),
            "file_name": f"{stem}.{sniff.FORMAT_EXTENSIONS[doc.format]}",
        }
        template = job.options.get("template_sign", self.settings.baidu_template_sign)
        classifier = job.options.get("classifier_id", self.settings.baidu_classifier_id)
        if template:
            form["templateSign"] = template
        if classifier:
            form["classifierId"] = classifier
        response = SubmitResponse.model_validate(self._call("submit", SUBMIT_PATH, form))
        if not response.task_id:
            raise Transient("baidu submit: answer without a task_id", code="malformed_answer")
        return response.task_id

    def _get_result(
        self, job: Job, *, max_wait: float | None = None, alone: bool = False
    ) -> tuple[GetResultResponse, dict[str, Any]]:
        form = {"task_id": job.provider_task_id or ""}
        body = self._call("get_result", RESULT_PATH, form, max_wait=max_wait, alone=alone)
        return GetResultResponse.model_validate(body), body

    def poll(self, job: Job) -> PollOutcome:
        parsed, _ = self._get_result(job, max_wait=self.settings.poll_inline_wait, alone=True)
        status = parsed.task_result.status
        if status == "Running":
            return PollOutcome(done=False, detail="Running")
        if status == "Failed":
            reason = parsed.task_result.reason or "no reason given"
            return PollOutcome(
                done=True,
                error=Permanent(f"baidu task failed: {reason}", code="provider_failed", provider_message=reason),
            )
        return PollOutcome(done=True)

    def fetch(self, job: Job) -> Fetched:
        parsed, body = self._get_result(job)
        if parsed.task_result.status != "Success":
            raise Transient(f"baidu get_result: status {parsed.task_result.status} after Success", code="status_regressed")
        return Fetched(result=normalize(job, parsed), raw=body)


def normalize(job: Job, parsed: GetResultResponse) -> NormalizedResult:
    """single_key fields become one field per value; combo_key rows become grouped fields."""
    assert job.document is not None
    fields: list[ExtractedField] = []
    doc_type = None
    for item in parsed.words_result or []:
        doc_type = doc_type or item.doc_type
        kv = item.kv_result or KvResult()
        for name, values in kv.single_key.items():
            for words in values:
                fields.append(ExtractedField(name=name, value=words.words, page=item.page_num, box=words.first_box()))
        for group, rows in kv.combo_key.items():
            for row_index, row in enumerate(rows):
                for name, words in row.items():
                    fields.append(
                        ExtractedField(
                            name=name, value=words.words, page=item.page_num, box=words.first_box(), group=group, row=row_index
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
