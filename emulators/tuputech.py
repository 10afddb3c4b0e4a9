"""Tuputech document moderation (async v3.1), emulated: signed submit, queued processing,
signed result callback.

Faithful to seed 001 and the notes in DESIGN.md: the client's RSA signature over
``secretId,timestamp,nonce`` is verified against the values as written in the body; the
document is really downloaded from ``doc.url`` (HEAD for its size first); at most
``max_in_flight`` tasks are processed at once and the rest wait in a queue, as the file
interface does; the result is POSTed to ``doc.callback`` as ``{"json", "signature"}``
signed with the emulator's own key, with a 5 s timeout and up to 3 retries. Per-page
texts and extracted images are served at the URLs the result reports. Callbacks can be
lost, sent twice or sent late (``callback_*`` settings), as a real provider's may be.

The verdict is derived from the content, never random: text containing
``reject_word`` is rejected, ``review_word`` sent to review, anything else passes.

One document can ask for a misbehaviour of its own, leaving the rest of a batch alone: a
line ``EMULATE: <behaviour> [argument]`` in the text of any page of the downloaded
document, as the page model below reads it (see ``emulators.documents``):

- ``EMULATE: code <n>``: the task's callback carries business code ``n`` (14, 100, or one
  no table lists) in place of a verdict, shaped as any failure's callback (docInfo all 0,
  no pages).
- ``EMULATE: bad-shape``: the callback is signed and verifies and names its ``requestId``,
  but its json has no ``docInfo`` and its ``pages`` is a string (the page list as JSON
  text), not a list.

Any other directive, or ``code`` without a non-zero integer, is ignored. Obeyed directives
count in the statistics' ``directives``.

Nothing here comes from ``pipeline``: the emulator is the client's referee and reads seed
001 on its own (models, constants, RSA), so that a misreading cannot be shared by both.
Where the seed's tables and its examples disagree (pages from 0 or 1, the callback's
``message``), it answers as the example does and ``Config`` offers the table's reading.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import io
import json
import mimetypes
import re
import secrets
import time
import zipfile
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import BaseModel, ConfigDict, ValidationError
from pypdf import PdfReader
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from emulators.common import DroppedConnection, Emulator, EmulatorApp, EmulatorConfig, EndpointStats
from emulators.documents import find_directive, int_argument, page_texts

# --- what seed 001 (and DESIGN.md's public notes) fix -----------------------------------------

SUBMIT_ROUTE = "/v3.1/recognition/doc/async/{secret_id}"  # 2.1: ".../v3.1/recognition/doc/async/<secretId>"
TRIAL_CONCURRENCY = 30  # 1: "在测试期间, 任务并发数为 30"
DOCUMENT_CAP = 500 * 1024 * 1024  # 2.5 Doc.url 3: "文档大小须小于 500MB,超出时回调状态码 14"
CALLBACK_SECONDS = 5.0  # 4.4: "回调超时时间 5 秒"
CALLBACK_RESENDS = 3  # 4.4: "在 HTTP 响应状态码非 200 时进行重试,最多重试 3 次"
DUPLICATE_AFTER = 1.0  # seconds from a delivered callback to its duplicate (``callback_duplicate_rate``)
# 2.5 customInfo: "maxImages ... 取值范围为 [100, 10000] ,默认 1000", "maxTextLength ... [1000, 1000000] ,默认 10000".
IMAGE_BUDGET = (1000, 100, 10_000)  # (default, lowest, highest)
TEXT_BUDGET = (10_000, 1000, 1_000_000)
# 2.5 Doc.format: "可选值: doc 、docx 、xlsx 、ppt 、pptx 、pdf 、html 、txt" (others are plain text).
DECLARABLE = frozenset({"doc", "docx", "xlsx", "ppt", "pptx", "pdf", "html", "txt"})
# 2.5 Doc.callbackRule: "默认为 violation ... 仅回调违规页(含违规需复审)". "all" is the emulator's way to get every page.
EVERY_PAGE = "all"
# 4.6.1: suggestion 0 pass, 1 reject, 2 review.
PASS, REJECT, REVIEW = 0, 1, 2
# The task ids in the 4.7 example's details: an image task and a text task.
IMAGE_TASK = "54bcfc6c329af61034f7c2fc"
TEXT_TASK = "57c4036c557603652aeeb222"
# Business codes (the seed links a table it does not include; DESIGN.md lists them). 3.2: 0 is "success".
CODE_MESSAGES = {
    0: "success",
    1: "auth failed",
    6: "secretId error",
    11: "no callback",
    12: "time parameter error",
    14: "file error",
    100: "server error",
}

_SEVERITY = {PASS: 0, REVIEW: 1, REJECT: 2}
_IMAGE_LABELS = {PASS: 2, REVIEW: 1, REJECT: 0}  # the porn task's: 0 porn, 1 sexy, 2 normal (4.7 shows 2)
_HINT_CONTEXT = 10  # characters either side of a keyword in a text hit's ``hint``


class Config(EmulatorConfig):
    """The emulated account and the provider's behaviour; every documented limit is a setting."""

    secret_id: str = "demo-secret-id"
    client_public_key: str = ""  # PEM of the client's key; submits are verified with it (empty: every submit fails with 1)
    private_key: str = ""  # PEM of the emulator's own key; generated at start-up when empty (see /_emulator/public_key)
    timestamp_tolerance: float = 300.0  # seconds a submit's timestamp may differ from the emulator's clock
    max_in_flight: int = TRIAL_CONCURRENCY
    max_doc_bytes: int = DOCUMENT_CAP
    # 2.5 Doc.url 4: "链接须支持 HEAD 请求,以便进行文档大小探测": a link that refuses HEAD is code 14.
    # False measures such a link with the GET's headers instead.
    strict_head: bool = True
    download_timeout: float = 60.0
    processing_min: float = 2.0  # seconds; each task draws uniformly from [min, max] (download included)
    processing_max: float = 8.0
    failure_rate: float = 0.0  # tasks that end with ``failure_code`` in their callback
    failure_code: int = 100  # any number, so a test can send a code that no table lists
    text_page_length: int = 5000  # characters per page of a plain-text document ("基于一定的长度规则")
    # Where the seed's table and its own example disagree, the example is the default (it is what
    # the service sent when it was captured); the other value is the table's reading.
    # PageResult.page: the table (4.5) says "从 1 开始", the example (4.7) has "page": 0.
    page_index_base: int = 0
    # The callback's message: the table (4.5) marks it 是否必有 "是", the example (4.7) has none.
    callback_message: bool = False
    reject_word: str = "FORBIDDEN"
    review_word: str = "REVIEW"
    risk_type: int = 1
    risk_sub_label: str = "Political_Negative_events"
    callback_timeout: float = CALLBACK_SECONDS
    callback_retries: int = CALLBACK_RESENDS
    callback_retry_delay: float = 1.0
    # Callback faults, each a probability per task. Dropped: the task is processed (and leaves
    # the in-flight count) but its callback is never sent. Duplicated: after a delivered
    # callback, the same signed callback is sent once more, DUPLICATE_AFTER seconds later.
    callback_drop_rate: float = 0.0
    callback_duplicate_rate: float = 0.0
    callback_delay: float = 0.0  # seconds from the end of processing to the first delivery attempt


