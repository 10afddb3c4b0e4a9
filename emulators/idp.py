"""The idp document-extraction platform, emulated: JWT login, multipart task creation,
status polling, and the highlighted-PDF export.

Faithful to seed 000: every answer carries ``status`` (the HTTP code) and the seed's
Chinese ``message``; logins lock out after repeated failures; access tokens are HS256 JWTs
that expire and then answer 401 (no refresh endpoint is known, so clients log in again);
each document walks through the documented status codes (0 → 6 → 3 → 7 → 5, or stops at
2, 4 or 20001) over a processing time drawn per document. Routes are served both with and
without the ``/api`` prefix because the seed's own examples call ``/extracting/...``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from itertools import count
from typing import Any
from urllib.parse import quote

import jwt
from PIL import Image
from pydantic import BaseModel, ValidationError
from pypdf import PdfReader
from reportlab.lib.pagesizes import A4
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfgen import canvas
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from emulators.common import Emulator, EmulatorConfig
from emulators.documents import PageContent, analyse, box_for
from pipeline.providers.idp_wire import (
    API_PREFIXES,
    BAD_CREDENTIALS,
    DOC_TYPE_ELECTRONIC,
    DOC_TYPE_IMAGE,
    EXTRACT_NOT_FOUND,
    HIGHLIGHT_FAILED,
    HIGHLIGHT_NOT_READY,
    HIGHLIGHT_OK,
    HIGHLIGHT_PATH,
    ILLEGAL_FILE,
    LOGIN_FAILED,
    LOGIN_LOCKED,
    LOGIN_OK,
    LOGIN_PATH,
    OVER_LIMIT,
    RESULT_ERROR_STATUS,
    RESULT_FAILED,
    RESULT_OK,
    RESULT_OK_STATUS,
    RESULT_PATH,
    STATUS_NAMES,
    SUCCEEDED,
    SYNC_ONE_FILE,
    TASK_CREATED,
    TASK_FAILED,
    TASK_PATH,
    UNAUTHORIZED,
    USER_DISABLED,
    VALIDATION_ERROR,
    AfterTreatment,
    CreateTaskResponse,
    ErrorResponse,
    ExtractItem,
    ExtractResult,
    ExtractStatus,
    GetResultResponse,
    HighlightItem,
    HighlightResponse,
    Location,
    LoginRequest,
    LoginResponse,
    RelationField,
    RelationGroup,
    RelationRow,
    Tag,
    TaskItem,
    TaskQuery,
    parse_callback_args,
)
from pipeline.sniff import FORMAT_EXTENSIONS, HEAD_BYTES, sniff_format

CST = timezone(timedelta(hours=8))
EXTRACT_VERSION = 2
IDPS_VERSION = 3
PAGE_SIZE = [595.0, 842.0]  # A4 in points, what after_treatment locations are measured in
CJK_FONT = "STSong-Light"
SYNC_ONLY = frozenset({"name", "content", "result"})  # a task creation's keys that only a synchronous task answers
pdfmetrics.registerFont(UnicodeCIDFont(CJK_FONT))

# Statuses whose document text exists (conversion done), so item.content is filled.
TEXT_READY = frozenset({ExtractStatus.TEXT_CONVERTED, ExtractStatus.EXTRACTING, ExtractStatus.PRELABEL_FAILED}) | SUCCEEDED
# The way to a final status: each step starts at this fraction of the processing time.
PATH: list[tuple[float, ExtractStatus]] = [
    (0.0, ExtractStatus.UNPROCESSED),
    (0.1, ExtractStatus.CONVERTING),
    (0.4, ExtractStatus.TEXT_CONVERTED),
    (0.5, ExtractStatus.EXTRACTING),
]
# How far along PATH a document gets before each failure (a file check fails before conversion starts...).
STEPS_BEFORE = {ExtractStatus.FILE_CHECK_FAILED: 1, ExtractStatus.TEXT_CONVERT_FAILED: 2}


class Config(EmulatorConfig):
    username: str = "demo"
    password: str = "demo-password"
    disabled_users: list[str] = []
    user_id: int = 1
    nickname: str = "demo"
    need_update_password: bool = False
    jwt_secret: str = "idp-emulator-jwt-secret-not-for-production"  # HS256 wants >= 32 bytes
    token_expires_in: float = 3600.0  # seconds; then API calls answer 401
    refresh_token_expires_in: float = 7 * 86400.0
    login_max_failures: int = 5  # consecutive failures that lock a username out
    login_lock_seconds: float = 300.0
    max_file_bytes: int = 50 * 1024 * 1024
    max_pages: int = 500
    accepted_formats: list[str] = ["pdf", "png", "jpeg", "bmp", "tiff"]
    processing_min: float = 2.0  # seconds; each document draws uniformly from [min, max]
    processing_max: float = 8.0
    failure_rate: float = 0.0
    failure_statuses: list[ExtractStatus] = [
        ExtractStatus.TEXT_CONVERT_FAILED,
        ExtractStatus.PRELABEL_FAILED,
        ExtractStatus.FILE_CHECK_FAILED,
    ]


class Refused(Exception):
    """A request answered early: in the provider's error shape, or as its failing proxy answers."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _refuse(http_status: int, message: str) -> Refused:
    return Refused(_answer(ErrorResponse(status=http_status, message=message), http_status))


