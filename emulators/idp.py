"""The idp document-extraction platform, emulated: JWT login, multipart task creation,
status polling, and the highlighted-PDF export.

Faithful to seed 000: every answer carries ``status`` (the HTTP code) and the seed's
Chinese ``message``; logins lock out after repeated failures; access tokens are HS256 JWTs
that expire and then answer 401 (no refresh endpoint is known, so clients log in again);
each document walks through the documented status codes (0 → 6 → 3 → 7 → its end: 5 by
default, or a failure 2, 4 or 20001) over a processing time drawn per document.

The emulator reads seed 000 on its own (nothing here comes from ``pipeline``): it is the
referee of the client, and a reading both shared could never be caught. Where the seed's
tables and its examples disagree it answers as the examples do, and ``Config`` offers the
tables' reading: the task, result and highlight routes live under ``api_prefix`` only
(the examples call ``/extracting/...``, the URL tables ``/api/extracting/...``), and
anything else answers the plain 404 of a web server.

One document can ask for a misbehaviour of its own, leaving the rest of a batch alone: a
line ``EMULATE: <behaviour> [argument]`` in its recognised text (a PDF's text layer, a
PNG's ``docpipe:text`` chunk; see ``emulators.documents``), read when the file is uploaded:

- ``EMULATE: refuse <message>``: the task creation answers HTTP 400
  ``{"status": 400, "message": <message>}`` (the seed's own messages are
  上传文件包含不合法文件,上传失败! and 文件大小或页数超过上限; without a message, the first).
  As for any bad file, the whole upload is refused and no task is created.
- ``EMULATE: fail <status>``: the extraction walks the documented steps and ends at that
  failure status (2, 4 or 20001; any other integer is taken as written; without one, 2).
- ``EMULATE: not-json``: the result endpoint answers the extract with HTTP 200 and an HTML
  page, as a broken proxy does.
- ``EMULATE: bad-shape``: the result endpoint answers the extract with HTTP 200 JSON
  ``{"code": 200, "status": 200, "message": ...}`` and no ``item``.

Any other directive is ignored. Directed answers count in the statistics' ``directives``
and as ``faults_injected`` of their endpoint (``task`` or ``result``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from itertools import count
from typing import Annotated, Any, Literal
from urllib.parse import quote

import jwt
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pypdf import PdfReader, PdfWriter
from reportlab.lib.pagesizes import A4
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfgen import canvas
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from emulators.common import DroppedConnection, Emulator, EmulatorApp, EmulatorConfig, ProcessingModel, TaskRecord
from emulators.documents import PageContent, analyse, box_for, directive, int_argument
from emulators.formats import kind_of, suffix_for

# --- what seed 000 fixes ----------------------------------------------------------------------

LOGIN_ROUTE = "/auth/login"  # line 29; no "/api" in either reading
# Relative to ``Config.api_prefix``: lines 136, 261, 438 (tables) vs 209, 399, 476 (examples).
API_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"/extracting/v2/task"), "create_task"),
    ("GET", re.compile(r"/extracting/v2/(?P<extract_id>\d+)"), "get_result"),
    ("GET", re.compile(r"/extracting/v2/(?P<extract_id>\d+)/export/highlight"), "export_highlight"),
)

# Messages of the seed's status tables: login (lines 17-23) and task creation (119-125).
MSG_LOGIN_OK = "登入成功"
MSG_LOGIN_FAILED = "登入失败"
MSG_INVALID = "参数校验出错"
MSG_LOCKED = "登入失败次数太多，请稍后重试"
MSG_BAD_PASSWORD = "用户名或密码错误"
MSG_DISABLED = "用户已禁用"
MSG_CREATED = "创建任务成功"
MSG_CREATE_FAILED = "创建任务失败"
MSG_SYNC_SINGLE = "同步任务只允许上传一份文件"
MSG_BAD_FILE = "上传文件包含不合法文件,上传失败!"
MSG_TOO_BIG = "文件大小或页数超过上限"
# The seed has no table for these: the emulator's choices.
MSG_UNAUTHORIZED = "未登录或登录已失效"
MSG_RESULT_OK = "获取抽取结果成功"
MSG_RESULT_FAILED = "获取抽取结果失败"
MSG_NO_SUCH_EXTRACT = "抽取记录不存在"
MSG_EXPORT_OK = "导出成功"
MSG_EXPORT_FAILED = "导出高亮文件失败"
MSG_EXPORT_NOT_READY = "文档未抽取成功，无法导出"
# Seed 000 documents no rate limit and no answer for one; ``faults.spurious_limit_rate`` needs
# one, so it is the usual HTTP 429 in the error shape of the seed's tables.
MSG_TOO_FAST = "请求过于频繁"

# item.status, line 333, with its words.
UNPROCESSED, TEXT_FAILED, TEXT_DONE, PRELABEL_FAILED, PRELABEL_DONE = 0, 2, 3, 4, 5
CONVERTING, EXTRACTING, REVIEWED, FILE_CHECK_FAILED = 6, 7, 8, 20001
STATUS_WORDS = {
    UNPROCESSED: "未处理",
    TEXT_FAILED: "文本转换失败",
    TEXT_DONE: "文本转换成功",
    PRELABEL_FAILED: "预标注失败",
    PRELABEL_DONE: "预标注成功",
    CONVERTING: "文档转换中",
    EXTRACTING: "抽取中",
    FILE_CHECK_FAILED: "文件检查失败",
    REVIEWED: "已审核",
}
# The documented way to the end, and when (as a share of the processing time) each step begins.
WALK = ((0.0, UNPROCESSED), (0.1, CONVERTING), (0.4, TEXT_DONE), (0.5, EXTRACTING))
# How far along WALK each failure gets: a file check fails before conversion starts, and so on.
FAILS_AFTER = {FILE_CHECK_FAILED: 1, TEXT_FAILED: 2, PRELABEL_FAILED: len(WALK)}
TEXT_STATUSES = frozenset({TEXT_DONE, EXTRACTING, PRELABEL_FAILED})  # conversion done: item.content exists

ELECTRONIC, SCANNED = 1, 2  # file_types / doc_type, lines 152 and 306
EXTRACT_VERSION, IDPS_VERSION = 2, 3
PAGE_POINTS = [595.0, 842.0]  # A4, the unit after_treatment locations are measured in
CJK_FONT = "STSong-Light"
pdfmetrics.registerFont(UnicodeCIDFont(CJK_FONT))


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
    processing: ProcessingModel = ProcessingModel()  # by size, for the polling benchmark
    failure_rate: float = 0.0
    failure_statuses: list[int] = [TEXT_FAILED, PRELABEL_FAILED, FILE_CHECK_FAILED]
    # Where the seed's tables and its examples disagree, the examples are the default (they are
    # what the service answered when they were captured); the other value is the tables' reading.
    # Task/result/highlight paths: the examples call "/extracting/...", the URL tables "/api/extracting/...".
    api_prefix: str = ""
    # Login body: the python example (lines 80-81) sends base64 of each value, the curl one (88-89) plain text.
    login_encoding: Literal["base64", "plain"] = "base64"
    # The result item's file type: the table (306-307) has both spellings, docType marked deprecated.
    doc_type_key: Literal["doc_type", "docType"] = "doc_type"
    # The status a successful document ends in (5 预标注成功; 8 已审核, 3 文本转换成功 for a text-only
    # end, or one the seed does not list); the documented steps before it are walked first.
    success_status: int = PRELABEL_DONE


class Refused(Exception):
    """A request answered early: in the provider's error shape, or as its failing proxy answers."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _refuse(http_status: int, message: str) -> Refused:
    """Every documented failure: ``status`` repeats the HTTP code, ``message`` is the table's text."""
    return Refused(JSONResponse({"status": http_status, "message": message}, status_code=http_status))


