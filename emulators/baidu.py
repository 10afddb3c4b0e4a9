"""Baidu iOCR universal recognition, emulated: OAuth token, submit, get_result.

Faithful to seed 002 and Baidu's public conventions: errors are HTTP 200 with
``error_code``; the per-account limits (submit 2 QPS, get_result 10 QPS) answer error 18;
tokens expire and then answer 110/111; files are checked as Baidu documents them.
A spurious limit fault answers the same error 18 to a request within the limit.

One document can ask for a misbehaviour of its own, leaving the rest of a batch alone: a
line ``EMULATE: <behaviour> [argument]`` in its recognised text (a PDF's text layer, a
PNG's ``docpipe:text`` chunk; see ``emulators.documents``), read at submit:

- ``EMULATE: error <code>``: the submit answers that ``error_code`` in the shape of the
  seed's failure example (lines 82-88: ``error_code``, ``error_msg``, ``error_explain``,
  ``log_id``, ``data: null``), the message from ``ERROR_MESSAGES`` or "Unknown error" for a
  code it does not list. No task is created, nothing is accepted or billed.
- ``EMULATE: fail [reason]``: the task is created and ends with ``failed_status`` and that
  ``reason`` (without one, the usual 识别失败:文件内容无法识别).
- ``EMULATE: not-json``: every get_result of the task answers HTTP 200 with an HTML page,
  as a broken gateway does.
- ``EMULATE: bad-shape``: every get_result of the task answers HTTP 200 JSON with
  ``error_code`` 0 and no ``task_result``.

Any other directive, or ``error`` without a non-zero integer, is ignored. Directed answers
count in the statistics' ``directives`` and as ``faults_injected`` of their endpoint.

The emulator reads seed 002 on its own (nothing here comes from ``pipeline``): it is the
referee of the client, and a reading both shared could never be caught. Where the seed's
tables and examples disagree it answers as the example does, and ``Config`` offers the
table's reading.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import unquote_plus

import httpx
from PIL import Image
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from emulators.common import DroppedConnection, Emulator, EmulatorApp, EmulatorConfig, ProcessingModel, TaskRecord
from emulators.documents import analyse, box_for, directive, int_argument
from emulators.formats import IMAGE_KINDS, SUFFIXES, kind_of

# --- what seed 002 (and DESIGN.md's public notes) fix -----------------------------------------

OAUTH_ROUTE = "/oauth/2.0/token"  # DESIGN.md: Baidu's public OAuth endpoint
REQUEST_ROUTE = "/rest/2.0/solution/v1/iocr/recognise/universal/request"  # seed 002 line 14
GET_RESULT_ROUTE = "/rest/2.0/solution/v1/iocr/recognise/universal/get_result"  # seed 002 line 93
ENCODED_CAP = 10 * 1024 * 1024  # line 28: "base64编码和urlencode后大小不超过10M"
SHORTEST_SIDE, LONGEST_SIDE = 15, 8192  # line 28: "最短边至少15px,最长边最大8192px"
URL_CAP = 1024  # line 29: "URL长度不超过1024字节"
# Lines 28-31: "优先级: image>url>pdf_file>ofd_file" -- the first one present wins.
SOURCE_FIELDS = ("image", "url", "pdf_file", "ofd_file")
# What each source field may carry: line 28 "支持jpg/jpeg/png/bmp格式", 30 PDF, 31 OFD.
SOURCE_KINDS = {
    "image": frozenset({"jpeg", "png", "bmp"}),
    "url": frozenset({"jpeg", "png", "bmp"}),
    "pdf_file": frozenset({"pdf"}),
    "ofd_file": frozenset({"ofd"}),
}
# The preset models' 文件类型 (lines 435-480) for the few the emulator tells apart.
PRESET_DOC_TYPES = {"multiple_invoice": "财务票据", "id_card_front": "身份证正面", "id_card_back": "身份证反面"}
CHINA = timezone(timedelta(hours=8))  # lines 135-137: "UTC/GMT+08:00 东八区"

# error_code -> error_msg: 283016's text is the seed's (line 84), the rest Baidu's public list.
ERROR_MESSAGES = {
    18: "Open api qps request limit reached",
    110: "Access token invalid or no longer valid",
    111: "Access token expired",
    216200: "empty image",
    216201: "image format error",
    216202: "image size error",
    282000: "internal error",
    282003: "missing parameters",
    283016: "parameters value error",
}
UNKNOWN_ERROR = "Unknown error"  # Baidu's error 1, for a code the table above does not list
FAILED_REASON = "识别失败:文件内容无法识别"
# What a broken gateway answers with HTTP 200 (``EMULATE: not-json``).
GATEWAY_PAGE = "<html><head><title>aip gateway</title></head><body><h1>Service Unavailable</h1><hr>bfe</body></html>"


class Config(EmulatorConfig):
    api_key: str = "demo-api-key"
    secret_key: str = "demo-secret-key"
    token_expires_in: int = 2592000  # 30 days, as Baidu
    submit_qps: float = 2.0  # line 8: "该接口支持2QPS"
    get_result_qps: float = 10.0  # line 9: "该接口支持10QPS"
    processing_min: float = 3.0  # seconds; each task draws uniformly from [min, max]
    processing_max: float = 10.0
    processing: ProcessingModel = ProcessingModel()  # by size, for the polling benchmark
    failure_rate: float = 0.0
    # Where the seed's table and its own example disagree, the example is the default (it is
    # what the service sent when it was captured); the other value is the table's reading.
    # Submit answer, lines 69-70 vs 77: the table nests task_id in "result", the example in "task_result".
    submit_answer_key: Literal["task_result", "result"] = "task_result"
    # Line 27 (table) names the field "file_name", the working example (line 51) sends "fileName".
    file_name_field: Literal["fileName", "file_name", "either"] = "fileName"
    # get_result, line 155 types combo_key.{root}[i].{leaf} as []dict; the example (295-300) has an object.
    combo_leaf_shape: Literal["object", "list"] = "object"
    # Lines 150 and 157 type "location" as []dict; the example (186-190, 297-300) has an object.
    location_shape: Literal["object", "list"] = "object"
    # Lines 135-137 type created/started/finished as int; the examples (171-173, 427-429) send text.
    time_format: Literal["text", "int"] = "text"
    # Line 134 lists Success, Running and Failed; a test may make the service answer another word.
    running_status: str = "Running"
    success_status: str = "Success"
    failed_status: str = "Failed"
    # Line 27: "注意: 文件名称后缀需与文件实际类型一致" -- a name whose suffix lies is refused.
    check_name_suffix: bool = True


@dataclass
class Task:
    task_id: str
    account: str
    created: float
    ready_at: float
    fails: bool
    data: bytes
    fmt: str
    template: str | None
    words: asyncio.Future | None = None  # the recognition, computed once in a thread after submit
    reason: str = FAILED_REASON  # why a failing task failed
    answer: str = ""  # a directed get_result answer: "not-json" or "bad-shape"
    record: TaskRecord | None = None


def _clock_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, CHINA).strftime("%Y-%m-%d %H:%M:%S")


def _log_id() -> str:
    return str(secrets.randbelow(10**10))


def _error(code: int, explain: str | None = None) -> JSONResponse:
    """Baidu answers errors with HTTP 200; the seed's failure example (82-88) adds explain and data."""
    body: dict[str, Any] = {"error_code": code, "error_msg": ERROR_MESSAGES.get(code, UNKNOWN_ERROR), "log_id": _log_id()}
    if explain:
        body.update(error_explain=explain, data=None)
    return JSONResponse(body)


