"""Tuputech document moderation (seed 001): a signed submit of a document URL, the result by
signed callback, at most 30 tasks in flight per account.

The document URL is a presigned GET of the staged object, made at submit time so that it
never travels in a task argument; the callback URL names the job, so the receiver needs no
lookup. Nothing is polled at the provider: the await stage looks into the callback store.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, ClassVar

from pydantic import ValidationError

from pipeline import callbacks, storage
from pipeline.errors import BadInput, Permanent, Transient
from pipeline.limits import Rate
from pipeline.models import DocumentInfo, Job, Moderation, NormalizedResult, PageText
from pipeline.providers.base import CallbackRejected, Fetched, PollOutcome, Provider
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

SUPPORTED_FORMATS = {"pdf", "docx", "xlsx", "pptx", "doc", "ppt", "html", "txt"}
SUGGESTIONS = {0: "pass", 1: "reject", 2: "review"}
SUBMIT_TIMEOUT_S = 5.0
_PRESIGNED = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\"\s]+")


def error_for(code: int, message: str, where: str) -> Exception:
    kind, meaning = BUSINESS_CODES.get(code, ("permanent", "unknown code"))
    text = f"tuputech {where}: code {code} ({message or meaning})"
    common = {"provider_code": code, "provider_message": message or meaning}
    if kind == "transient":
        return Transient(text, code="provider_transient", **common)
    if code in (1, 6):
        return Permanent(text, code="auth_failed", **common)
    return Permanent(text, code="provider_rejected", **common)


def redact_presigned(value: Any) -> Any:
    """The provider echoes the document URL: strip its signature before anything is archived."""
    if isinstance(value, str):
        return _PRESIGNED.sub(r"\1REDACTED", value)
    if isinstance(value, dict):
        return {k: redact_presigned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_presigned(v) for v in value]
    return value


class TuputechProvider(Provider):
    name: ClassVar[str] = "tuputech"
    limits: ClassVar[dict[str, Rate]] = {
        "submit": Rate(50, per=1.0),  # the seed documents none: our own courtesy limit
        "text": Rate(20, per=1.0),
    }
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
            raise Permanent(f"tuputech {where}: answer not signed by tuputech ({exc})", code="unverified_answer") from None

    def open_callback(self, body: bytes) -> dict[str, Any]:
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
        if not isinstance(payload.get("requestId"), str) or not isinstance(payload.get("code"), int):
            raise CallbackRejected(400, "callback without requestId/code")
        return payload

    def callback_task_id(self, payload: dict[str, Any]) -> str | None:
        return payload.get("requestId")

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

    def submit(self, job: Job) -> str:
        doc = job.document
        assert doc is not None
        deadline = int(job.options.get("deadline", self.settings.job_deadline))
        url = storage.presign_get(doc.bucket, doc.key, expires=max(3600, deadline))
        body = signed_submit_body(
            self.settings.tuputech_secret_id.get_secret_value(),
            self.settings.tuputech_private_key.get_secret_value(),
            Doc(
                url=url,
                format=doc.format,
                callback=f"{self.settings.callback_base_url.rstrip('/')}/callbacks/{self.name}/{job.job_id}",
                callback_rule=job.options.get("callback_rule", self.settings.tuputech_callback_rule),
            ),
            custom_info=job.options.get("custom_info"),
        )
        path = SUBMIT_PATH.format(secret_id=self.settings.tuputech_secret_id.get_secret_value())
        # The seed advises a 1 s timeout; 5 s leaves room, and stays well inside the lease's grace.
        request = self.rt.http.build_request("POST", self._base + path, json=body, timeout=SUBMIT_TIMEOUT_S)
        response = self.send("submit", request, slot_for=job)
        answer = SubmitResponse.model_validate(self._open(response.json(), "submit"))
        if answer.code != 0 or answer.result is None:
            raise error_for(answer.code, answer.message, "submit")
        return answer.result.request_id

    def _callback(self, job: Job) -> dict[str, Any] | None:
        """The stored callback for this job's task; one about another task (an earlier submit of the
        same job, or a replay) is dropped and the wait goes on."""
        payload = callbacks.load(self.name, job.job_id)
        if payload is not None and payload.get("requestId") != job.provider_task_id:
            callbacks.forget(self.name, job.job_id)
            return None
        return payload

    def poll(self, job: Job) -> PollOutcome:
        payload = self._callback(job)
        if payload is None:
            return PollOutcome(done=False, detail="waiting for the callback")
        if payload["code"] != 0:
            error = error_for(payload["code"], str(payload.get("message", "")), "result")
            failed = Permanent(str(error), code="provider_failed", provider_code=payload["code"], provider_message=payload.get("message"))
            failed.retryable = isinstance(error, Transient)
            return PollOutcome(done=True, error=failed)
        return PollOutcome(done=True)

    def fetch(self, job: Job) -> Fetched:
        payload = self._callback(job)
        if payload is None:
            raise Transient("tuputech fetch: callback no longer in the store", code="callback_missing")
        try:
            parsed = CallbackResult.model_validate(payload)
        except ValidationError as exc:
            raise Permanent(f"tuputech result does not parse: {exc.errors()[0]['msg']}", code="malformed_result") from None
        pages, artifacts = self._page_texts(parsed)
        assert job.document is not None
        result = NormalizedResult(
            job_id=job.job_id,
            provider=self.name,
            source=job.source,
            document=job.document.model_copy(update={"pages": parsed.doc_info.pages}),
            provider_task_id=parsed.request_id,
            pages=pages,
            moderation=moderation(parsed),
        )
        return Fetched(result=result, raw=redact_presigned(payload), artifacts=artifacts)

    def _page_texts(self, parsed: CallbackResult) -> tuple[list[PageText], dict[str, bytes]]:
        pages: list[PageText] = []
        artifacts: dict[str, bytes] = {}
        for page in parsed.pages or []:
            if page.text is None or not page.text.url:
                continue
            response = self.send("text", self.rt.http.build_request("GET", page.text.url))
            if response.status_code != 200:
                raise Transient(f"tuputech page {page.page} text: HTTP {response.status_code}", code="artifact_missing")
            pages.append(PageText(number=page.page, text=response.text))
            artifacts[f"pages/{page.page}.txt"] = response.content
        return pages, artifacts

    def finished(self, job: Job) -> None:
        super().finished(job)
        callbacks.forget(self.name, job.job_id)


def moderation(parsed: CallbackResult) -> Moderation:
    """The verdict: the document's suggestion, and the risk types, pages and images behind it."""
    flagged = [p for p in parsed.pages or [] if p.summary.suggestion != 0]
    risk_types = {str(p.summary.risk_type) for p in flagged}
    if parsed.risk_type is not None and (parsed.suggestion or 0) != 0:
        risk_types.add(str(parsed.risk_type))
    images = [img.name for p in flagged for img in p.images or [] if img.suggestion != 0]
    suggestion = parsed.suggestion if parsed.suggestion is not None else max((p.summary.suggestion for p in flagged), default=0)
    return Moderation(
        suggestion=SUGGESTIONS.get(suggestion, "review"),  # type: ignore[arg-type]
        risk_types=sorted(risk_types),
        pages=sorted(p.page for p in flagged),
        images=images,
    )