# What a misconfigured front server answers with HTTP 200 in place of the API (``EMULATE: not-json``).
BROKEN_PAGE = "<html><head><title>Welcome to nginx!</title></head><body><h1>Welcome to nginx!</h1></body></html>"


def _proxy_page(code: int) -> HTMLResponse:
    """What the platform's front web server answers itself (a backend down, a path it does not route): HTML."""
    title = f"{code} {HTTPStatus(code).phrase}"
    page = f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center><hr><center>nginx</center></body></html>"
    return HTMLResponse(page, code)


# --- requests as the seed describes them -------------------------------------------------------


class LoginBody(BaseModel):
    """Lines 42-47: username and password required, an optional verification object."""

    model_config = ConfigDict(extra="allow")

    username: str
    password: str
    verification: dict[str, Any] | None = None


class TaskParams(BaseModel):
    """The query string of a task creation, lines 147-154 (``file_types`` repeats: ``file_types=1&file_types=2``)."""

    async_task: bool  # "async_task不允许为空"
    feature_type_id: int  # 卡片 ID, marked True (required)
    file_types: list[Annotated[int, Field(ge=ELECTRONIC, le=SCANNED)]] = []  # "1: 电子文档, 2: 图像文档" only
    language: str | None = None
    task_name: str | None = None


