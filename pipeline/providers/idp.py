"""The idp document-extraction platform (seed 000): JWT login, multipart task creation,
status polling, result and highlighted-PDF export.

The platform locks an account out after repeated failed logins, so the login is one
``SharedCredential`` for the whole fleet: one worker logs in (single flight), a failed login
leaves a cool-down that every worker honours, and a 401 triggers exactly one re-login.
The wire models and the seed's messages live in ``idp_wire``, shared with the emulator.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

import httpx
import jwt
from pydantic import ValidationError

from pipeline import storage
from pipeline.storage import CHUNK, ChunkReader
from pipeline.credentials import SharedCredential
from pipeline.errors import AuthExpired, BadInput, Permanent, ProviderError, Transient
from pipeline.limits import Rate
from pipeline.models import DocumentInfo, ExtractedField, Job, NormalizedResult, PageText
from pipeline.providers import idp_wire as wire
from pipeline.providers.base import Download, Fetched, PollOutcome, Provider, json_object
from pipeline.runtime import Runtime

if TYPE_CHECKING:
    from pipeline.submission import Submission

log = logging.getLogger(__name__)

# The seed states no size limit; these are the platform's usual defaults (and the emulator's).
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PAGES = 500
# The seed lists no formats either: what the platform's upload check accepts (and the emulator's).
MIME_TYPES = {"pdf": "application/pdf", "png": "image/png", "jpeg": "image/jpeg", "bmp": "image/bmp", "tiff": "image/tiff"}
SUPPORTED_FORMATS = frozenset(MIME_TYPES)

# A JWT without a usable ``exp`` still gets cached this long (a 401 ends it sooner); and a clock
# skewed against the platform's must not make a fresh token look expired, which would mean a
# login per request.
DEFAULT_TOKEN_LIFETIME = 3600.0
MIN_TOKEN_LIFETIME = 60.0

# The seed's documented messages -> (our class, our code). Keyed by message because the
# platform answers most refusals with the same HTTP 400 and tells them apart only by text.
MESSAGE_ERRORS: dict[str, tuple[type[ProviderError], str]] = {
    wire.LOGIN_LOCKED: (Transient, "login_locked_out"),
    wire.BAD_CREDENTIALS: (Permanent, "auth_failed"),
    wire.USER_DISABLED: (Permanent, "auth_failed"),
    wire.OVER_LIMIT: (Permanent, "too_large"),
    wire.ILLEGAL_FILE: (Permanent, "rejected_file"),
    wire.SYNC_ONE_FILE: (Permanent, "provider_rejected"),
    wire.VALIDATION_ERROR: (Permanent, "provider_rejected"),
    wire.EXTRACT_NOT_FOUND: (Permanent, "not_found"),
    wire.HIGHLIGHT_NOT_READY: (Transient, "not_ready"),
    wire.UNAUTHORIZED: (AuthExpired, "auth_expired"),
}
HINTS = {
    "auth_failed": "check DOCPIPE_IDP_USERNAME/DOCPIPE_IDP_PASSWORD",
    "login_locked_out": "the account is locked after repeated failed logins; every worker waits before the next try",
}


# --- error mapping -------------------------------------------------------------------------


def error_for(endpoint: str, http_status: int, message: str | None) -> ProviderError:
    """The docpipe error for a refusal: by the seed's message, else by HTTP status (401: log in again)."""
    text = message or "no message"
    if message in MESSAGE_ERRORS:
        cls, code = MESSAGE_ERRORS[message]
    elif http_status == 401:
        cls, code = AuthExpired, "auth_expired"
    else:
        cls, code = Permanent, "provider_rejected"
    hint = f"; {HINTS[code]}" if code in HINTS else ""
    return cls(
        f"idp {endpoint}: HTTP {http_status} {text}{hint}",
        code=code,
        provider_code=http_status,
        provider_message=message,
    )


def _refusal_message(response: httpx.Response) -> str | None:
    """The ``message`` of a refusal, when the body is the documented JSON (a proxy may answer HTML)."""
    try:
        return wire.ErrorResponse.model_validate(response.json()).message
    except ValueError:
        return None


