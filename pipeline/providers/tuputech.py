"""Tuputech document moderation (seed 001): a signed submit of a document URL, the result by
signed callback, at most 30 tasks in flight per account.

The document URL is a signed, short-lived link on the docpipe receiver (``pipeline.links``):
it answers HEAD and ranged GETs as the seed asks, which an S3 presigned URL does not. The
callback URL names the job, and ``customInfo`` carries the job id, which the provider
echoes inside the signed payload. Nothing is polled at the provider: the await stage looks
into the callback store.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ValidationError

from pipeline import callbacks, jobs, links
from pipeline.errors import BadInput, Permanent, ProviderError, RateWait, Transient
from pipeline.limits import Rate
from pipeline.models import DocumentInfo, Job, Moderation, NormalizedResult, PageText
from pipeline.providers.base import Callback, CallbackRejected, Fetched, PollOutcome, Provider
from pipeline.providers.tuputech_wire import (
    BUSINESS_CODES,
    MAX_DOC_BYTES,
    SUBMIT_PATH,
    CallbackResult,
    Doc,
    SignatureError,
    SubmitResponse,
    load_private_key,
    load_public_key,
    open_sealed,
    signed_submit_body,
)
from pipeline.runtime import Runtime

if TYPE_CHECKING:
    from pipeline.submission import Submission

SUPPORTED_FORMATS = {"pdf", "docx", "xlsx", "pptx", "doc", "ppt", "html", "txt"}
SUGGESTIONS = {0: "pass", 1: "reject", 2: "review"}
SUBMIT_TIMEOUT_S = 5.0
JOB_ID_KEY = "docpipeJob"  # our key in customInfo, echoed in the signed callback
# The seed, 2.4 (lines 38-41): "在 HTTP 响应状态码非 200 或业务状态码不为 0 时进行重试" - retry
# whenever the HTTP status is not 200 or the business code is not 0. The one code the seed
# itself documents as a property of the document is 14, "文件错误" (line 56: a document over
# 500 MB is answered with 14): the same file fails the same way, so 14 is not retried.
PERMANENT_CODES = frozenset({14})
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # 3.1: "字符串长度 24~128"; kept lenient, it becomes a Redis key
_REQUEST_ID_IN_TEXT = re.compile(r'\\?"requestId\\?"\s*:\s*\\?"([A-Za-z0-9_-]{1,128})\\?"')


def error_for(code: int, message: str, where: str) -> ProviderError:
    """The docpipe error for a business code, the provider's own value and words kept."""
    meaning = BUSINESS_CODES.get(code, ("", "a code the seed does not list"))[1]
    text = f"tuputech {where}: code {code} ({message or meaning})"
    common = {"provider_code": code, "provider_message": message or meaning}
    if code in PERMANENT_CODES:
        return Permanent(text, code="provider_rejected", **common)
    return Transient(text, code="auth_failed" if code in (1, 6) else "provider_transient", **common)


def accepted_request_id(text: str) -> str | None:
    """The task id a submit answer names, read before its signature is checked or its shape validated.

    An answer that reads as a refusal (code != 0) accepted nothing; one that does not even
    parse is searched for a requestId, since a named task is one the provider has taken.
    """
    try:
        envelope = json.loads(text)
        payload = json.loads(envelope["json"]) if isinstance(envelope, dict) else None
    except (ValueError, KeyError, TypeError):
        found = _REQUEST_ID_IN_TEXT.search(text)
        return found.group(1) if found else None
    if not isinstance(payload, dict) or payload.get("code") != 0:
        return None
    result = payload.get("result")
    request_id = result.get("requestId") if isinstance(result, dict) else None
    return request_id if isinstance(request_id, str) and request_id else None