@dataclass
class Extract:
    """One uploaded document and where it stands; ``steps`` is its whole timeline, fixed at upload."""

    id: int
    task_id: int
    origin_name: str
    unique_name: str
    data: bytes
    fmt: str
    params: TaskParams
    created: float
    steps: list[tuple[float, int]]  # (time.time() the status starts, status)
    succeeds: bool  # whether the last step is this document's successful end
    answer: str = ""  # a directed result answer: "not-json" or "bad-shape"
    pages: list[PageContent] | None = None  # analysed on first need
    highlight: bytes | None = None  # rendered on first download
    download_key: str | None = None
    record: TaskRecord | None = None

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

    def finished_well(self, now: float) -> bool:
        return self.succeeds and now >= self.ready_at


def _unbase64(value: str) -> str:
    """Base64 of UTF-8 text, as ``base64.b64encode(b'username').decode()`` makes it (line 80)."""
    return base64.b64decode(value, validate=True).decode("utf-8")


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone(timedelta(hours=8))).strftime("%Y-%m-%d %H:%M:%S")


def plan(created: float, duration: float, final: int, succeeds: bool) -> list[tuple[float, int]]:
    """The steps of one document: the documented walk up to its end, then the end itself."""
    if succeeds:
        walked = [status for _, status in WALK]
        steps = list(WALK[: walked.index(final)]) if final in walked else list(WALK)
    else:
        steps = list(WALK[: FAILS_AFTER.get(final, len(WALK))])
    return [(created + share * duration, status) for share, status in steps] + [(created + duration, final)]


def page_count(data: bytes, fmt: str) -> int:
    if fmt == "pdf":
        return len(PdfReader(io.BytesIO(data)).pages)
    with Image.open(io.BytesIO(data)) as image:
        return getattr(image, "n_frames", 1)


# --- the recognised content, shaped as the seed's result example (lines 349-389) ---------------


def _field_id(name: str) -> int:
    """The same name is the same field in every document, as on a configured card."""
    return 1000 + zlib.crc32(name.encode()) % 9000


def _tag(name: str, value: str, page: int, line: int, offset: int) -> dict[str, Any]:
    """One tag_list entry, keys as the example lists them; ``index`` is the value's offset in item.content.

    The example's ``after_treatment`` is null; platforms that locate values put a JSON text
    there (public clients read ``locations`` from it), so the emulator does.
    """
    tag_id = _field_id(name)
    _, (x, y, w, h) = box_for(line, value)
    located = {"data": value, "locations": [{"page_no": page - 1, "bboxes": [[x, y, x + w, y + h]], "page_size": PAGE_POINTS}]}
    checksum = zlib.crc32(f"{name}={value}".encode())
    return {
        "after_treatment": json.dumps(located, ensure_ascii=False),
        "color": [tag_id * 37 % 256, tag_id * 91 % 256, tag_id * 53 % 256],
        "confidence": round(0.9 + checksum % 101 / 1000, 3),
        "index": offset,
        "ppr": None,
        "tag_id": tag_id,
        "tag_name": name,
        "terms_id": tag_id,
        "value": value,
        "word": value,
    }


