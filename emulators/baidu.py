"""Baidu iOCR universal recognition, emulated: OAuth token, submit, get_result.

Faithful to seed 002 and Baidu's public conventions: errors are HTTP 200 with
``error_code``; the per-account limits (submit 2 QPS, get_result 10 QPS) answer error 18;
tokens expire and then answer 110/111; files are checked as Baidu documents them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote_plus

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from emulators.common import Emulator, EmulatorConfig
from emulators.documents import analyse, box_for
from pipeline.providers.baidu import (
    ERROR_CODES,
    MAX_ENCODED_BYTES,
    MAX_SIDE,
    MIN_SIDE,
    RESULT_PATH,
    SUBMIT_PATH,
    TOKEN_PATH,
)
from pipeline.sniff import IMAGE_FORMATS, sniff_format

CST = timezone(timedelta(hours=8))
FILE_FIELDS = ("image", "url", "pdf_file", "ofd_file")  # documented priority order
TEMPLATE_DOC_TYPES = {"multiple_invoice": "财务票据", "id_card_front": "身份证正面", "id_card_back": "身份证反面"}


class Config(EmulatorConfig):
    api_key: str = "demo-api-key"
    secret_key: str = "demo-secret-key"
    token_expires_in: int = 2592000  # 30 days, as Baidu
    submit_qps: float = 2.0
    get_result_qps: float = 10.0
    processing_min: float = 3.0  # seconds; each task draws uniformly from [min, max]
    processing_max: float = 10.0
    failure_rate: float = 0.0
    submit_answer_key: str = "task_result"  # the seed shows both "task_result" and "result"


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


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, CST).strftime("%Y-%m-%d %H:%M:%S")


def _log_id() -> str:
    return str(secrets.randbelow(10**10))


def _error(code: int, explain: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error_code": code, "error_msg": ERROR_CODES[code][1], "log_id": _log_id()}
    if explain:
        body["error_explain"] = explain
        body["data"] = None
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


class BaiduEmulator(Emulator):
    config: Config

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (account, expires_at)
        self.tasks: dict[str, Task] = {}

    # -- OAuth ----------------------------------------------------------------------------

    async def token(self, request: Request) -> JSONResponse:
        self.arrive("token")
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
        self.tokens[token] = (params["client_id"], time.time() + expires_in)
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
        self.tokens = {t: (acct, 0.0) for t, (acct, _) in self.tokens.items()}
        return JSONResponse({"expired": len(self.tokens)})

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        self.extra_stats["tasks"] = {
            "created": len(self.tasks),
            "running": sum(1 for t in self.tasks.values() if now < t.ready_at),
        }
        return super().snapshot()

    # -- the API gate: auth, QPS, faults --------------------------------------------------

    async def _gate(self, request: Request, endpoint: str, qps: float) -> tuple[str | None, JSONResponse | None]:
        stats = self.arrive(endpoint)
        token = request.query_params.get("access_token", "")
        known = self.tokens.get(token)
        if known is None:
            return None, _error(110)
        account, expires_at = known
        if time.time() >= expires_at:
            return None, _error(111)
        if not self.window.allow(f"{account}:{endpoint}", qps):
            stats.limit_violations += 1
            return None, _error(18)
        faults = self.config.faults
        if self.roll(faults.http_5xx_rate):
            stats.faults_injected += 1
            return None, JSONResponse({"error": "bad gateway"}, status_code=self.rng.choice([500, 502, 503]))
        if self.roll(faults.internal_error_rate):
            stats.faults_injected += 1
            return None, _error(282000)
        await self.maybe_slow(endpoint)
        return account, None

    # -- submit -----------------------------------------------------------------------------

    async def submit(self, request: Request) -> JSONResponse:
        account, refusal = await self._gate(request, "submit", self.config.submit_qps)
        if refusal is not None:
            return refusal
        fields, sizes = _parse_form(await request.body())
        file_field = next((f for f in FILE_FIELDS if fields.get(f)), None)
        if file_field is None:
            return _error(282003, "image、url、pdf_file、ofd_file不能同时为空")
        if not (fields.get("file_name") or fields.get("fileName")):
            return _error(282003, "file_name不能为空")
        template = fields.get("templateSign") or None
        if not template and not fields.get("classifierId"):
            return _error(283016, "classifier_id和template_sign不能同时为空")
        if file_field == "url":
            data, error = await self._download(fields["url"])
            if error is not None:
                return error
        else:
            if sizes[file_field] > MAX_ENCODED_BYTES:
                return _error(216202, "文件base64编码和urlencode后大小超过10M")
            try:
                data = base64.b64decode(fields[file_field], validate=True)
            except (binascii.Error, ValueError):
                return _error(216201, "文件base64编码错误")
        if not data:
            return _error(216200)
        fmt = sniff_format(data[:8192])
        expected = {"image": IMAGE_FORMATS, "url": IMAGE_FORMATS, "pdf_file": {"pdf"}, "ofd_file": {"ofd"}}[file_field]
        if fmt not in expected or fmt in ("tiff", "gif"):
            return _error(216201)
        if fmt in IMAGE_FORMATS:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    short, long = sorted(image.size)
            except Exception:  # noqa: BLE001
                return _error(216201)
            if short < MIN_SIDE or long > MAX_SIDE:
                return _error(216202, f"图片尺寸需在{MIN_SIDE}px到{MAX_SIDE}px之间")
        now = time.time()
        task = Task(
            task_id="task-" + "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16)),
            account=account or "",
            created=now,
            ready_at=now + self.rng.uniform(self.config.processing_min, self.config.processing_max),
            fails=self.roll(self.config.failure_rate),
            data=data,
            fmt=fmt,
            template=template,
        )
        # Recognise once, off the event loop, so that the loop stamps arrivals without stalls.
        task.words = asyncio.ensure_future(asyncio.to_thread(self._recognise, task))
        self.tasks[task.task_id] = task
        self.accept("submit")
        return JSONResponse(
            {"error_code": 0, "error_msg": "", "log_id": _log_id(), self.config.submit_answer_key: {"task_id": task.task_id}}
        )

    async def _download(self, url: str) -> tuple[bytes, JSONResponse | None]:
        if len(url.encode()) > 1024:
            return b"", _error(283016, "url长度超过1024字节")
        try:
            response = await self.http().get(url, timeout=10)
        except httpx.HTTPError:
            return b"", _error(216201, "url下载失败")
        if response.status_code != 200:
            return b"", _error(216201, "url下载失败")
        if len(base64.b64encode(response.content)) > MAX_ENCODED_BYTES:
            return b"", _error(216202)
        return response.content, None

    # -- get_result -------------------------------------------------------------------------

    async def get_result(self, request: Request) -> JSONResponse:
        account, refusal = await self._gate(request, "get_result", self.config.get_result_qps)
        if refusal is not None:
            return refusal
        fields, _ = _parse_form(await request.body())
        task = self.tasks.get(fields.get("task_id", ""))
        if task is None or task.account != account:
            return _error(283016, "task_id不存在")
        self.accept("get_result")
        now = time.time()
        info: dict[str, Any] = {
            "task_id": task.task_id,
            "status": "Running",
            "reason": "",
            "created": _stamp(task.created),
            "started": _stamp(task.created),
            "finished": "",
            "duration": int(min(now, task.ready_at) - task.created),
        }
        body: dict[str, Any] = {"error_code": 0, "error_msg": "", "log_id": _log_id(), "task_result": info}
        if now < task.ready_at:
            body["words_result"] = None
            return JSONResponse(body)
        info["finished"] = _stamp(task.ready_at)
        if task.fails:
            info["status"] = "Failed"
            info["reason"] = "识别失败:文件内容无法识别"
            body["words_result"] = None
            return JSONResponse(body)
        info["status"] = "Success"
        words = await task.words
        body["words_result_num"] = len(words)
        body["words_result"] = words
        return JSONResponse(body)

    def _recognise(self, task: Task) -> list[dict[str, Any]]:
        doc_type = TEMPLATE_DOC_TYPES.get(task.template or "", "其他")
        results = []
        for page in analyse(task.data, task.fmt):
            single: dict[str, list[dict[str, Any]]] = {}
            for key, value, line in page.fields:
                box, cbox = box_for(line, value)
                single.setdefault(key, []).append({"words": value, "location": {"box": box, "cbox": cbox}})
            combo: dict[str, list[dict[str, Any]]] = {}
            if page.table:
                combo["items"] = [
                    {name: {"words": value, "location": {"box": None, "cbox": None}} for name, value in row.items()}
                    for row in page.table
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


def create_app(config: Config) -> Starlette:
    emulator = BaiduEmulator(config)
    routes = [
        Route(TOKEN_PATH, emulator.token, methods=["POST", "GET"]),
        Route(SUBMIT_PATH, emulator.submit, methods=["POST"]),
        Route(RESULT_PATH, emulator.get_result, methods=["POST"]),
        Route("/_emulator/expire_tokens", emulator.expire_tokens, methods=["POST"]),
        *emulator.control_routes(),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = emulator
    return app