class TuputechProvider(Provider):
    name: ClassVar[str] = "tuputech"
    # The seed limits tasks in flight (30, the lease), and no request rate; the tasks in flight
    # pace every request that follows from them. Courtesy rates of our own cost more than they
    # spared: on submits, the limiter's send time sat on the path that refills a freed slot (7 of
    # its 25 ms); on page texts (20/s), a fetch refused a token slept for it in a worker thread,
    # or re-ran later and downloaded its first pages again.
    limits: ClassVar[dict[str, Rate]] = {}
    first_poll_delay: ClassVar[float] = 1.0  # polling is a Redis lookup, not a provider request
    uses_callbacks: ClassVar[bool] = True

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._base = self.settings.tuputech_base_url.rstrip("/")

    def warm_up(self) -> None:
        # Loading an RSA key checks it, which costs milliseconds of CPU: once, before the first submit.
        if self.settings.tuputech_private_key.get_secret_value():
            load_private_key(self.settings.tuputech_private_key.get_secret_value())
        if self.settings.tuputech_public_key:
            load_public_key(self.settings.tuputech_public_key)

    def account(self) -> str:
        return hashlib.sha256(self.settings.tuputech_secret_id.get_secret_value().encode()).hexdigest()[:12]

    def max_in_flight(self) -> int | None:
        return self.settings.tuputech_max_in_flight

    # -- signatures ---------------------------------------------------------------------------

    def _open(self, envelope: Any, where: str) -> dict[str, Any]:
        try:
            return open_sealed(self.settings.tuputech_public_key, envelope)
        except SignatureError as exc:
            # Retried like any answer that is not a success (seed 2.4); a wrong public key fails in the end.
            raise Transient(
                f"tuputech {where}: answer not signed by tuputech ({exc}); check DOCPIPE_TUPUTECH_PUBLIC_KEY",
                code="unverified_answer",
            ) from None

    def open_callback(self, body: bytes) -> Callback:
        try:
            envelope = json.loads(body)
        except ValueError:
            raise CallbackRejected(400, "body is not JSON") from None
        if not isinstance(envelope, dict) or not isinstance(envelope.get("json"), str) or not isinstance(envelope.get("signature"), str):
            raise CallbackRejected(400, 'body is not {"json": "...", "signature": "..."}')
        try:
            payload = open_sealed(self.settings.tuputech_public_key, envelope)
        except SignatureError as exc:
            raise CallbackRejected(403, str(exc)) from None
        except ValueError:
            raise CallbackRejected(400, "signed json does not parse") from None
        request_id, code = payload.get("requestId"), payload.get("code")
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id) or not isinstance(code, int):
            raise CallbackRejected(400, "callback without a well-formed requestId and code")
        custom = payload.get("customInfo")
        echoed = custom.get(JOB_ID_KEY) if isinstance(custom, dict) else None
        timestamp, nonce = payload.get("timestamp"), payload.get("nonce")
        return Callback(
            task_id=request_id,
            job_id=echoed if isinstance(echoed, str) else None,
            timestamp=float(timestamp) if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool) else None,
            nonce=None if nonce is None else str(nonce),
            payload=payload,
        )

    # -- how long a task may run without its callback -----------------------------------------

    def callback_bound(self) -> float:
        """Seconds after submit by which a task's callback must have come: 3 × the longest processing
        seen recently (or the expected one, before any is seen) plus the window of the callback's retries."""
        longest = callbacks.longest_processing(self) or self.settings.tuputech_expected_processing
        return 3 * longest + self.settings.tuputech_callback_window

    def overdue_at(self, job: Job) -> float | None:
        return self._started(job) + self.callback_bound()

    def _started(self, job: Job) -> float:
        """When the task could start: its submit, or later when our document link served the
        download late (S3 away: ``pipeline.links``)."""
        served = self.rt.redis.hget(jobs.key(job.job_id), "document_served_at")
        return max(job.submitted_at or time.time(), float(served or 0))

    def task_lifetime(self, job: Job) -> float:
        return min(super().task_lifetime(job), self.callback_bound())

    def unknown_outcome(self, job: Job, since: float) -> str | None:
        """A submit without an answer may still have made a task: its callback would name it (the
        receiver adopts it). Wait for that until the callback bound, then give up as by default."""
        left = since + self.callback_bound() - time.time()
        if left > 0:
            raise RateWait(f"tuputech:{job.job_id}:callback", min(left, 5.0))
        return super().unknown_outcome(job, since)

    # -- the verbs ----------------------------------------------------------------------------

    def check(self, document: DocumentInfo, job: Job) -> None:
        if document.format not in SUPPORTED_FORMATS:
            raise BadInput(
                f"{job.label()}: format {document.format!r} is not a document tuputech moderates "
                f"({', '.join(sorted(SUPPORTED_FORMATS))})",
                code="unsupported_format",
            )
        if document.size > MAX_DOC_BYTES:
            raise BadInput(
                f"{job.label()}: {document.size} bytes; tuputech takes documents under {MAX_DOC_BYTES} (500 MB)",
                code="too_large",
            )

    def submit(self, job: Job, submission: Submission) -> str:
        doc = job.document
        assert doc is not None
        deadline = float(job.options.get("deadline", self.settings.job_deadline))
        body = signed_submit_body(
            self.settings.tuputech_secret_id.get_secret_value(),
            self.settings.tuputech_private_key.get_secret_value(),
            Doc(
                url=links.document_link(job, lifetime=deadline),
                format=doc.format,
                callback=f"{self.settings.callback_base_url.rstrip('/')}/callbacks/{self.name}/{job.job_id}",
                callback_rule=job.options.get("callback_rule", self.settings.tuputech_callback_rule),
            ),
            custom_info={**(job.options.get("custom_info") or {}), JOB_ID_KEY: job.job_id},
        )
        path = SUBMIT_PATH.format(secret_id=self.settings.tuputech_secret_id.get_secret_value())
        # The seed advises a 1 s timeout; 5 s leaves room, and stays well inside the lease's grace.
        request = self.rt.http.build_request("POST", self._base + path, json=body, timeout=SUBMIT_TIMEOUT_S)
        response = self.send("submit", request, submission=submission)
        if response.status_code != 200:  # seed 2.4: a non-200 is retried
            raise Transient(f"tuputech submit: HTTP {response.status_code}", code="http_status", provider_code=response.status_code)
        request_id = accepted_request_id(response.text)
        if request_id is not None:
            submission.accepted(request_id)
        try:
            envelope = response.json()
        except ValueError:
            raise Transient("tuputech submit: answer is not JSON", code="malformed_answer") from None
        answer = SubmitResponse.model_validate(self._open(envelope, "submit"))
        if answer.code != 0 or answer.result is None:
            raise error_for(answer.code, answer.message or "", "submit")
        return answer.result.request_id

    def _callback(self, job: Job) -> dict[str, Any] | None:
        """The stored callback of this job's task (stored under the task id: no other task's can stand in)."""
        return callbacks.load(self.name, job.provider_task_id) if job.provider_task_id else None

    def poll(self, job: Job) -> PollOutcome:
        payload = self._callback(job)
        if payload is None:
            waited = time.time() - self._started(job)
            bound = self.callback_bound()
            if waited > bound:
                # The task is long over at the provider: give its slot back, and say why the document ends.
                self.finished_at_provider(job.job_id)
                missing = Permanent(
                    f"tuputech task {job.provider_task_id}: no callback {waited:.0f}s after submit (the bound is 3 x the "
                    f"longest processing seen plus the callback retry window: {bound:.0f}s)",
                    code="callback_missing",
                )
                missing.retryable = True
                return PollOutcome(done=True, error=missing)
            self.rt.leases.extend(self.lease_key(), job.job_id, max(1.0, bound - waited), only_if_held=True)
            return PollOutcome(done=False, detail="waiting for the callback")
        code = payload["code"]
        if code != 0:
            error = error_for(code, str(payload.get("message") or ""), "result")
            failed = Permanent(str(error), code="provider_failed", provider_code=code, provider_message=error.provider_message)
            failed.retryable = isinstance(error, Transient)
            return PollOutcome(done=True, status=code, error=failed)
        return PollOutcome(done=True, status=code)

    def fetch(self, job: Job, answer: Any = None) -> Fetched:
        payload = self._callback(job)
        if payload is None:
            raise Transient("tuputech fetch: callback no longer in the store", code="callback_missing")
        try:
            parsed = CallbackResult.model_validate(payload)
        except ValidationError as exc:
            raise Permanent(f"tuputech result does not parse: {exc.errors()[0]['msg']}", code="malformed_result") from None
        base = page_index_base(parsed, job.options.get("page_index_base", self.settings.tuputech_page_index_base))
        pages, artifacts = self._page_texts(parsed, base)
        assert job.document is not None
        result = NormalizedResult(
            job_id=job.job_id,
            provider=self.name,
            source=job.source,
            document=job.document.model_copy(update={"pages": parsed.doc_info.pages if parsed.doc_info else None}),
            provider_task_id=parsed.request_id,
            pages=pages,
            moderation=moderation(parsed, base),
        )
        return Fetched(result=result, raw=payload, artifacts=artifacts)

    def _page_texts(self, parsed: CallbackResult, base: int) -> tuple[list[PageText], dict[str, bytes]]:
        """Each reported page's text, downloaded from the link the result gives; numbered from 1."""
        pages: list[PageText] = []
        artifacts: dict[str, bytes] = {}
        for page in parsed.pages or []:
            if page.text is None or not page.text.url:
                continue
            number = page.page - base + 1
            response = self.send("text", self.rt.http.build_request("GET", page.text.url))
            if response.status_code != 200:
                raise Transient(f"tuputech page {number} text: HTTP {response.status_code}", code="artifact_missing")
            pages.append(PageText(number=number, text=response.text))
            artifacts[f"pages/{number}.txt"] = response.content
        return pages, artifacts

    def finished(self, job: Job) -> None:
        super().finished(job)
        if job.provider_task_id:
            callbacks.forget(self.name, job.provider_task_id)