def _answer(response: httpx.Response, endpoint: str) -> dict[str, Any]:
    """The JSON body of a successful answer; a refusal raised as its docpipe error."""
    if response.status_code >= 400:
        raise error_for(endpoint, response.status_code, _refusal_message(response))
    return json_object(response, f"idp {endpoint}")


_IDS_IN_TEXT = re.compile(r'"ids"\s*:\s*\[\s*(\d+)')
_ID_IN_TEXT = re.compile(r'"id"\s*:\s*(\d+)')


def accepted_extract_id(text: str) -> str | None:
    """The extract id a task creation names, read from the raw answer before it is validated.

    Documented in ``items[*].id``, deprecated in ``ids``; an answer that does not even parse
    is searched for either, because a named extract is a document the platform has taken.
    """
    try:
        body = json.loads(text)
    except ValueError:
        found = _IDS_IN_TEXT.search(text) or _ID_IN_TEXT.search(text)
        return found.group(1) if found else None
    if not isinstance(body, dict):
        return None
    items = body.get("items")
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("id"), int) and not isinstance(item["id"], bool):
            return str(item["id"])
    ids = body.get("ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], int) and not isinstance(ids[0], bool):
        return str(ids[0])
    return None


def token_lifetime(token: str, now: float | None = None) -> float:
    """Seconds the access token lives, from its ``exp`` claim (read, not verified: the platform verifies it)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.InvalidTokenError:
        exp = None
    if not isinstance(exp, (int, float)):
        return DEFAULT_TOKEN_LIFETIME
    return max(MIN_TOKEN_LIFETIME, float(exp) - (time.time() if now is None else now))


# --- the provider --------------------------------------------------------------------------


class IdpProvider(Provider):
    name: ClassVar[str] = "idp"
    # The seed documents no rate: our own conservative choice per endpoint, per account. Uploads
    # are the heavy requests; polls are cheap but many. A login is rare (one per token lifetime).
    limits: ClassVar[dict[str, Rate]] = {
        "login": Rate(1, per=1.0),
        "task": Rate(2, per=1.0),
        "result": Rate(5, per=1.0),
        "highlight": Rate(2, per=1.0),
        "download": Rate(2, per=1.0),
    }

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._base = self.settings.idp_base_url.rstrip("/")
        self._credential = SharedCredential(
            runtime.redis, f"idp:{self.account()}", self._login, cooldown=self.settings.idp_login_cooldown
        )
        # The seed's table says /api/extracting/..., its examples /extracting/...: start with the
        # setting, and keep whichever prefix the platform turns out to serve.
        self._prefix = self.settings.idp_api_prefix.rstrip("/")

    def account(self) -> str:
        """A fingerprint of the username: limits and the shared token are per account, names stay out of Redis keys."""
        username = self.settings.idp_username.get_secret_value()
        return hashlib.sha256(username.encode()).hexdigest()[:12]

    # -- login ------------------------------------------------------------------------------

    def _login(self) -> tuple[str, float]:
        """Log in once for the fleet (called by ``SharedCredential`` under its lock).

        The seed's python example sends base64 of the username and password, its curl example
        sends them as they are. ``auto`` tries base64 first and, refused as a wrong password,
        the plain form once; the form that works is tried first next time.
        """
        encodings = self._login_encodings()
        first_refusal: Permanent | None = None
        for encoding in encodings:
            try:
                answer = self._login_as(encoding)
            except Permanent as refused:
                # The second form is only a guess at the other reading: when it fails too, the
                # first refusal (a wrong password, most likely) is the one that explains.
                if refused.code == "auth_failed" and encoding != encodings[-1]:
                    first_refusal = refused
                    continue
                raise first_refusal or refused from None
            self._login_encoding = encoding
            return answer.access_token or "", token_lifetime(answer.access_token or "")
        raise AssertionError("unreachable")

    def _login_encodings(self) -> tuple[str, ...]:
        """The forms to try, in order: a fixed setting alone; in ``auto``, the form that worked
        last first, the other after it (a platform that changed its reading is followed)."""
        if self.settings.idp_login_encoding != "auto":
            return (self.settings.idp_login_encoding,)
        worked = getattr(self, "_login_encoding", None)
        return ("plain", "base64") if worked == "plain" else ("base64", "plain")

    def _login_as(self, encoding: str) -> wire.LoginResponse:
        encode = _b64 if encoding == "base64" else str
        login = wire.LoginRequest(
            username=encode(self.settings.idp_username.get_secret_value()),
            password=encode(self.settings.idp_password.get_secret_value()),
        )
        request = self.rt.http.build_request("POST", self._base + wire.LOGIN_PATH, json=login.model_dump(exclude_none=True))
        # Wait for the login token in the thread: a RateWait here would count as a failed login
        # and cool the whole fleet down.
        response = self.send("login", request, max_wait=2 * self.limits["login"].per)
        try:
            answer = wire.LoginResponse.model_validate(_answer(response, "login"))
        except ValidationError:  # never the pydantic text: it would quote the token
            raise Transient("idp login: answer of an unexpected shape", code="malformed_answer") from None
        if not answer.access_token:
            raise Transient("idp login: answer without an access_token", code="malformed_answer")
        return answer

    # -- one authenticated call -------------------------------------------------------------

    def _exchange(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        max_wait: float | None = None,
        alone: bool = False,
        submission: Submission | None = None,
        fresh: Callable[[], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send an API request with the shared token; ``fresh`` makes request arguments that can be
        sent only once (a streamed upload) anew for each attempt.

        On 401 log in again once (single flight) and resend. On 404, send once more under the
        other reading of the seed's path prefix; if that one is served, keep it for every later
        request of this process (a 404 there too is a real "not found").
        """

        def attempt(token: str, prefix: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"}
            once = fresh() if fresh is not None else {}
            request = self.rt.http.build_request(method, self._base + prefix + path, headers=headers, **kwargs, **once)
            return self.send(endpoint, request, max_wait=max_wait, alone=alone, submission=submission)

        token = self._credential.get()
        prefix = self._prefix
        response = attempt(token, prefix)
        if response.status_code == 401:
            token = self._credential.invalidate(token)
            response = attempt(token, prefix)
        if response.status_code == 404:
            other = "" if prefix else wire.API_PREFIX
            # A 404 in the API's own JSON is a real "not found" under a prefix that is served; one
            # in the front server's page says the path is not routed. Then the other reading is
            # taken before the resend asks for its send time: a step put off while it waits
            # (RateWait) comes back to it first. Kept to the answer, every re-run spent its queue
            # turn on the path it knew 404s, and the resend waited again behind the queue
            # (bench.polling: no idp task made in 20 minutes).
            served_here = _refusal_message(response) is not None
            if not served_here:
                self._prefix = other
            retried = attempt(token, other)
            served_there = retried.status_code != 404 or (_refusal_message(retried) is not None and not served_here)
            if served_there:
                if retried.status_code != 404:
                    log.info("idp serves %s%s, not %s%s: using that prefix from now on", other or "(no prefix)", path, prefix, path)
                self._prefix = other
                response = retried
            elif not served_here:
                self._prefix = prefix  # routed under neither (a front server's fault): the first reading stands
        return response

    def _call(self, endpoint: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _answer(self._exchange(endpoint, method, path, **kwargs), endpoint)

    # -- the verbs --------------------------------------------------------------------------

    def check(self, document: DocumentInfo, job: Job) -> None:
        if document.format not in SUPPORTED_FORMATS:
            raise BadInput(
                f"{job.label()}: format {document.format!r} is not accepted by idp (pdf, png, jpeg, bmp, tiff)",
                code="unsupported_format",
            )
        if document.size > MAX_FILE_BYTES:
            raise BadInput(
                f"{job.label()}: {document.size} bytes; idp accepts at most {MAX_FILE_BYTES} (50 MB)", code="too_large"
            )
        if document.pages is not None and document.pages > MAX_PAGES:
            raise BadInput(f"{job.label()}: {document.pages} pages; idp accepts at most {MAX_PAGES}", code="too_large")

    def submit(self, job: Job, submission: Submission) -> str:
        doc = job.document
        assert doc is not None
        params: dict[str, Any] = {
            "async_task": "true",
            "feature_type_id": job.options.get("feature_type_id", self.settings.idp_feature_type_id),
            "file_types": [wire.DOC_TYPE_ELECTRONIC if doc.format == "pdf" else wire.DOC_TYPE_IMAGE],
            "task_name": job.job_id,
        }
        language = job.options.get("language", self.settings.idp_language)
        if language:
            params["language"] = language
        response = self._exchange(
            "task",
            "POST",
            wire.TASK_PATH,
            params=params,
            # Streamed from S3 as the request goes out (a 50 MB document is never held whole); a
            # fresh stream for every attempt (a resend after a 401 reads the document again).
            fresh=lambda: {"files": [("files", (doc.filename, storage.ObjectStream(doc.bucket, doc.key, doc.size, doc.etag), MIME_TYPES[doc.format]))]},
            submission=submission,
        )
        if response.status_code < 400 and (extract_id := accepted_extract_id(response.text)) is not None:
            submission.accepted(extract_id)
        ids = wire.CreateTaskResponse.model_validate(_answer(response, "task")).extract_ids
        if not ids:
            # The platform may have accepted the file: sending it again could extract it twice.
            raise Permanent("idp task: answer without an extract id; not sending the document again", code="malformed_answer")
        return str(ids[0])

    def _get_result(
        self, job: Job, *, max_wait: float | None = None, alone: bool = False
    ) -> tuple[wire.ExtractItem, dict[str, Any]]:
        path = wire.RESULT_PATH.format(extract_id=job.provider_task_id)
        body = self._call("result", "GET", path, max_wait=max_wait, alone=alone)
        item = wire.GetResultResponse.model_validate(body).item
        if item is None:
            raise Transient("idp result: answer without an item", code="malformed_answer")
        return item, body

    def poll(self, job: Job) -> PollOutcome:
        """Done at a documented success or failure. Everything else, the seed's own "text converted"
        (3) included, is a step on the way: ask again until the deadline, whose error names the status."""
        item, body = self._get_result(job, max_wait=self.settings.poll_inline_wait, alone=True)
        known = item.status in wire.STATUS_NAMES
        name = item.status_name or wire.STATUS_NAMES.get(item.status if item.status is not None else -1, "not a status the seed lists")
        status = f"{item.status} ({name})"
        if not item.final:
            return PollOutcome(done=False, status=status, detail=status if known else f"{status}; waiting until the deadline")
        if item.succeeded:
            return PollOutcome(done=True, status=status, reported=_reported(item), answer=body)
        return PollOutcome(
            done=True,
            status=status,
            error=Permanent(
                f"idp extraction failed: status {item.status} ({name})",
                code="provider_failed",
                provider_code=item.status,
                provider_message=name,
            ),
        )

    def fetch(self, job: Job, answer: Any = None) -> Fetched:
        if answer is not None:
            item, body = wire.GetResultResponse.model_validate(answer).item, answer
            if item is None:
                raise Transient("idp result: answer without an item", code="malformed_answer")
        else:
            item, body = self._get_result(job)
        if not item.succeeded:
            raise Transient(f"idp result: status {item.status} after a final success", code="status_regressed")
        return Fetched(result=normalize(job, item), raw=body, artifacts={"highlight.pdf": self._highlight(job)})

    def _highlight(self, job: Job) -> Download:
        """Export the highlighted PDF; the file its address names is read as it is archived."""
        path = wire.HIGHLIGHT_PATH.format(extract_id=job.provider_task_id)
        item = wire.HighlightResponse.model_validate(self._call("highlight", "GET", path)).item
        if item is None or not item.url:
            raise Transient("idp highlight: answer without a download address", code="malformed_answer")
        # A download address is a link, not an API call: our token never travels to whatever host it names.
        url = httpx.URL(self._base + "/").join(item.url)
        return Download(open=lambda: self._download(url))

    @contextmanager
    def _download(self, url: httpx.URL) -> Iterator[BinaryIO]:
        response = self.send("download", self.rt.http.build_request("GET", url), stream=True)
        try:
            if response.status_code >= 400:
                # Fetching again exports again, and a new export names a new address.
                status = response.status_code
                raise Transient(f"idp download: HTTP {status}", code="download_failed", provider_code=status)
            body = ChunkReader(response.iter_bytes(CHUNK))
            if not body.head(5).startswith(b"%PDF-"):
                raise Transient("idp download: the highlighted file is not a PDF", code="malformed_answer")
            yield body
        except httpx.TransportError as exc:  # the body broke off midway
            raise Transient(f"idp download: the body broke off ({type(exc).__name__})", code="no_answer") from None
        finally:
            response.close()


def _b64(text: str) -> str:
    """Login values travel as base64 of the UTF-8 text, as the seed's example sends them."""
    return base64.b64encode(text.encode()).decode()


# --- normalization -------------------------------------------------------------------------


def normalize(job: Job, item: wire.ExtractItem) -> NormalizedResult:
    """``tag_list`` entries become fields; each ``relation_extract`` group's rows become grouped fields."""
    assert job.document is not None
    result = item.result or wire.ExtractResult()
    fields = [_field(tag, tag.tag_name or "") for tag in result.tag_list]
    for group in result.relation_extract:
        for row_index, row in enumerate(group.children):
            for cell in row.children:
                fields += [
                    _field(tag, cell.name or tag.tag_name or "", group=group.name, row=row_index) for tag in cell.value
                ]
    return NormalizedResult(
        job_id=job.job_id,
        provider=job.provider,
        source=job.source,
        document=job.document,
        provider_task_id=job.provider_task_id,
        doc_type=None if item.tag_type_id is None else str(item.tag_type_id),  # "文档类型 ID"
        fields=fields,
        pages=pages_of(item.content or ""),
    )


def _field(tag: wire.Tag, name: str, *, group: str | None = None, row: int | None = None) -> ExtractedField:
    """One value; its page and box come from ``after_treatment`` when the platform located it."""
    page, box = _place(tag.located())
    return ExtractedField(
        name=name,
        value=tag.value if tag.value is not None else tag.word or "",
        confidence=tag.confidence,
        page=page,
        box=box,
        group=group,
        row=row,
    )


def _place(located: wire.AfterTreatment | None) -> tuple[int | None, list[list[float]] | None]:
    """The first location as (1-based page, corner points): the platform counts pages from 0 and
    gives ``[x0, y0, x1, y1]``; corner points are the shape every provider's box has in results."""
    if located is None or not located.locations:
        return None, None
    where = located.locations[0]
    page = None if where.page_no is None else where.page_no + 1
    try:
        bboxes = json.loads(where.bboxes) if isinstance(where.bboxes, str) else where.bboxes
        x0, y0, x1, y1 = (float(v) for v in bboxes[0])
    except (ValueError, TypeError, IndexError):  # no box, or one in a shape we do not know
        return page, None
    return page, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def pages_of(content: str) -> list[PageText]:
    """``item.content`` is the whole document's plain text; form feeds, where the platform puts
    them, separate its pages. Without them it is all one page of text."""
    if not content:
        return []
    return [PageText(number=n, text=text) for n, text in enumerate(content.split("\f"), start=1)]


def _reported(item: wire.ExtractItem) -> tuple[float, float] | None:
    """From ``create_time`` to ``last_update_time`` (both to the second, in the platform's zone:
    their difference needs no zone): the extraction took within a second of that."""
    try:
        created = datetime.strptime(item.create_time or "", "%Y-%m-%d %H:%M:%S")
        updated = datetime.strptime(item.last_update_time or "", "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    took = (updated - created).total_seconds()
    return (max(0.0, took - 1.0), took + 1.0) if took >= 0 else None