# --- the submit as 2.5 describes it ------------------------------------------------------------


class SubmittedDoc(BaseModel):
    """``doc``, spelled as on the wire; unknown keys are kept, as a gateway would ignore them."""

    model_config = ConfigDict(extra="allow")

    url: str
    format: str | None = None
    callback: str | None = None
    callbackRule: str | None = None  # noqa: N815 - the wire's spelling


class Submitted(BaseModel):
    model_config = ConfigDict(extra="allow")

    doc: SubmittedDoc
    tasks: list[str] | None = None
    customInfo: dict[str, Any] | None = None  # noqa: N815
    nonce: int | float | str
    timestamp: int | float | str
    signature: str


def budgets(custom_info: dict[str, Any] | None) -> tuple[int, int]:
    """Images and characters to recognise; a value outside its documented range is not "有效"."""

    def pick(value: Any, rule: tuple[int, int, int]) -> int:
        default, lowest, highest = rule
        usable = isinstance(value, int) and not isinstance(value, bool) and lowest <= value <= highest
        return value if usable else default

    info = custom_info or {}
    return pick(info.get("maxImages"), IMAGE_BUDGET), pick(info.get("maxTextLength"), TEXT_BUDGET)


def port_allowed(port: int) -> bool:
    """2.5 Doc.url 2: "文档链接端口除 80 , 443 端口外,应在 1025-65535 范围内"."""
    return port in (80, 443) or 1025 <= port <= 65535


# --- RSA, SHA256withRSA (PKCS#1 v1.5) as DESIGN.md describes the signing ------------------------


@cache
def _private(pem: str) -> rsa.RSAPrivateKey:
    """Parsing a key checks it, which takes milliseconds: once per key."""
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey), "the emulator's private_key must be RSA"
    return key


@cache
def _public(pem: str) -> rsa.RSAPublicKey | None:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, rsa.RSAPublicKey) else None


def new_private_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode()


def public_pem(private_pem: str) -> str:
    spki = _private(private_pem).public_key().public_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return spki.decode()