@dataclass
class Extract:
    """One uploaded document and where it stands; ``steps`` is its whole timeline, fixed at upload."""

    id: int
    task_id: int
    origin_name: str
    unique_name: str
    data: bytes
    fmt: str
    query: TaskQuery
    created: float
    steps: list[tuple[float, int]]  # (time.time() the status starts, status)
    pages: list[PageContent] | None = None  # analysed on first need
    highlight: bytes | None = None  # rendered on first download
    download_key: str | None = None

    @property
    def ready_at(self) -> float:
        return self.steps[-1][0]

    def state(self, now: float) -> tuple[int, float]:
        """The status at ``now`` and when it began."""
        started, status = self.steps[0]
        for at, step in self.steps:
            if at <= now:
                started, status = at, step
        return status, started


def _answer(model: BaseModel, http_status: int = 200, exclude: frozenset[str] = frozenset()) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json", exclude=set(exclude)), status_code=http_status)


def _gateway_error(code: int) -> HTMLResponse:
    """What the platform's front proxy answers when the backend is down: HTML, not JSON."""
    title = f"{code} {HTTPStatus(code).phrase}"
    return HTMLResponse(f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center></body></html>", code)


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, CST).strftime("%Y-%m-%d %H:%M:%S")


def _b64_text(value: str) -> str:
    """Login values travel as base64 of UTF-8; anything else is a parameter error."""
    return base64.b64decode(value, validate=True).decode("utf-8")


def timeline(created: float, duration: float, final: int) -> list[tuple[float, int]]:
    steps = PATH[: STEPS_BEFORE.get(final, len(PATH))]
    return [(created + fraction * duration, status) for fraction, status in steps] + [(created + duration, final)]


def page_count(data: bytes, fmt: str) -> int:
    if fmt == "pdf":
        return len(PdfReader(io.BytesIO(data)).pages)
    with Image.open(io.BytesIO(data)) as image:
        return getattr(image, "n_frames", 1)


# --- the recognised content, shaped as the seed shapes results ------------------------------


def _stable_id(name: str) -> int:
    """A field's id: the same name is the same field in every document, as on a configured card."""
    return 1000 + zlib.crc32(name.encode()) % 9000


def _confidence(name: str, value: str) -> float:
    return round(0.9 + zlib.crc32(f"{name}={value}".encode()) % 101 / 1000, 3)


def _color(tag_id: int) -> list[int]:
    return [tag_id * 37 % 256, tag_id * 91 % 256, tag_id * 53 % 256]


def _tag(name: str, value: str, page: int, line: int, offset: int) -> Tag:
    tag_id = _stable_id(name)
    _, (x, y, w, h) = box_for(line, value)
    where = AfterTreatment(data=value, locations=[Location(page_no=page - 1, bboxes=[[x, y, x + w, y + h]], page_size=PAGE_SIZE)])
    return Tag(
        tag_id=tag_id,
        terms_id=tag_id,
        tag_name=name,
        value=value,
        word=value,
        confidence=_confidence(name, value),
        index=offset,
        color=_color(tag_id),
        after_treatment=json.dumps(where.model_dump(mode="json"), ensure_ascii=False),
        ppr=None,
    )