def content_of(pages: list[PageContent]) -> tuple[str, list[list[int]]]:
    """The plain text (``item.content``) and where each page's each line starts in it."""
    text_lines: list[str] = []
    starts: list[list[int]] = []
    cursor = 0
    for page in pages:
        here = []
        for line in page.lines:
            here.append(cursor)
            text_lines.append(line)
            cursor += len(line) + 1
        starts.append(here)
    return "\n".join(text_lines), starts


def extraction(pages: list[PageContent], pdf_path: str) -> dict[str, Any]:
    """``Key: value`` lines become ``tag_list`` entries; each page's ``|`` table becomes a group."""
    _, starts = content_of(pages)
    tags: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    for page, line_starts in zip(pages, starts):
        for name, value, line in page.fields:
            text = page.lines[line]
            tags.append(_tag(name, value, page.number, line, line_starts[line] + text.find(value, text.find(":") + 1)))
        if page.table:
            groups.append(_group(page, line_starts, len(groups) + 1))
    doc_prob = round(sum(tag["confidence"] for tag in tags) / len(tags), 3) if tags else 1.0
    return {
        "status": "OK",  # "成功"OK", 失败"ERROR""
        "doc_prob": doc_prob,
        "pdf_path": pdf_path,
        "fuzzy_tag_list": [],
        "tag_list": tags,
        "relation_extract": groups,
    }


def _group(page: PageContent, line_starts: list[int], node_index: int) -> dict[str, Any]:
    """A table as relation_extract nests it: group → one "card" per row → one "tag" field per cell."""
    # The table's rows are the page's "|" lines after the header, as documents.analyse reads them.
    row_lines = [i for i, line in enumerate(page.lines) if line.count("|") >= 2][1:]
    cards = []
    for row, line in zip(page.table, row_lines):
        cells = []
        for column, cell in row.items():
            offset = line_starts[line] + page.lines[line].find(cell)
            cells.append({"id": _field_id(column), "name": column, "type": "tag", "value": [_tag(column, cell, page.number, line, offset)]})
        cards.append({"children": cells, "confidence": 1.0, "type": "card"})
    name = f"表格{node_index}"
    return {"children": cards, "id": _field_id(f"group:{name}"), "name": name, "node_index": node_index, "type": "group"}


def render_highlight(pages: list[PageContent], source: bytes = b"", fmt: str = "") -> bytes:
    """The document itself with every recognised field line marked, as a platform's highlighted
    export is: a PDF source keeps its own pages (so the export is about as large as the upload),
    any other source is drawn as its text. Either way a real, parseable PDF."""
    if fmt == "pdf":
        try:
            return _highlight_pdf(pages, source)
        except Exception:  # noqa: BLE001 - a PDF pypdf cannot rewrite is drawn as text instead
            pass
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