def rsa_signature(private_pem: str, message: str) -> str:
    raw = _private(private_pem).sign(message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(raw).decode("ascii")


def signature_holds(public_key_pem: str, message: str, signature: str) -> bool:
    """Whether ``signature`` (base64) is the key holder's over ``message``; anything malformed is not."""
    key = _public(public_key_pem) if public_key_pem else None
    if key is None:
        return False
    try:
        key.verify(base64.b64decode(signature, validate=True), message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def envelope(private_pem: str, payload: dict[str, Any], *, signed_text: str | None = None) -> dict[str, str]:
    """3.1/4.5: ``json`` is the escaped JSON text, ``signature`` Tuputech's over exactly that text.

    ``signed_text`` signs something else instead: an envelope that looks right and does not verify.
    """
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return {"json": text, "signature": rsa_signature(private_pem, text if signed_text is None else signed_text)}


class FileError(Exception):
    """The document cannot be used (code 14); the message says why, for the callback's ``message``."""


@dataclass
class Page:
    number: int  # from 1, in document order
    text: str
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, bytes)


@dataclass
class Task:
    request_id: str
    base_url: str  # where the client reached the emulator: text and image URLs are built on it
    doc: SubmittedDoc
    custom_info: dict[str, Any] | None
    duration: float
    fails: bool
    state: str = "queued"  # queued -> processing -> delivering -> done
    texts: dict[int, str] = field(default_factory=dict)  # page index -> full page text
    images: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name -> (bytes, media type)
    result: dict[str, Any] | None = None
    reason: str = ""  # why a task failed, kept here since the callback may carry no message
    callback_attempts: int = 0
    delivered: bool = False
    callback_dropped: bool = False
    duplicated: bool = False


@dataclass
class Counters:
    accepted: int = 0
    called_back: int = 0
    callback_attempts: int = 0
    callback_failures: int = 0
    callbacks_abandoned: int = 0
    callbacks_dropped: int = 0
    callbacks_duplicated: int = 0
    max_in_flight_seen: int = 0
    max_processing_seen: int = 0


# --- the page model ------------------------------------------------------------------------


def detect_format(data: bytes, declared: str | None) -> str:
    """The declared format when given (unknown ones are plain text, "其他纯文本类文档"); else sniffed."""
    if declared:
        fmt = declared.lower()
        return fmt if fmt in DECLARABLE else "txt"
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"PK\x03\x04"):
        return _ooxml_format(data)
    if data.startswith(b"\xd0\xcf\x11\xe0"):
        return "doc"  # OLE2: doc and ppt look alike; both are one page of derived text here
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "html"
    return "txt"  # document_pages refuses it if it does not decode as text