def content_of(pages: list[PageContent]) -> tuple[str, list[list[int]]]:
    """The plain text (``item.content``) and where each page's each line starts in it."""
    starts: list[list[int]] = []
    offset = 0
    for page in pages:
        page_starts = []
        for line in page.lines:
            page_starts.append(offset)
            offset += len(line) + 1
        starts.append(page_starts)
    return "\n".join(line for page in pages for line in page.lines), starts


def build_result(pages: list[PageContent], pdf_path: str) -> ExtractResult:
    """``Key: value`` lines become ``tag_list`` entries; each page's ``|`` table becomes a group."""
    _, starts = content_of(pages)
    tags: list[Tag] = []
    groups: list[RelationGroup] = []
    for page, page_starts in zip(pages, starts):
        for name, value, line in page.fields:
            offset = page_starts[line] + page.lines[line].find(value, page.lines[line].find(":") + 1)
            tags.append(_tag(name, value, page.number, line, offset))
        if page.table:
            groups.append(_table_group(page, page_starts, node_index=len(groups) + 1))
    doc_prob = round(sum(t.confidence or 0 for t in tags) / len(tags), 3) if tags else 1.0
    return ExtractResult(
        status=RESULT_OK_STATUS, doc_prob=doc_prob, pdf_path=pdf_path, fuzzy_tag_list=[], tag_list=tags, relation_extract=groups
    )


def _table_group(page: PageContent, page_starts: list[int], node_index: int) -> RelationGroup:
    """One row of the table is one "card"; its cells are the group's fields."""
    # Table rows are the page's lines with two or more "|" after the header (as documents.analyse reads them).
    row_lines = [i for i, line in enumerate(page.lines) if line.count("|") >= 2][1:]
    rows = []
    for row, line in zip(page.table, row_lines):
        fields = [
            RelationField(
                id=_stable_id(column),
                name=column,
                type="tag",
                value=[_tag(column, cell, page.number, line, page_starts[line] + page.lines[line].find(cell))],
            )
            for column, cell in row.items()
        ]
        rows.append(RelationRow(children=fields, confidence=1.0, type="card"))
    name = f"表格{node_index}"
    return RelationGroup(id=_stable_id(f"group:{name}"), name=name, node_index=node_index, type="group", children=rows)