def _highlight_pdf(pages: list[PageContent], source: bytes) -> bytes:
    """Each source page with a translucent mark over the lines that hold a field."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(source)))
    for page, content in zip(writer.pages, pages):
        if not content.fields:
            continue
        width, height = float(page.mediabox.width), float(page.mediabox.height)
        buffer = io.BytesIO()
        overlay = canvas.Canvas(buffer, pagesize=(width, height))
        overlay.setFillColorRGB(1.0, 0.92, 0.3)
        overlay.setFillAlpha(0.35)
        for _, _, line in content.fields:
            overlay.rect(48, height - 76 - 18 * line, width - 96, 16, stroke=0, fill=1)
        overlay.save()
        page.merge_page(PdfReader(buffer).pages[0])
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


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

    def timelines(self) -> dict[str, Any]:
        return self.task_records((e.record for e in self.extracts.values()))

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

    # -- routing under the configured prefix --------------------------------------------------

    async def unrouted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every path no fixed route takes: the API under ``api_prefix`` (read per request, so a
        test may switch readings at run time), else the web server's own 404."""
        request = Request(scope, receive)
        response = await self._api(request)
        await response(scope, receive, send)

    async def _api(self, request: Request) -> Response:
        prefix = self.config.api_prefix.rstrip("/")
        path = request.scope["path"]
        if path.startswith(prefix + "/"):
            relative = path[len(prefix) :]
            for method, pattern, handler in API_ROUTES:
                match = pattern.fullmatch(relative)
                if match is None:
                    continue
                if request.method != method and not (method == "GET" and request.method == "HEAD"):
                    return _proxy_page(405)
                return await getattr(self, handler)(request, **{k: int(v) for k, v in match.groupdict().items()})
        self.arrive("unrouted", request)
        return _proxy_page(404)

    # -- the gate: faults, auth -------------------------------------------------------------

    async def _gate(self, request: Request, endpoint: str, failure_message: str, authenticate: bool = True) -> None:
        """Count the arrival, then raise what a cut connection, a failing proxy, a bad token, a
        (spurious: the seed has no limit) rate limit or a failing backend answers."""
        stats = self.arrive(endpoint, request)
        faults = self.config.faults
        if self.inject(endpoint, faults.drop_rate):
            raise Refused(DroppedConnection())
        if self.roll(faults.http_5xx_rate):
            stats.faults_injected += 1
            raise Refused(_proxy_page(self.rng.choice([502, 503, 504])))
        if authenticate and not self._authorized(request):
            raise _refuse(401, MSG_UNAUTHORIZED)
        if self.inject(endpoint, faults.spurious_limit_rate):
            raise _refuse(429, MSG_TOO_FAST)
        if self.roll(faults.internal_error_rate):
            stats.faults_injected += 1
            raise _refuse(500, failure_message)
        await self.maybe_slow(endpoint, request)

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")  # lines 145, 275, 452
        if scheme.lower() != "bearer" or not token.strip():
            return False
        try:
            claims = jwt.decode(token.strip(), self.config.jwt_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return False
        fresh = claims.get("epoch") == self.token_epoch and claims.get("generation") == self.token_generation()
        return claims.get("type") == "access" and fresh

    def _token(self, kind: str, lifetime: float) -> str:
        now = time.time()
        claims = {
            "sub": str(self.config.user_id),
            "username": self.config.username,
            "type": kind,
            "epoch": self.token_epoch,
            "generation": self.token_generation(now),  # faults.token_expiry_every
            "jti": secrets.token_hex(8),
            "iat": int(now),
            "exp": int(now + lifetime),
        }
        return jwt.encode(claims, self.config.jwt_secret, algorithm="HS256")

    # -- login ------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        try:
            await self._gate(request, "login", MSG_LOGIN_FAILED, authenticate=False)
            username, password = self._credentials(await request.body())
            self._check_credentials(username, password, time.time())
        except Refused as refusal:
            return refusal.response
        self.accept("login")
        return JSONResponse(
            {  # the response table, lines 58-65
                "access_token": self._token("access", self.config.token_expires_in),
                "message": MSG_LOGIN_OK,
                "need_update_password": self.config.need_update_password,
                "nickname": self.config.nickname,
                "refresh_token": self._token("refresh", self.config.refresh_token_expires_in),
                "status": 200,
                "user_id": self.config.user_id,
            }
        )

    def _credentials(self, raw: bytes) -> tuple[str, str]:
        """Username and password as the configured example sends them; anything else is 参数校验出错."""
        try:
            body = LoginBody.model_validate_json(raw)
            if self.config.login_encoding == "plain":
                return body.username, body.password
            return _unbase64(body.username), _unbase64(body.password)
        except (ValidationError, ValueError):
            raise _refuse(422, MSG_INVALID) from None

    def _check_credentials(self, username: str, password: str, now: float) -> None:
        """A locked username is refused even with the right password; disabled users are refused outright."""
        until = self.locked_until.get(username)
        if until is not None and now < until:
            raise _refuse(400, MSG_LOCKED)
        self.locked_until.pop(username, None)
        if username in self.config.disabled_users:
            raise _refuse(400, MSG_DISABLED)
        if (username, password) != (self.config.username, self.config.password):
            failures = self.failures.get(username, 0) + 1
            if failures >= self.config.login_max_failures:
                self.locked_until[username] = now + self.config.login_lock_seconds
                failures = 0
            self.failures[username] = failures
            raise _refuse(400, MSG_BAD_PASSWORD)
        self.failures.pop(username, None)

    # -- task creation ----------------------------------------------------------------------

    async def create_task(self, request: Request) -> Response:
        try:
            await self._gate(request, "task", MSG_CREATE_FAILED)
            params = _task_params(request)
            uploads = await _uploads(request)
            if not params.async_task and len(uploads) > 1:
                raise _refuse(400, MSG_SYNC_SINGLE)
            documents = [await self._accept_file(upload) for upload in uploads]
        except Refused as refusal:
            return refusal.response
        task_id = next(self.task_ids)
        extracts = [self._new_extract(task_id, name, data, fmt, params, found) for name, data, fmt, found in documents]
        self.accept("task")
        for _, data, _, _ in documents:
            await self.record_document(data)
        if not params.async_task:
            return await self._finish_sync(extracts[0])
        items = [self._task_item(e) for e in extracts]
        if self.malformed_accept("task"):
            # The required origin_name and unique_name (lines 198, 200) left out; id stays.
            del items[0]["origin_name"], items[0]["unique_name"]
        body = {"ids": [e.id for e in extracts], "message": MSG_CREATED, "status": 200, "items": items, "total": len(extracts)}
        return JSONResponse(body)

    async def _accept_file(self, upload: UploadFile) -> tuple[str, bytes, str, tuple[str, str] | None]:
        """The upload's name, bytes, format and directive, or the documented refusal for a bad or
        oversized file (or one whose directive asks for a refusal)."""
        data = await upload.read()
        fmt = kind_of(data)
        if not data or fmt not in self.config.accepted_formats:
            raise _refuse(400, MSG_BAD_FILE)
        if len(data) > self.config.max_file_bytes:
            raise _refuse(400, MSG_TOO_BIG)
        try:
            pages = await asyncio.to_thread(page_count, data, fmt)
        except Exception:  # noqa: BLE001 - pypdf and Pillow raise many kinds for a corrupt file
            raise _refuse(400, MSG_BAD_FILE) from None
        if pages > self.config.max_pages:
            raise _refuse(400, MSG_TOO_BIG)
        found = await asyncio.to_thread(directive, data, fmt)
        if found is not None and found[0] == "refuse":
            self.directed("refuse", "task")
            raise _refuse(400, found[1] or MSG_BAD_FILE)
        return upload.filename or f"document.{suffix_for(fmt)}", data, fmt, found

    def _new_extract(
        self, task_id: int, name: str, data: bytes, fmt: str, params: TaskParams, found: tuple[str, str] | None = None
    ) -> Extract:
        now = time.time()
        duration = self.config.processing.draw(self.rng, len(data), self.config.processing_min, self.config.processing_max)
        succeeds = not self.roll(self.config.failure_rate)
        final = self.config.success_status if succeeds else self.rng.choice(self.config.failure_statuses)
        behaviour, argument = found or ("", "")
        if behaviour == "fail":
            self.directed("fail")
            succeeds, final = False, int_argument(argument) or TEXT_FAILED
        extract = Extract(
            id=next(self.extract_ids),
            task_id=task_id,
            origin_name=name,
            unique_name=f"{self.rng.getrandbits(128):032x}.{suffix_for(fmt)}",
            data=data,
            fmt=fmt,
            params=params,
            created=now,
            steps=plan(now, duration, final, succeeds),
            succeeds=succeeds,
            answer=behaviour if behaviour in ("not-json", "bad-shape") else "",
        )
        extract.record = TaskRecord(str(extract.id), now, extract.ready_at)
        self.extracts[extract.id] = extract
        return extract

    def _task_item(self, extract: Extract, result: dict[str, Any] | None = None) -> dict[str, Any]:
        """One ``items[*]`` of a task creation, the fields of lines 186-200."""
        return {
            "create_time": _clock(extract.created),
            "extract_task_id": extract.task_id,
            "extract_version": EXTRACT_VERSION,
            "field_level": None,
            "global_level": None,
            "graph_define_level": None,
            "id": extract.id,
            "idps_version": IDPS_VERSION,
            "is_saved_by_business": False,
            "last_update_time": _clock(extract.created),
            "origin_file": None,
            "origin_name": extract.origin_name,
            "relation_extract_result": result,
            "unique_name": extract.unique_name,
        }

    async def _finish_sync(self, extract: Extract) -> Response:
        """A synchronous task answers once the document is done: its result, or 创建任务失败."""
        await asyncio.sleep(max(0.0, extract.ready_at - time.time()))
        now = time.time()
        if not extract.finished_well(now):
            return _refuse(500, MSG_CREATE_FAILED).response
        item = await self._item(extract, now)
        body = {
            "content": item["content"],
            "ids": [extract.id],
            "items": [self._task_item(extract, item["result"])],
            "message": MSG_CREATED,
            "name": extract.origin_name,
            "result": item["result"],
            "status": 200,
            "total": 1,
        }
        return JSONResponse(body)

    # -- results ----------------------------------------------------------------------------

    async def get_result(self, request: Request, extract_id: int) -> Response:
        try:
            await self._gate(request, "result", MSG_RESULT_FAILED)
            extract = self._lookup(extract_id)
        except Refused as refusal:
            return refusal.response
        if extract.answer == "not-json":
            self.directed("not-json", "result")
            return HTMLResponse(BROKEN_PAGE, 200)
        if extract.answer == "bad-shape":
            self.directed("bad-shape", "result")
            return JSONResponse({"code": 200, "message": MSG_RESULT_OK, "status": 200})
        now = time.time()
        item = await self._item(extract, now)
        self.accept("result")
        if extract.record is not None:
            extract.record.asked(now, now >= extract.ready_at)
        return JSONResponse({"code": 200, "item": item, "message": MSG_RESULT_OK, "status": 200})

    def _lookup(self, extract_id: int) -> Extract:
        extract = self.extracts.get(extract_id)
        if extract is None:
            raise _refuse(404, MSG_NO_SUCH_EXTRACT)
        return extract

    async def _analysed(self, extract: Extract) -> list[PageContent]:
        if extract.pages is None:
            extract.pages = await asyncio.to_thread(analyse, extract.data, extract.fmt)
        return extract.pages

    async def _item(self, extract: Extract, now: float) -> dict[str, Any]:
        """The result item, fields of lines 296-338 (the deprecated ones left out, but for docType)."""
        status, since = extract.state(now)
        done_well = extract.finished_well(now)
        content, result = "", None
        if status in TEXT_STATUSES or (done_well and status not in (UNPROCESSED, CONVERTING)):
            pages = await self._analysed(extract)
            content = content_of(pages)[0]
            if done_well and status not in (TEXT_DONE, EXTRACTING):  # a text-only end has no extraction
                result = extraction(pages, pdf_path=f"/data/files/{extract.unique_name.rsplit('.', 1)[0]}.pdf")
            elif status == PRELABEL_FAILED:
                result = {"status": "ERROR", "doc_prob": None, "pdf_path": None, "fuzzy_tag_list": [], "tag_list": [], "relation_extract": []}
        scanned = extract.fmt != "pdf"
        return {
            "content": content,
            "create_time": _clock(extract.created),
            "doc_name": extract.origin_name,
            self.config.doc_type_key: SCANNED if scanned else ELECTRONIC,
            "enable_img_render": scanned,
            "extract_task_id": extract.task_id,
            "extract_version": EXTRACT_VERSION,
            "feedback": False,
            "field_level": None,
            "global_level": None,
            "graph_define_level": None,
            "id": extract.id,
            "idps_version": IDPS_VERSION,
            "img_path": None,
            "is_saved_by_business": False,
            "language": extract.params.language,
            "last_update_time": _clock(since),
            "name": extract.origin_name,
            "ocr_extract_type": None,
            "origin_file": None,
            "origin_name": extract.origin_name,
            "result": result,
            "rich_content_file_name": None,
            "shortcut": [],
            "status_name": STATUS_WORDS.get(status),
            "status": status,
            "support_img_render_selection": scanned,
            "tag_type_id": extract.params.feature_type_id,
            "unique_name": extract.unique_name,
        }

    # -- highlight export -------------------------------------------------------------------

    async def export_highlight(self, request: Request, extract_id: int) -> Response:
        try:
            await self._gate(request, "highlight", MSG_EXPORT_FAILED)
            extract = self._lookup(extract_id)
            if not extract.finished_well(time.time()):
                raise _refuse(400, MSG_EXPORT_NOT_READY)
        except Refused as refusal:
            return refusal.response
        if extract.download_key is None:
            extract.download_key = f"{self.rng.getrandbits(96):024x}"
            self.downloads[extract.download_key] = extract.id
        stem = extract.origin_name.rsplit(".", 1)[0] or "document"
        url = str(request.url_for("highlight_file", key=extract.download_key))
        self.accept("highlight")
        # Line 465 says only "文件名，下载地址": the emulator spells them file_name and url.
        item = {"file_name": f"{stem}_highlight.pdf", "url": url}
        return JSONResponse({"code": 200, "item": item, "message": MSG_EXPORT_OK, "status": 200})

    async def download_highlight(self, request: Request) -> Response:
        """The export's download URL: unguessable rather than authenticated, like a file server's link."""
        self.arrive("download", request)
        extract = self.extracts.get(self.downloads.get(request.path_params["key"], -1))
        if extract is None:
            return Response("Not Found", status_code=404, media_type="text/plain")
        if extract.highlight is None:
            extract.highlight = await asyncio.to_thread(render_highlight, await self._analysed(extract), extract.data, extract.fmt)
        self.accept("download")
        stem = extract.origin_name.rsplit(".", 1)[0] or "document"
        disposition = f"attachment; filename*=UTF-8''{quote(stem + '_highlight.pdf')}"
        return Response(extract.highlight, media_type="application/pdf", headers={"Content-Disposition": disposition})


def _task_params(request: Request) -> TaskParams:
    query = request.query_params
    given: dict[str, Any] = {name: query[name] for name in ("async_task", "feature_type_id", "language", "task_name") if name in query}
    given["file_types"] = query.getlist("file_types")
    try:
        return TaskParams.model_validate(given)
    except ValidationError:
        raise _refuse(422, MSG_INVALID) from None


async def _uploads(request: Request) -> list[UploadFile]:
    """The multipart ``files`` (one or more, line 159) after checking ``callback_args`` (lines 129-130)."""
    try:
        form = await request.form()
    except HTTPException:  # a malformed multipart body
        raise _refuse(422, MSG_INVALID) from None
    parts = form.getlist("files")
    uploads = [part for part in parts if isinstance(part, UploadFile)]
    if not uploads or len(uploads) != len(parts):
        raise _refuse(422, MSG_INVALID)
    callback_args = form.get("callback_args")
    if callback_args is not None:
        # "callback_args 值必须是 json 序列化后的 object"
        try:
            is_object = isinstance(json.loads(str(callback_args)), dict)
        except ValueError:
            is_object = False
        if not is_object:
            raise _refuse(422, MSG_INVALID)
    return uploads


def create_app(config: Config) -> EmulatorApp:
    emulator = IdpEmulator(config)
    routes = [
        Route(LOGIN_ROUTE, emulator.login, methods=["POST"]),
        Route("/download/highlight/{key}.pdf", emulator.download_highlight, methods=["GET"], name="highlight_file"),
        Route("/_emulator/expire_tokens", emulator.expire_tokens, methods=["POST"]),
        *emulator.control_routes(),
    ]
    app = EmulatorApp(routes=routes)
    app.router.default = emulator.unrouted  # the API routes, under whichever prefix is configured now
    app.state.emulator = emulator
    return app