def page_index_base(parsed: CallbackResult, configured: int | None) -> int:
    """Where the callback's page indexes start: the seed's table says 1, its example shows 0.

    Unless configured, the callback tells when it can: a page 0 means 0-based, a page equal
    to the document's page count means 1-based. When neither shows, follow the example.
    """
    if configured in (0, 1):
        return int(configured)
    indexes = {page.page for page in parsed.pages or []}
    if 0 in indexes:
        return 0
    if parsed.doc_info is not None and parsed.doc_info.pages in indexes:
        return 1
    return 0


def moderation(parsed: CallbackResult, base: int = 0) -> Moderation:
    """The verdict: the document's suggestion, and the risk types, pages (from 1) and images behind it."""
    flagged = [p for p in parsed.pages or [] if p.summary.suggestion != 0]
    risk_types = {str(p.summary.risk_type) for p in flagged}
    if parsed.risk_type is not None and (parsed.suggestion or 0) != 0:
        risk_types.add(str(parsed.risk_type))
    images = [img.name for p in flagged for img in p.images or [] if img.suggestion != 0]
    suggestion = parsed.suggestion if parsed.suggestion is not None else max((p.summary.suggestion for p in flagged), default=0)
    return Moderation(
        suggestion=SUGGESTIONS.get(suggestion, "review"),  # type: ignore[arg-type]  # an unknown verdict goes to a human
        risk_types=sorted(risk_types),
        pages=sorted(p.page - base + 1 for p in flagged),
        images=images,
    )