def render_highlight(pages: list[PageContent]) -> bytes:
    """The document's text with every recognised field line highlighted: a real, parseable PDF."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    width, height = A4
    for page in pages:
        marked = {line for _, _, line in page.fields}
        y = height - 72
        for index, line in enumerate(page.lines):
            if y < 72:
                pdf.showPage()
                y = height - 72
            if index in marked:
                pdf.setFillColorRGB(1.0, 0.92, 0.3)
                pdf.rect(66, y - 4, width - 132, 16, stroke=0, fill=1)
            pdf.setFillColorRGB(0, 0, 0)
            pdf.setFont("Helvetica" if line.isascii() else CJK_FONT, 11)
            pdf.drawString(72, y, line)
            y -= 18
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


# --- the emulator ---------------------------------------------------------------------------


class IdpEmulator(Emulator):
    config: Config

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.extracts: dict[int, Extract] = {}
        self.downloads: dict[str, int] = {}  # download key -> extract id
        self.failures: dict[str, int] = {}  # username -> consecutive failed logins
        self.locked_until: dict[str, float] = {}
        self.token_epoch = 0  # bumped by /_emulator/expire_tokens: older tokens answer 401
        # Distinct number ranges, so a client that confuses the two ids fails at once.
        self.extract_ids = count(10_000_001)
        self.task_ids = count(1)

    def reset(self) -> None:
        """Also forget failed logins and lock-outs: they are this provider's limit state."""
        super().reset()
        self.failures.clear()
        self.locked_until.clear()

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        self.extra_stats["tasks"] = {
            "created": len(self.extracts),
            "running": sum(1 for e in self.extracts.values() if now < e.ready_at),
        }
        self.extra_stats["locked_users"] = sum(1 for until in self.locked_until.values() if now < until)
        return super().snapshot()

    async def expire_tokens(self, request: Request) -> JSONResponse:
        """Make every issued token stale at once, as if its lifetime had passed."""
        self.token_epoch += 1
        return JSONResponse({"epoch": self.token_epoch})

    # -- the gate: faults, auth -------------------------------------------------------------

    async def _gate(self, request: Request, endpoint: str, failure_message: str, authenticate: bool = True) -> None:
        """Count the arrival, then raise what a failing proxy, a bad token or a failing backend answers."""
        stats = self.arrive(endpoint)
        faults = self.config.faults
        if self.roll(faults.http_5xx_rate):
            stats.faults_injected += 1
            raise Refused(_gateway_error(self.rng.choice([502, 503, 504])))
        if authenticate and not self._authorized(request):
            raise _refuse(401, UNAUTHORIZED)
        if self.roll(faults.internal_error_rate):
            stats.faults_injected += 1
            raise _refuse(500, failure_message)
        await self.maybe_slow(endpoint)

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        try:
            claims = jwt.decode(token.strip(), self.config.jwt_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return False
        return claims.get("type") == "access" and claims.get("epoch") == self.token_epoch

    def _token(self, kind: str, lifetime: float) -> str:
        now = time.time()
        claims = {
            "sub": str(self.config.user_id),
            "username": self.config.username,
            "type": kind,
            "epoch": self.token_epoch,
            "jti": secrets.token_hex(8),
            "iat": int(now),
            "exp": int(now + lifetime),
        }
        return jwt.encode(claims, self.config.jwt_secret, algorithm="HS256")

    # -- login ------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        try:
            await self._gate(request, "login", LOGIN_FAILED, authenticate=False)
            try:
                body = LoginRequest.model_validate_json(await request.body())
                username, password = _b64_text(body.username), _b64_text(body.password)
            except (ValidationError, ValueError):
                raise _refuse(422, VALIDATION_ERROR) from None
            self._check_credentials(username, password, time.time())
        except Refused as refusal:
            return refusal.response
        self.accept("login")
        return _answer(
            LoginResponse(
                status=200,
                message=LOGIN_OK,
                access_token=self._token("access", self.config.token_expires_in),
                refresh_token=self._token("refresh", self.config.refresh_token_expires_in),
                user_id=self.config.user_id,
                nickname=self.config.nickname,
                need_update_password=self.config.need_update_password,
            )
        )

    def _check_credentials(self, username: str, password: str, now: float) -> None:
        """A locked username is refused even with the right password; disabled users are refused outright."""
        until = self.locked_until.get(username)
        if until is not None and now < until:
            raise _refuse(400, LOGIN_LOCKED)
        self.locked_until.pop(username, None)
        if username in self.config.disabled_users:
            raise _refuse(400, USER_DISABLED)
        if (username, password) != (self.config.username, self.config.password):
            failures = self.failures.get(username, 0) + 1
            if failures >= self.config.login_max_failures:
                self.locked_until[username] = now + self.config.login_lock_seconds
                failures = 0
            self.failures[username] = failures
            raise _refuse(400, BAD_CREDENTIALS)
        self.failures.pop(username, None)

    # -- task creation ----------------------------------------------------------------------

    async def create_task(self, request: Request) -> Response:
        try:
            await self._gate(request, "task", TASK_FAILED)
            query = _task_query(request)
            uploads = await _uploads(request)
            if not query.async_task and len(uploads) > 1:
                raise _refuse(400, SYNC_ONE_FILE)
            documents = [await self._accept_file(upload) for upload in uploads]
        except Refused as refusal:
            return refusal.response
        task_id = next(self.task_ids)
        extracts = [self._new_extract(task_id, name, data, fmt, query) for name, data, fmt in documents]
        self.accept("task")
        if query.async_task:
            return _answer(
                CreateTaskResponse(
                    status=200,
                    message=TASK_CREATED,
                    ids=[e.id for e in extracts],
                    items=[self._task_item(e) for e in extracts],
                    total=len(extracts),
                ),
                exclude=SYNC_ONLY,
            )
        return await self._finish_sync(extracts[0])

    async def _accept_file(self, upload: UploadFile) -> tuple[str, bytes, str]:
        """The upload's name, bytes and format, or the documented refusal for a bad or oversized file."""
        data = await upload.read()
        fmt = sniff_format(data[:HEAD_BYTES])
        if not data or fmt not in self.config.accepted_formats:
            raise _refuse(400, ILLEGAL_FILE)
        if len(data) > self.config.max_file_bytes:
            raise _refuse(400, OVER_LIMIT)
        try:
            pages = await asyncio.to_thread(page_count, data, fmt)
        except Exception:  # noqa: BLE001 - pypdf and Pillow raise many kinds for a corrupt file
            raise _refuse(400, ILLEGAL_FILE) from None
        if pages > self.config.max_pages:
            raise _refuse(400, OVER_LIMIT)
        return upload.filename or f"document.{FORMAT_EXTENSIONS[fmt]}", data, fmt

    def _new_extract(self, task_id: int, name: str, data: bytes, fmt: str, query: TaskQuery) -> Extract:
        now = time.time()
        duration = self.rng.uniform(self.config.processing_min, self.config.processing_max)
        final: int = ExtractStatus.PRELABEL_SUCCEEDED
        if self.roll(self.config.failure_rate):
            final = self.rng.choice(self.config.failure_statuses)
        extract = Extract(
            id=next(self.extract_ids),
            task_id=task_id,
            origin_name=name,
            unique_name=f"{self.rng.getrandbits(128):032x}.{FORMAT_EXTENSIONS[fmt]}",
            data=data,
            fmt=fmt,
            query=query,
            created=now,
            steps=timeline(now, duration, final),
        )
        self.extracts[extract.id] = extract
        return extract

    def _task_item(self, extract: Extract, result: ExtractResult | None = None) -> TaskItem:
        return TaskItem(
            id=extract.id,
            extract_task_id=extract.task_id,
            origin_name=extract.origin_name,
            unique_name=extract.unique_name,
            create_time=_stamp(extract.created),
            last_update_time=_stamp(extract.created),
            extract_version=EXTRACT_VERSION,
            idps_version=IDPS_VERSION,
            is_saved_by_business=False,
            relation_extract_result=result,
        )

    async def _finish_sync(self, extract: Extract) -> Response:
        """A synchronous task answers once the document is done: its result, or 创建任务失败."""
        await asyncio.sleep(max(0.0, extract.ready_at - time.time()))
        item = await self._item(extract, time.time())
        if item.status not in SUCCEEDED:
            return _refuse(500, TASK_FAILED).response
        return _answer(
            CreateTaskResponse(
                status=200,
                message=TASK_CREATED,
                ids=[extract.id],
                items=[self._task_item(extract, item.result)],
                total=1,
                name=extract.origin_name,
                content=item.content,
                result=item.result,
            )
        )

    # -- results ----------------------------------------------------------------------------

    async def get_result(self, request: Request) -> Response:
        try:
            await self._gate(request, "result", RESULT_FAILED)
            extract = self._lookup(request)
        except Refused as refusal:
            return refusal.response
        item = await self._item(extract, time.time())
        self.accept("result")
        return _answer(GetResultResponse(code=200, status=200, message=RESULT_OK, item=item))

    def _lookup(self, request: Request) -> Extract:
        extract = self.extracts.get(request.path_params["extract_id"])
        if extract is None:
            raise _refuse(404, EXTRACT_NOT_FOUND)
        return extract

    async def _analysed(self, extract: Extract) -> list[PageContent]:
        if extract.pages is None:
            extract.pages = await asyncio.to_thread(analyse, extract.data, extract.fmt)
        return extract.pages

    async def _item(self, extract: Extract, now: float) -> ExtractItem:
        status, since = extract.state(now)
        content, result = "", None
        if status in TEXT_READY:
            pages = await self._analysed(extract)
            content = content_of(pages)[0]
            if status in SUCCEEDED:
                result = build_result(pages, pdf_path=f"/data/files/{extract.unique_name.rsplit('.', 1)[0]}.pdf")
            elif status == ExtractStatus.PRELABEL_FAILED:
                result = ExtractResult(status=RESULT_ERROR_STATUS, fuzzy_tag_list=[], tag_list=[], relation_extract=[])
        return ExtractItem(
            id=extract.id,
            extract_task_id=extract.task_id,
            origin_name=extract.origin_name,
            unique_name=extract.unique_name,
            name=extract.origin_name,
            doc_name=extract.origin_name,
            doc_type=DOC_TYPE_ELECTRONIC if extract.fmt == "pdf" else DOC_TYPE_IMAGE,
            status=status,
            status_name=STATUS_NAMES[status],
            content=content,
            result=result,
            create_time=_stamp(extract.created),
            last_update_time=_stamp(since),
            extract_version=EXTRACT_VERSION,
            idps_version=IDPS_VERSION,
            language=extract.query.language,
            tag_type_id=extract.query.feature_type_id,
            is_saved_by_business=False,
            feedback=False,
            enable_img_render=extract.fmt != "pdf",
            support_img_render_selection=extract.fmt != "pdf",
            shortcut=[],
        )

    # -- highlight export -------------------------------------------------------------------

    async def export_highlight(self, request: Request) -> Response:
        try:
            await self._gate(request, "highlight", HIGHLIGHT_FAILED)
            extract = self._lookup(request)
            if extract.state(time.time())[0] not in SUCCEEDED:
                raise _refuse(400, HIGHLIGHT_NOT_READY)
        except Refused as refusal:
            return refusal.response
        if extract.download_key is None:
            extract.download_key = f"{self.rng.getrandbits(96):024x}"
            self.downloads[extract.download_key] = extract.id
        stem = extract.origin_name.rsplit(".", 1)[0] or "document"
        url = str(request.url_for("highlight_file", key=extract.download_key))
        self.accept("highlight")
        return _answer(
            HighlightResponse(
                code=200, status=200, message=HIGHLIGHT_OK, item=HighlightItem(file_name=f"{stem}_highlight.pdf", url=url)
            )
        )

    async def download_highlight(self, request: Request) -> Response:
        """The export's download URL: unguessable rather than authenticated, like a file server's link."""
        self.arrive("download")
        extract = self.extracts.get(self.downloads.get(request.path_params["key"], -1))
        if extract is None:
            return Response("Not Found", status_code=404, media_type="text/plain")
        if extract.highlight is None:
            extract.highlight = await asyncio.to_thread(render_highlight, await self._analysed(extract))
        self.accept("download")
        stem = extract.origin_name.rsplit(".", 1)[0] or "document"
        disposition = f"attachment; filename*=UTF-8''{quote(stem + '_highlight.pdf')}"
        return Response(extract.highlight, media_type="application/pdf", headers={"Content-Disposition": disposition})


def _task_query(request: Request) -> TaskQuery:
    params = request.query_params
    scalars = ("async_task", "feature_type_id", "language", "task_name")
    raw: dict[str, Any] = {key: params[key] for key in scalars if key in params}
    raw["file_types"] = params.getlist("file_types")
    try:
        return TaskQuery.model_validate(raw)
    except ValidationError:
        raise _refuse(422, VALIDATION_ERROR) from None


async def _uploads(request: Request) -> list[UploadFile]:
    """The multipart ``files`` (one or more) after checking the ``callback_args`` form field."""
    try:
        form = await request.form()
    except HTTPException:  # a malformed multipart body
        raise _refuse(422, VALIDATION_ERROR) from None
    parts = form.getlist("files")
    uploads = [part for part in parts if isinstance(part, UploadFile)]
    if not uploads or len(uploads) != len(parts):
        raise _refuse(422, VALIDATION_ERROR)
    callback_args = form.get("callback_args")
    if callback_args is not None:
        try:
            parse_callback_args(str(callback_args))
        except ValueError:
            raise _refuse(422, VALIDATION_ERROR) from None
    return uploads


def _int_id(path: str) -> str:
    """Extract ids are integers: ``/extracting/v2/task`` must not match the result route."""
    return path.replace("{extract_id}", "{extract_id:int}")


def create_app(config: Config) -> Starlette:
    emulator = IdpEmulator(config)
    api_routes = []
    for prefix in API_PREFIXES:
        api_routes += [
            Route(prefix + TASK_PATH, emulator.create_task, methods=["POST"]),
            Route(prefix + _int_id(RESULT_PATH), emulator.get_result, methods=["GET"]),
            Route(prefix + _int_id(HIGHLIGHT_PATH), emulator.export_highlight, methods=["GET"]),
        ]
    routes = [
        Route(LOGIN_PATH, emulator.login, methods=["POST"]),
        *api_routes,
        Route("/download/highlight/{key}.pdf", emulator.download_highlight, methods=["GET"], name="highlight_file"),
        Route("/_emulator/expire_tokens", emulator.expire_tokens, methods=["POST"]),
        *emulator.control_routes(),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = emulator
    return app