def _parse_form(body: bytes) -> tuple[dict[str, str], dict[str, int]]:
    """Fields of a urlencoded body and the encoded length of each (Baidu's 10 MB is measured encoded)."""
    fields: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for part in body.split(b"&"):
        if not part:
            continue
        raw_key, _, raw_value = part.partition(b"=")
        key = unquote_plus(raw_key.decode("latin-1"))
        if key not in fields:
            fields[key] = unquote_plus(raw_value.decode("latin-1"))
            sizes[key] = len(raw_value)
    return fields, sizes


def _file_name(fields: dict[str, str], spelling: str) -> str:
    """The file name from the field(s) the configured reading of the seed accepts."""
    names = ("fileName", "file_name") if spelling == "either" else (spelling,)
    return next((fields[name] for name in names if fields.get(name)), "")


def _suffix_matches(name: str, kind: str) -> bool:
    suffix = name.rpartition(".")[2].lower() if "." in name else ""
    return suffix in SUFFIXES.get(kind, ())


class BaiduEmulator(Emulator):
    config: Config

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.tokens: dict[str, tuple[str, float, int]] = {}  # token -> (account, expires_at, token generation)
        self.tasks: dict[str, Task] = {}

    # -- OAuth ----------------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        """OAuth can be dropped like any API call; Baidu's OAuth has no QPS answer, so no spurious limit."""
        self.arrive("token", request)
        if self.inject("token", self.config.faults.drop_rate):
            return DroppedConnection()
        params = dict(request.query_params)
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            params.update(_parse_form(await request.body())[0])
        if params.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type", "error_description": "The authorization grant type is not supported"}, 400)
        if params.get("client_id") != self.config.api_key:
            return JSONResponse({"error": "invalid_client", "error_description": "unknown client id"}, 401)
        if params.get("client_secret") != self.config.secret_key:
            return JSONResponse({"error": "invalid_client", "error_description": "Client authentication failed"}, 401)
        expires_in = self.config.token_expires_in
        token = f"24.{secrets.token_hex(16)}.{expires_in}.{int(time.time())}.282335-{secrets.randbelow(10**8)}"
        now = time.time()
        self.tokens[token] = (params["client_id"], now + expires_in, self.token_generation(now))
        self.accept("token")
        return JSONResponse(
            {
                "refresh_token": f"25.{secrets.token_hex(16)}",
                "expires_in": expires_in,
                "session_key": secrets.token_hex(12),
                "access_token": token,
                "scope": "public brain_all_scope solution_face",
                "session_secret": secrets.token_hex(16),
            }
        )

    async def expire_tokens(self, request: Request) -> JSONResponse:
        """Make every issued token stale at once, as if 30 days had passed."""
        self.tokens = {t: (acct, 0.0, generation) for t, (acct, _, generation) in self.tokens.items()}
        return JSONResponse({"expired": len(self.tokens)})

    def timelines(self) -> dict[str, Any]:
        return self.task_records((t.record for t in self.tasks.values()))

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        self.extra_stats["tasks"] = {
            "created": len(self.tasks),
            "running": sum(1 for t in self.tasks.values() if now < t.ready_at),
        }
        return super().snapshot()

    # -- the API gate: auth, QPS, faults --------------------------------------------------

    async def _gate(self, request: Request, endpoint: str, qps: float) -> tuple[str | None, Response | None]:
        """Auth, then the QPS limit, then the faults.

        The faults come after the limit, as behind Baidu's gateway: a dropped or spuriously
        refused request has used its place in the window, so a client that resends it at
        once, without pacing, is caught over the limit.
        """
        stats = self.arrive(endpoint, request)
        token = request.query_params.get("access_token", "")
        known = self.tokens.get(token)
        if known is None:
            return None, _error(110)
        account, expires_at, generation = known
        now = time.time()
        if now >= expires_at or generation != self.token_generation(now):
            return None, _error(111)
        arrived = self.arrival(request)[1]
        if not self.window.allow(f"{account}:{endpoint}", qps, now=arrived):
            self.refused_over_limit(endpoint, f"{account}:{endpoint}", arrived)
            return None, _error(18)
        faults = self.config.faults
        if self.inject(endpoint, faults.drop_rate):
            return None, DroppedConnection()
        if self.inject(endpoint, faults.spurious_limit_rate):
            return None, _error(18)  # the limit's own answer; counted as a fault, not a violation
        if self.roll(faults.http_5xx_rate):
            stats.faults_injected += 1
            return None, JSONResponse({"error": "bad gateway"}, status_code=self.rng.choice([500, 502, 503]))
        if self.roll(faults.internal_error_rate):
            stats.faults_injected += 1
            return None, _error(282000)
        await self.maybe_slow(endpoint, request)
        return account, None

    # -- submit -----------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        account, refusal = await self._gate(request, "submit", self.config.submit_qps)
        if refusal is not None:
            return refusal
        # Off the event loop: decoding a 10 MB body takes tens of ms, and the loop must keep
        # stamping the next arrivals on time (a late stamp is a burst the client never sent).
        fields, sizes = await asyncio.to_thread(_parse_form, await request.body())
        source = next((name for name in SOURCE_FIELDS if fields.get(name)), None)
        if source is None:
            return _error(282003, "image、url、pdf_file、ofd_file不能同时为空")
        name = _file_name(fields, self.config.file_name_field)
        if not name:
            return _error(282003, "file_name不能为空")
        template = fields.get("templateSign") or None
        if not template and not fields.get("classifierId"):
            return _error(283016, "classifier_id和template_sign不能同时为空")  # the seed's own example, line 85
        if source == "url":
            data, refusal = await self._download(fields["url"])
            if refusal is not None:
                return refusal
        else:
            if sizes[source] > ENCODED_CAP:
                return _error(216202, "文件base64编码和urlencode后大小超过10M")
            try:
                data = await asyncio.to_thread(base64.b64decode, fields[source], validate=True)
            except (binascii.Error, ValueError):
                return _error(216201, "文件base64编码错误")
        if not data:
            return _error(216200)
        kind = kind_of(data)
        if kind not in SOURCE_KINDS[source]:
            return _error(216201)
        if kind in IMAGE_KINDS:
            refusal = await asyncio.to_thread(_image_refusal, data)
            if refusal is not None:
                return refusal
        if self.config.check_name_suffix and not _suffix_matches(name, kind):
            return _error(283016, "文件名称后缀需与文件实际类型一致")
        behaviour, argument = await asyncio.to_thread(directive, data, kind) or ("", "")
        code = int_argument(argument) if behaviour == "error" else None
        if code:
            self.directed("error", "submit")
            return _error(code, f"文档指令 EMULATE: error {code}")
        task = self._create(account or "", data, kind, template)
        if behaviour == "fail":
            self.directed("fail")
            task.fails, task.reason = True, argument or FAILED_REASON
        elif behaviour in ("not-json", "bad-shape"):
            task.answer = behaviour
        self.accept("submit")
        await self.record_document(data)
        if self.malformed_accept("submit"):
            return self._cut_short(task.task_id)
        return JSONResponse(
            {"error_code": 0, "error_msg": "", "log_id": _log_id(), self.config.submit_answer_key: {"task_id": task.task_id}}
        )

    def _create(self, account: str, data: bytes, kind: str, template: str | None) -> Task:
        now = time.time()
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        task = Task(
            task_id="task-" + "".join(self.rng.choice(alphabet) for _ in range(16)),  # as "task-2m8g3dhqmrv9cxfe"
            account=account,
            created=now,
            ready_at=now + self.config.processing.draw(self.rng, len(data), self.config.processing_min, self.config.processing_max),
            fails=self.roll(self.config.failure_rate),
            data=data,
            fmt=kind,
            template=template,
        )
        # Recognise once, off the event loop, so that the loop stamps arrivals without stalls.
        task.words = asyncio.ensure_future(asyncio.to_thread(self._recognise, task))
        task.record = TaskRecord(task.task_id, task.created, task.ready_at)
        self.tasks[task.task_id] = task
        return task

    def _cut_short(self, task_id: str) -> Response:
        """The success answer broken off right after the task id, as a dropped connection leaves it."""
        head = {"error_code": 0, "error_msg": "", "log_id": _log_id()}
        text = json.dumps(head, ensure_ascii=False)[:-1]
        text += f', "{self.config.submit_answer_key}": {{"task_id": {json.dumps(task_id)}'
        return Response(text.encode(), media_type="application/json")

    async def _download(self, url: str) -> tuple[bytes, JSONResponse | None]:
        if len(url.encode()) > URL_CAP:
            return b"", _error(283016, "url长度超过1024字节")
        try:
            response = await self.http().get(url, timeout=10)
        except httpx.HTTPError:
            return b"", _error(216201, "url下载失败")
        if response.status_code != 200:
            return b"", _error(216201, "url下载失败")
        if len(base64.b64encode(response.content)) > ENCODED_CAP:
            return b"", _error(216202)
        return response.content, None

    # -- get_result -------------------------------------------------------------------------

    def _moment(self, ts: float | None) -> str | int:
        """A task_result time in the configured reading; None is "not yet" ("" or 0)."""
        if self.config.time_format == "int":
            return 0 if ts is None else int(ts)
        return "" if ts is None else _clock_text(ts)

    async def get_result(self, request: Request) -> Response:
        account, refusal = await self._gate(request, "get_result", self.config.get_result_qps)
        if refusal is not None:
            return refusal
        fields, _ = _parse_form(await request.body())
        task = self.tasks.get(fields.get("task_id", ""))
        if task is None or task.account != account:
            return _error(283016, "task_id不存在")
        if task.answer == "not-json":
            self.directed("not-json", "get_result")
            return HTMLResponse(GATEWAY_PAGE, 200)
        if task.answer == "bad-shape":
            self.directed("bad-shape", "get_result")
            return JSONResponse({"error_code": 0, "error_msg": "", "log_id": _log_id()})
        self.accept("get_result")
        now = time.time()
        done = now >= task.ready_at
        if task.record is not None:
            task.record.asked(now, done)
        info: dict[str, Any] = {"task_id": task.task_id, "status": self.config.running_status}
        if not done or task.fails:
            info["reason"] = ""  # the running example (line 426) has it; the success example does not
        info.update(
            created=self._moment(task.created),
            started=self._moment(task.created),
            finished=self._moment(task.ready_at if done else None),
            # As the seed's example has it (55 s to 02 s: 7): the difference of the two stamps shown, to the second.
            duration=int(min(now, task.ready_at)) - int(task.created),
        )
        body: dict[str, Any] = {"error_code": 0, "error_msg": "", "log_id": _log_id(), "task_result": info}
        if not done:
            body["words_result"] = None
        elif task.fails:
            info["status"] = self.config.failed_status
            info["reason"] = task.reason
            body["words_result"] = None
        else:
            info["status"] = self.config.success_status
            pages = [self._shaped(page) for page in await task.words]
            body["words_result_num"] = len(pages)
            body["words_result"] = pages
        return JSONResponse(body)

    def _recognise(self, task: Task) -> list[dict[str, Any]]:
        """The pages as the example nests them (objects); ``_shaped`` applies the configured reading."""
        doc_type = PRESET_DOC_TYPES.get(task.template or "", "其他")
        results = []
        for page in analyse(task.data, task.fmt):
            single: dict[str, list[dict[str, Any]]] = {}
            for key, value, line in page.fields:
                box, cbox = box_for(line, value)
                single.setdefault(key, []).append({"words": value, "location": {"box": box, "cbox": cbox}})
            combo = {}
            if page.table:
                nowhere = {"box": None, "cbox": None}  # as every location of the seed's example
                combo["items"] = [
                    {leaf: {"words": value, "location": dict(nowhere)} for leaf, value in row.items()} for row in page.table
                ]
            results.append(
                {
                    "page_num": page.number,
                    "doc_type": doc_type,
                    "doc_location": None,
                    "kv_result": {"single_key": single, "combo_key": combo},
                }
            )
        return results

    def _shaped(self, page: dict[str, Any]) -> dict[str, Any]:
        """One words_result entry with locations and combo leaves as the configured reading has them."""
        listed_location = self.config.location_shape == "list"
        listed_leaf = self.config.combo_leaf_shape == "list"

        def value(words: dict[str, Any]) -> dict[str, Any]:
            location = words["location"]
            return {"words": words["words"], "location": [location] if listed_location else location}

        kv = page["kv_result"]
        single = {key: [value(w) for w in values] for key, values in kv["single_key"].items()}
        combo = {
            root: [{leaf: [value(w)] if listed_leaf else value(w) for leaf, w in row.items()} for row in rows]
            for root, rows in kv["combo_key"].items()
        }
        return {**page, "kv_result": {"single_key": single, "combo_key": combo}}


def _image_refusal(data: bytes) -> JSONResponse | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            short, long = sorted(image.size)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for a corrupt image
        return _error(216201)
    if short < SHORTEST_SIDE or long > LONGEST_SIDE:
        return _error(216202, f"图片尺寸需在{SHORTEST_SIDE}px到{LONGEST_SIDE}px之间")
    return None


def create_app(config: Config) -> EmulatorApp:
    emulator = BaiduEmulator(config)
    routes = [
        Route(OAUTH_ROUTE, emulator.token, methods=["POST", "GET"]),
        Route(REQUEST_ROUTE, emulator.submit, methods=["POST"]),
        Route(GET_RESULT_ROUTE, emulator.get_result, methods=["POST"]),
        Route("/_emulator/expire_tokens", emulator.expire_tokens, methods=["POST"]),
        *emulator.control_routes(),
    ]
    app = EmulatorApp(routes=routes)
    app.state.emulator = emulator
    return app