def _ooxml_format(data: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile:
        raise FileError("file error: corrupt zip container") from None
    for marker, fmt in (("word/document.xml", "docx"), ("ppt/presentation.xml", "pptx"), ("xl/workbook.xml", "xlsx")):
        if marker in names:
            return fmt
    raise FileError("file error: unsupported document format")


def _decode(data: bytes) -> str:
    """Plain text in UTF-8 or GB18030; NUL bytes mean a binary file, which is no text document."""
    if b"\x00" in data:
        raise FileError("file error: unsupported document format")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise FileError("file error: unsupported text encoding")


def document_pages(data: bytes, fmt: str, page_length: int) -> list[Page]:
    """The seed's page model: PDF and office pages/slides/sheets as they are, plain text cut by length."""
    if fmt == "pdf":
        return _pdf_pages(data)
    if fmt in ("docx", "pptx", "xlsx"):
        return [Page(n, text) for n, text in enumerate(_ooxml_texts(data, fmt), start=1)]
    if fmt in ("doc", "ppt"):
        return [Page(1, page_texts(data, fmt)[0])]
    text = _decode(data)
    if fmt == "html":
        text = _html_text(text)
    return [Page(n, chunk) for n, chunk in enumerate(split_text(text, page_length), start=1)]


def _read_document(data: bytes, fmt: str, page_length: int) -> tuple[list[Page], tuple[str, str] | None]:
    """The pages and the document's directive, if any (in a thread: both read the whole document)."""
    pages = document_pages(data, fmt, page_length)
    return pages, find_directive(page.text for page in pages)


def split_text(text: str, length: int) -> list[str]:
    """Pages of at most ``length`` characters, cut after a line end when the page has one."""
    pages = []
    start = 0
    while start < len(text):
        end = min(start + length, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        pages.append(text[start:end])
        start = end
    return pages or [""]


def _pdf_pages(data: bytes) -> list[Page]:
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise FileError("file error: encrypted PDF")
        return [Page(n, page.extract_text() or "", _pdf_images(page)) for n, page in enumerate(reader.pages, start=1)]
    except FileError:
        raise
    except Exception:  # noqa: BLE001 - pypdf raises many kinds for broken files; all are a file error
        raise FileError("file error: PDF cannot be read") from None


def _pdf_images(page: Any) -> list[tuple[str, bytes]]:
    """A page's embedded images; one whose filter pypdf cannot decode is skipped, not fatal."""
    try:
        return [(image.name, image.data) for image in page.images]
    except Exception:  # noqa: BLE001
        return []


def _html_text(markup: str) -> str:
    """The visible text of a page (Tuputech renders HTML to PDF; text pages by length stand in for that)."""
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", "", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</(p|div|li|tr|h[1-6])\s*>", "\n", markup)
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def _ooxml_texts(data: bytes, fmt: str) -> list[str]:
    """docx: pages at Word's rendered (or explicit) page breaks; pptx: one page per slide; xlsx: per worksheet."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if fmt == "docx":
                xml = archive.read("word/document.xml").decode()
                rendered = "<w:lastRenderedPageBreak/>"
                breaks = rendered if rendered in xml else r'<w:br\b[^>]*w:type="page"[^>]*/>'
                return [_xml_text(chunk, "w:t", "</w:p>") for chunk in re.split(breaks, xml)]
            if fmt == "pptx":
                slides = _numbered(archive, r"ppt/slides/slide(\d+)\.xml")
                return [_xml_text(archive.read(name).decode(), "a:t", "</a:p>") for name in slides]
            shared = _shared_strings(archive)
            sheets = _numbered(archive, r"xl/worksheets/sheet(\d+)\.xml")
            return [_sheet_text(archive.read(name).decode(), shared) for name in sheets] or [""]
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        raise FileError(f"file error: {fmt} cannot be read") from None


def _numbered(archive: zipfile.ZipFile, pattern: str) -> list[str]:
    found = [(int(m.group(1)), name) for name in archive.namelist() if (m := re.fullmatch(pattern, name))]
    return [name for _, name in sorted(found)]


def _xml_text(xml: str, tag: str, paragraph_end: str) -> str:
    """The text of an OOXML part, one line per paragraph."""
    paragraphs = (_runs(part, tag) for part in xml.split(paragraph_end))
    return "\n".join(p for p in paragraphs if p)


def _runs(xml: str, tag: str) -> str:
    """The text runs ``<tag>...</tag>`` of a fragment, joined as they read."""
    return html.unescape("".join(re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", xml, re.S)))


def _shared_strings(archive: zipfile.ZipFile) -> list[str]:
    if "xl/sharedStrings.xml" not in archive.namelist():
        return []
    xml = archive.read("xl/sharedStrings.xml").decode()
    return [_runs(item, "t") for item in re.findall(r"<si>(.*?)</si>", xml, re.S)]


def _sheet_text(xml: str, shared: list[str]) -> str:
    rows = []
    for row in re.findall(r"<row\b[^>]*>(.*?)</row>", xml, re.S):
        cells = []
        for attrs, body in re.findall(r"<c\b([^>]*?)(?:/>|>(.*?)</c>)", row, re.S):
            value = re.search(r"<v>(.*?)</v>", body or "", re.S)
            if 't="s"' in attrs and value:
                cells.append(shared[int(value.group(1))])
            elif 't="inlineStr"' in attrs:
                cells.append(_runs(body, "t"))
            else:
                cells.append(html.unescape(value.group(1)) if value else "")
        rows.append("\t".join(cells))
    return "\n".join(rows)


def _worst(verdicts: list[tuple[int, int]]) -> tuple[int, int]:
    """The summary of several ``(suggestion, riskType)``: reject over review over pass."""
    return max(verdicts, key=lambda v: _SEVERITY[v[0]], default=(PASS, 0))


def _occurrences(text: str, word: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(word), text)] if word else []


# --- the emulator --------------------------------------------------------------------------


class TuputechEmulator(Emulator):
    config: Config

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._own_key = config.private_key or new_private_key()
        _private(self._own_key)  # parsed (and checked: ~30 ms of CPU) now; on first use it held the loop as the first answer was signed
        self.tasks: dict[str, Task] = {}
        self.queue: deque[Task] = deque()
        self.processing = 0
        self.in_flight = 0  # accepted and not yet called back (queued or processing)
        self.in_flight_log: list[tuple[float, int]] = []
        self.counters = Counters()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def private_key(self) -> str:
        return self.config.private_key or self._own_key

    @staticmethod
    def _stamped(payload: dict[str, Any]) -> dict[str, Any]:
        """Every answer and callback ends with Tuputech's own timestamp and nonce (3.2, 4.7)."""
        return {**payload, "timestamp": int(time.time()), "nonce": secrets.randbelow(10**10)}

    def _sealed(self, payload: dict[str, Any], *, forged: bool = False) -> dict[str, str]:
        if not forged:
            return envelope(self.private_key, payload)
        # Signed over other text than the json it carries: the shape is right, the signature is not.
        return envelope(self.private_key, payload, signed_text=json.dumps(payload))

    def _answer(self, code: int, detail: str = "", result: dict[str, Any] | None = None, forged: bool = False) -> JSONResponse:
        """The synchronous answer, 3.1/3.2: code, message, result when accepted."""
        payload: dict[str, Any] = {"code": code, "message": CODE_MESSAGES[code] + (f": {detail}" if detail else "")}
        if result is not None:
            payload["result"] = result
        return JSONResponse(self._sealed(self._stamped(payload), forged=forged))

    # -- submit -----------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        stats = self.arrive("submit", request)
        fault = await self._fault(stats, request)
        if fault is not None:
            return fault
        body = await request.body()
        try:
            as_sent = json.loads(body, parse_int=str, parse_float=str)  # numbers kept as their text
            data = json.loads(body)
        except ValueError:
            return self._answer(100, "request body is not JSON")
        if not isinstance(data, dict):
            return self._answer(100, "request body is not a JSON object")
        refusal = self._refusal(request.path_params["secret_id"], as_sent, data)
        if refusal is not None:
            return self._answer(*refusal)
        try:
            submitted = Submitted.model_validate(data)
        except ValidationError as exc:
            return self._answer(100, f"invalid parameter {'.'.join(map(str, exc.errors()[0]['loc']))}")
        task = self._accept(submitted, str(request.base_url).rstrip("/"))
        self.accept("submit")
        forged = self.malformed_accept("submit")
        result = {"requestId": task.request_id, "url": task.doc.url}
        if task.doc.callback is not None:
            result["callback"] = task.doc.callback
        return self._answer(0, result=result, forged=forged)

    async def _fault(self, stats: EndpointStats, request: Request) -> Response | None:
        """Injected failures, as the other emulators do: a cut connection, a bare 5xx, a signed
        code 100, a slow answer. No spurious limit (``faults.spurious_limit_rate`` is ignored):
        seed 001 documents a concurrency cap that queues tasks, and no "too fast" answer."""
        faults = self.config.faults
        if self.inject("submit", faults.drop_rate):
            return DroppedConnection()
        if self.roll(faults.http_5xx_rate):
            stats.faults_injected += 1
            return JSONResponse({"error": "bad gateway"}, status_code=self.rng.choice([500, 502, 503]))
        if self.roll(faults.internal_error_rate):
            stats.faults_injected += 1
            return self._answer(100)
        await self.maybe_slow("submit", request)
        return None

    def _refusal(self, secret_id: str, as_sent: dict[str, Any], data: dict[str, Any]) -> tuple[int, str] | None:
        """The first reason to refuse a submit, in the order a gateway checks: who, signature, clock, request."""
        if secret_id != self.config.secret_id:
            return 6, ""
        timestamp, nonce, signature = as_sent.get("timestamp"), as_sent.get("nonce"), as_sent.get("signature")
        if not all(isinstance(v, str) for v in (timestamp, nonce, signature)):
            return 1, "timestamp, nonce and signature are required"
        # The values are signed as they are written in the body, joined by commas (DESIGN.md).
        if not signature_holds(self.config.client_public_key, f"{secret_id},{timestamp},{nonce}", signature):
            return 1, ""
        try:
            skew = abs(time.time() - float(timestamp))
        except ValueError:
            return 12, "timestamp is not a number"
        if not skew <= self.config.timestamp_tolerance:
            return 12, f"timestamp differs from server time by {skew:.0f}s"
        doc = data.get("doc")
        if not isinstance(doc, dict) or not isinstance(doc.get("url"), str) or not doc["url"]:
            return 14, "doc.url is required"
        if not isinstance(doc.get("callback"), str) or not doc["callback"]:
            return 11, ""
        return self._url_refusal(doc["url"])

    def _url_refusal(self, url: str) -> tuple[int, str] | None:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return 14, "doc.url is not a URL"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return 14, "doc.url must be an http(s) URL"
        if not port_allowed(port):
            return 14, "doc.url port must be 80, 443 or 1025-65535"
        return None

    def _accept(self, submitted: Submitted, base_url: str) -> Task:
        task = Task(
            request_id=f"{self.rng.getrandbits(128):032x}",  # 3.1 Result.requestId: "字符串长度 24~128"
            base_url=base_url,
            doc=submitted.doc,
            custom_info=submitted.customInfo,
            duration=self.rng.uniform(self.config.processing_min, self.config.processing_max),
            fails=self.roll(self.config.failure_rate),
        )
        self.tasks[task.request_id] = task
        self.queue.append(task)
        self.counters.accepted += 1
        self._set_in_flight(self.in_flight + 1)
        self._pump()
        return task

    # -- processing: at most max_in_flight at once, the rest wait -----------------------------

    def _set_in_flight(self, value: int) -> None:
        """Every change is logged with its time: the benchmark reads how long N were in flight."""
        self.in_flight = value
        self.counters.max_in_flight_seen = max(self.counters.max_in_flight_seen, value)
        self.in_flight_log.append((time.time(), value))

    def _pump(self) -> None:
        while self.queue and self.processing < self.config.max_in_flight:
            task = self.queue.popleft()
            self.processing += 1
            self.counters.max_processing_seen = max(self.counters.max_processing_seen, self.processing)
            self._spawn(self._run(task))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Keep a reference to each background task: the event loop holds only weak ones."""
        job = asyncio.get_running_loop().create_task(work)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _run(self, task: Task) -> None:
        """Process, free the slot for the next queued task, then call back.

        A task is in flight from its acceptance until its processing ends: the seed counts
        tasks "同时处理" (being processed), and a task whose result is being posted (or held
        back, or lost) is no longer processed. So the count drops just before the first
        callback attempt leaves (with no ``callback_delay``, with no await in between), and
        a client that frees its slot on receiving the callback can never be seen above the
        limit, however fast it refills the slot.
        """
        task.state = "processing"
        started = time.monotonic()
        try:
            result = await self._moderate(task)
        except Exception as exc:  # noqa: BLE001 - an emulator fault still ends the task, as code 100
            result = self._failure(task, 100, f"server error: {type(exc).__name__}")
        task.result = result = self._stamped(result)
        try:
            await asyncio.sleep(max(0.0, task.duration - (time.monotonic() - started)))
        finally:
            self.processing -= 1
            self._pump()
        task.state = "delivering"
        body = json.dumps(self._sealed(result), ensure_ascii=False).encode()
        self._set_in_flight(self.in_flight - 1)
        try:
            if self.roll(self.config.callback_drop_rate):
                task.callback_dropped = True
                self.counters.callbacks_dropped += 1
                return
            if self.config.callback_delay > 0:
                await asyncio.sleep(self.config.callback_delay)
            await self._deliver(task, body)
        finally:
            task.state = "done"
        if task.delivered and self.roll(self.config.callback_duplicate_rate):
            self._spawn(self._deliver_again(task, body))

    async def _moderate(self, task: Task) -> dict[str, Any]:
        if task.fails:
            return self._failure(task, self.config.failure_code, "server error")
        try:
            data = await self._download(task.doc.url)
            fmt = detect_format(data, task.doc.format)
            pages, found = await asyncio.to_thread(_read_document, data, fmt, self.config.text_page_length)
        except FileError as exc:
            return self._failure(task, 14, str(exc))
        await self.record_document(data)
        behaviour, argument = found or ("", "")
        code = int_argument(argument) if behaviour == "code" else None
        if code:
            self.directed("code")
            return self._failure(task, code, f"{CODE_MESSAGES.get(code, 'error')} (EMULATE: code {code})")
        result = self._verdict(task, pages)
        if behaviour == "bad-shape":
            self.directed("bad-shape")
            del result["docInfo"]
            result["pages"] = json.dumps(result["pages"], ensure_ascii=False)
        return result

    def _callback(self, task: Task, code: int, message: str, **rest: Any) -> dict[str, Any]:
        """A callback's json (4.5) in the 4.7 example's order; ``message`` only when configured (4.7 has none)."""
        payload: dict[str, Any] = {"code": code}
        if self.config.callback_message:
            payload["message"] = message
        payload["requestId"] = task.request_id
        for key in ("riskType", "suggestion", "docInfo"):
            if key in rest:
                payload[key] = rest.pop(key)
        if task.custom_info is not None:
            payload["customInfo"] = task.custom_info
        payload.update(rest)
        return payload

    def _failure(self, task: Task, code: int, message: str) -> dict[str, Any]:
        task.reason = message
        return self._callback(task, code, message, docInfo={"images": 0, "pages": 0, "textLength": 0})

    # -- download: HEAD for the size, then GET ------------------------------------------------

    async def _download(self, url: str) -> bytes:
        try:
            size = await self._probe_size(url)
            if size is not None and size > self.config.max_doc_bytes:
                raise FileError(f"file error: document is {size} bytes, over {self.config.max_doc_bytes}")
            return await self._fetch(url)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FileError(f"file error: document unreachable ({type(exc).__name__})") from None

    async def _probe_size(self, url: str) -> int | None:
        """HEAD, as the seed requires ("链接须支持 HEAD 请求"). A presigned S3 GET URL signs its
        method and so refuses HEAD; only when ``strict_head`` is off is the size then read from
        the GET's headers before its body."""
        head = await self.http().head(url, timeout=self.config.download_timeout, follow_redirects=True)
        if head.is_success:
            return _int_header(head.headers.get("content-length"))
        if self.config.strict_head:
            raise FileError(f"file error: HEAD answered HTTP {head.status_code}")
        return None

    async def _fetch(self, url: str) -> bytes:
        """GET the document: refused on its declared length before the body is read, and stopped as
        soon as it outgrows the limit (neither a HEAD nor a Content-Length has to tell the truth)."""
        chunks: list[bytes] = []
        total = 0
        limit = self.config.max_doc_bytes
        async with self.http().stream("GET", url, timeout=self.config.download_timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise FileError(f"file error: download answered HTTP {response.status_code}")
            declared = _int_header(response.headers.get("content-length"))
            if declared is not None and declared > limit:
                raise FileError(f"file error: document is {declared} bytes, over {limit}")
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > limit:
                    raise FileError(f"file error: document is over {limit} bytes")
                chunks.append(chunk)
        if not total:
            raise FileError("file error: document is empty")
        return b"".join(chunks)

    # -- the verdict --------------------------------------------------------------------------

    def _verdict(self, task: Task, pages: list[Page]) -> dict[str, Any]:
        """The documented result: docInfo over the whole document, recognition within maxImages/maxTextLength."""
        image_budget, text_budget = budgets(task.custom_info)
        reported: list[dict[str, Any]] = []
        for page in pages:
            content, images = page.text[:text_budget], page.images[:image_budget]
            text_budget -= len(content)
            image_budget -= len(images)
            reported.append(self._page_result(task, page, content, images))
        suggestion, risk_type = _worst([(p["summary"]["suggestion"], p["summary"]["riskType"]) for p in reported])
        if task.doc.callbackRule != EVERY_PAGE:
            reported = [p for p in reported if p["summary"]["suggestion"] != PASS]
        doc_info = {
            "images": sum(len(p.images) for p in pages),
            "pages": len(pages),
            "textLength": sum(len(p.text) for p in pages),
        }
        return self._callback(
            task, 0, CODE_MESSAGES[0], riskType=risk_type, suggestion=suggestion, docInfo=doc_info, pages=reported
        )

    def _page_result(self, task: Task, page: Page, content: str, images: list[tuple[str, bytes]]) -> dict[str, Any]:
        """One page (4.5 PageResult), judged on the part of its text and images within the limits."""
        index = page.number - 1 + self.config.page_index_base
        task.texts[index] = page.text
        text = self._text_result(task, index, content) if content else None
        image_results = [self._image_result(task, index, i, name, blob) for i, (name, blob) in enumerate(images)]
        judged = [(r["suggestion"], r["riskType"]) for r in [*image_results, *([text] if text else [])]]
        suggestion, risk_type = _worst(judged)
        result: dict[str, Any] = {"page": index, "summary": {"suggestion": suggestion, "riskType": risk_type}}
        if image_results:  # "为空时该字段省略"
            result["images"] = image_results
        if text is not None:
            result["text"] = text
        return result

    def _judge(self, text: str) -> tuple[int, int, list[tuple[str, int]]]:
        """``(suggestion, riskType, keyword hits)`` of a text: the reject word wins over the review word."""
        words = ((self.config.reject_word, REJECT), (self.config.review_word, REVIEW))
        for word, suggestion in words:
            hits = [(word, at) for at in _occurrences(text, word)]
            if hits:
                return suggestion, self.config.risk_type, hits
        return PASS, 0, []

    def _text_result(self, task: Task, index: int, content: str) -> dict[str, Any]:
        suggestion, risk_type, hits = self._judge(content)
        details = [
            {
                "mainLabel": self.config.risk_type,
                "subLabel": self.config.risk_sub_label,
                "keyword": word,
                "hint": content[max(0, at - _HINT_CONTEXT) : at + len(word) + _HINT_CONTEXT],
                "startPos": at,
                "endPos": at + len(word),
            }
            for word, at in hits
        ]
        item = {
            "label": 0 if suggestion == PASS else 1,
            "review": suggestion == REVIEW,
            "rate": 0.6 if suggestion == REVIEW else 0.99,
            "content": content,
            "details": details,
        }
        return {
            "url": f"{task.base_url}/static/text/{task.request_id}/{index}.txt",
            "suggestion": suggestion,
            "riskType": risk_type,
            "details": {TEXT_TASK: {"texts": [item]}},
        }

    def _image_result(self, task: Task, index: int, position: int, file_name: str, blob: bytes) -> dict[str, Any]:
        """An image is judged by the text it carries (a PNG's ``docpipe:text`` chunk, see documents.py)."""
        name = f"{task.request_id}-{index}-{position}"  # 4.7: "<requestId>-0-0", by page and position
        extension = file_name.rpartition(".")[2].lower() if "." in file_name else "png"
        fmt = "jpeg" if extension in ("jpg", "jpeg") else extension
        suggestion, risk_type, _ = self._judge("\n".join(page_texts(blob, fmt)))
        task.images[f"{name}.{extension}"] = (blob, mimetypes.guess_type(f"x.{extension}")[0] or "application/octet-stream")
        item = {"label": _IMAGE_LABELS[suggestion], "rate": 0.99, "review": suggestion == REVIEW, "name": name}
        return {
            "url": f"{task.base_url}/static/image/{task.request_id}/{name}.{extension}",
            "name": name,
            "suggestion": suggestion,
            "riskType": risk_type,
            "details": {IMAGE_TASK: {"fileList": [item]}},
        }

    # -- callback -----------------------------------------------------------------------------

    async def _deliver(self, task: Task, body: bytes) -> None:
        """POST the signed result; a non-200 or no answer in time is retried, at most ``callback_retries`` times."""
        headers = {"Content-Type": "application/json"}
        for attempt in range(1 + self.config.callback_retries):
            if attempt:
                await asyncio.sleep(self.config.callback_retry_delay)
            task.callback_attempts += 1
            self.counters.callback_attempts += 1
            try:
                response = await self.http().post(
                    str(task.doc.callback), content=body, headers=headers, timeout=self.config.callback_timeout
                )
                delivered = response.status_code == 200
            except (httpx.HTTPError, httpx.InvalidURL):
                delivered = False
            if delivered:
                task.delivered = True
                self.counters.called_back += 1
                return
            self.counters.callback_failures += 1
        self.counters.callbacks_abandoned += 1

    async def _deliver_again(self, task: Task, body: bytes) -> None:
        """The delivered callback once more, as a provider that missed the first 200 resends it.

        One attempt, counted apart from the task's own attempts: the benchmark asks how many
        duplicates the client had to recognise, not whether the task was called back.
        """
        await asyncio.sleep(DUPLICATE_AFTER)
        task.duplicated = True
        self.counters.callbacks_duplicated += 1
        headers = {"Content-Type": "application/json"}
        try:
            await self.http().post(str(task.doc.callback), content=body, headers=headers, timeout=self.config.callback_timeout)
        except (httpx.HTTPError, httpx.InvalidURL):
            pass

    # -- files the results point at, and control routes ---------------------------------------

    def _served(self, request: Request, endpoint: str, files: str, key: str) -> tuple[Any, Response | None]:
        """Look up a file a result points at (``task.texts`` or ``task.images``); 404 when absent."""
        self.arrive(endpoint, request)
        task = self.tasks.get(request.path_params["request_id"])
        found = getattr(task, files).get(request.path_params[key]) if task else None
        if found is None:
            return None, PlainTextResponse("not found", status_code=404)
        self.accept(endpoint)
        return found, None

    async def page_text(self, request: Request) -> Response:
        text, missing = self._served(request, "text", "texts", "page")
        return missing or PlainTextResponse(text)

    async def image(self, request: Request) -> Response:
        found, missing = self._served(request, "image", "images", "name")
        return missing or Response(found[0], media_type=found[1])

    async def public_key(self, request: Request) -> PlainTextResponse:
        """The PEM a client verifies answers and callbacks with (the emulator's "图普公钥")."""
        return PlainTextResponse(public_pem(self.private_key), media_type="application/x-pem-file")

    async def task_state(self, request: Request) -> JSONResponse:
        """One task as the emulator sees it, for tests and debugging (not part of Tuputech's API)."""
        task = self.tasks.get(request.path_params["request_id"])
        if task is None:
            return JSONResponse({"error": "unknown requestId"}, status_code=404)
        state = {
            "state": task.state,
            "callback_attempts": task.callback_attempts,
            "delivered": task.delivered,
            "callback_dropped": task.callback_dropped,
            "duplicated": task.duplicated,
        }
        return JSONResponse({**state, "reason": task.reason, "result": task.result})

    def snapshot(self) -> dict[str, Any]:
        c = self.counters
        self.extra_stats.update(
            tasks_accepted=c.accepted,
            queued=len(self.queue),
            processing=self.processing,
            in_flight=self.in_flight,
            called_back=c.called_back,
            callback_attempts=c.callback_attempts,
            callback_failures=c.callback_failures,
            callbacks_abandoned=c.callbacks_abandoned,
            callbacks_dropped=c.callbacks_dropped,
            callbacks_duplicated=c.callbacks_duplicated,
            max_in_flight_seen=c.max_in_flight_seen,
            max_processing_seen=c.max_processing_seen,
        )
        return super().snapshot()

    def timelines(self) -> dict[str, Any]:
        return {"in_flight_log": self.in_flight_log}

    def reset(self) -> None:
        """Counters start again; the high-water marks start from what is in flight right now."""
        super().reset()
        self.counters = Counters(max_in_flight_seen=self.in_flight, max_processing_seen=self.processing)
        self.in_flight_log = [(time.time(), self.in_flight)]


def _int_header(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def create_app(config: Config) -> EmulatorApp:
    emulator = TuputechEmulator(config)
    routes = [
        Route(SUBMIT_ROUTE, emulator.submit, methods=["POST"]),
        Route("/static/text/{request_id}/{page:int}.txt", emulator.page_text, methods=["GET"]),
        Route("/static/image/{request_id}/{name}", emulator.image, methods=["GET"]),
        Route("/_emulator/public_key", emulator.public_key, methods=["GET"]),
        Route("/_emulator/tasks/{request_id}", emulator.task_state, methods=["GET"]),
        *emulator.control_routes(),
    ]
    app = EmulatorApp(routes=routes)
    app.state.emulator = emulator
    return app
