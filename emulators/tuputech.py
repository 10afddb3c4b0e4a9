"""Tuputech document moderation (async v3.1), emulated: signed submit, queued processing,
signed result callback.

Faithful to seed 001 and the notes in DESIGN.md: the client's RSA signature over
``secretId,timestamp,nonce`` is verified against the values as written in the body; the
document is really downloaded from ``doc.url`` (HEAD for its size first); at most
``max_in_flight`` tasks are processed at once and the rest wait in a queue, as the file
interface does; the result is POSTed to ``doc.callback`` as ``{"json", "signature"}``
signed with the emulator's own key, with a 5 s timeout and up to 3 retries. Per-page
texts and extracted images are served at the URLs the result reports.

The verdict is derived from the content, never random: text containing
``reject_word`` is rejected, ``review_word`` sent to review, anything else passes.
"""

from __future__ import annotations

import asyncio
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
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError
from pypdf import PdfReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from emulators.common import Emulator, EmulatorConfig, EndpointStats
from emulators.documents import page_texts
from pipeline.providers.tuputech_wire import (
    BUSINESS_CODES,
    CALLBACK_RETRIES,
    CALLBACK_RULE_ALL,
    CALLBACK_TIMEOUT,
    DOC_FORMATS,
    IMAGE_TASK_ID,
    MAX_DOC_BYTES,
    MAX_IN_FLIGHT,
    SUBMIT_PATH,
    SUGGESTION_PASS,
    SUGGESTION_REJECT,
    SUGGESTION_REVIEW,
    TEXT_TASK_ID,
    CallbackResult,
    Doc,
    DocInfo,
    PageImageResult,
    PageResult,
    PageSummary,
    PageTextResult,
    SubmitRequest,
    SubmitResponse,
    SubmitResult,
    allowed_port,
    dumps,
    effective_limits,
    generate_key_pair,
    public_key_of,
    seal,
    signing_text,
    verify,
)

_SEVERITY = {SUGGESTION_PASS: 0, SUGGESTION_REVIEW: 1, SUGGESTION_REJECT: 2}
_IMAGE_LABELS = {SUGGESTION_PASS: 2, SUGGESTION_REVIEW: 1, SUGGESTION_REJECT: 0}  # the porn task's: 0 porn, 1 sexy, 2 normal
_HINT_CONTEXT = 10  # characters either side of a keyword in a text hit's ``hint``


class Config(EmulatorConfig):
    """The emulated account and the provider's behaviour; every documented limit is a setting."""

    secret_id: str = "demo-secret-id"
    client_public_key: str = ""  # PEM of the client's key; submits are verified with it (empty: every submit fails with 1)
    private_key: str = ""  # PEM of the emulator's own key; generated at start-up when empty (see /_emulator/public_key)
    timestamp_tolerance: float = 300.0  # seconds a submit's timestamp may differ from the emulator's clock
    max_in_flight: int = MAX_IN_FLIGHT
    max_doc_bytes: int = MAX_DOC_BYTES
    strict_head: bool = False  # True: a link that refuses HEAD is code 14; False: measure with a 1-byte ranged GET
    download_timeout: float = 60.0
    processing_min: float = 2.0  # seconds; each task draws uniformly from [min, max] (download included)
    processing_max: float = 8.0
    failure_rate: float = 0.0  # tasks that end with code 100 in their callback
    text_page_length: int = 5000  # characters per page of a plain-text document ("基于一定的长度规则")
    page_index_base: int = 1  # the seed's table says pages count from 1, its example shows 0
    reject_word: str = "FORBIDDEN"
    review_word: str = "REVIEW"
    risk_type: int = 1
    risk_sub_label: str = "Political_Negative_events"
    callback_timeout: float = CALLBACK_TIMEOUT
    callback_retries: int = CALLBACK_RETRIES
    callback_retry_delay: float = 1.0


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
    doc: Doc
    custom_info: dict[str, Any] | None
    duration: float
    fails: bool
    state: str = "queued"  # queued -> processing -> delivering -> done
    texts: dict[int, str] = field(default_factory=dict)  # page index -> full page text
    images: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name -> (bytes, media type)
    result: dict[str, Any] | None = None
    callback_attempts: int = 0
    delivered: bool = False


@dataclass
class Counters:
    accepted: int = 0
    called_back: int = 0
    callback_attempts: int = 0
    callback_failures: int = 0
    callbacks_abandoned: int = 0
    max_in_flight_seen: int = 0
    max_processing_seen: int = 0


# --- the page model ------------------------------------------------------------------------


def detect_format(data: bytes, declared: str | None) -> str:
    """The declared format when given (unknown ones are plain text, "其他纯文本类文档"); else sniffed."""
    if declared:
        fmt = declared.lower()
        return fmt if fmt in DOC_FORMATS else "txt"
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
    return max(verdicts, key=lambda v: _SEVERITY[v[0]], default=(SUGGESTION_PASS, 0))


def _occurrences(text: str, word: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(word), text)] if word else []


# --- the emulator --------------------------------------------------------------------------


class TuputechEmulator(Emulator):
    config: Config

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._own_key = config.private_key or generate_key_pair()[0]
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

    def _stamp(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Every answer and callback carries the provider's own nonce and Unix timestamp."""
        return {**payload, "nonce": secrets.randbelow(10**10), "timestamp": int(time.time())}

    def _answer(self, code: int, detail: str = "", result: SubmitResult | None = None) -> JSONResponse:
        message = BUSINESS_CODES[code][1] + (f": {detail}" if detail else "")
        payload = SubmitResponse(code=code, message=message, result=result).wire()
        return JSONResponse(seal(self.private_key, self._stamp(payload)))

    # -- submit -----------------------------------------------------------------------------

    async def submit(self, request: Request) -> JSONResponse:
        stats = self.arrive("submit")
        fault = await self._fault(stats)
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
            submitted = SubmitRequest.model_validate(data)
        except ValidationError as exc:
            return self._answer(100, f"invalid parameter {'.'.join(map(str, exc.errors()[0]['loc']))}")
        task = self._accept(submitted, str(request.base_url).rstrip("/"))
        self.accept("submit")
        return self._answer(0, result=SubmitResult(request_id=task.request_id, url=task.doc.url, callback=task.doc.callback))

    async def _fault(self, stats: EndpointStats) -> JSONResponse | None:
        """Injected failures, as the other emulators do: a bare 5xx, a signed code 100, a slow answer."""
        faults = self.config.faults
        if self.roll(faults.http_5xx_rate):
            stats.faults_injected += 1
            return JSONResponse({"error": "bad gateway"}, status_code=self.rng.choice([500, 502, 503]))
        if self.roll(faults.internal_error_rate):
            stats.faults_injected += 1
            return self._answer(100)
        await self.maybe_slow("submit")
        return None

    def _refusal(self, secret_id: str, as_sent: dict[str, Any], data: dict[str, Any]) -> tuple[int, str] | None:
        """The first reason to refuse a submit, in the order a gateway checks: who, signature, clock, request."""
        if secret_id != self.config.secret_id:
            return 6, ""
        timestamp, nonce, signature = as_sent.get("timestamp"), as_sent.get("nonce"), as_sent.get("signature")
        if not all(isinstance(v, str) for v in (timestamp, nonce, signature)):
            return 1, "timestamp, nonce and signature are required"
        if not verify(self.config.client_public_key, signing_text(secret_id, timestamp, nonce), signature):
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
        if not allowed_port(port):
            return 14, "doc.url port must be 80, 443 or 1025-65535"
        return None

    def _accept(self, submitted: SubmitRequest, base_url: str) -> Task:
        task = Task(
            request_id=f"{self.rng.getrandbits(128):032x}",  # the seed: 24~128 characters
            base_url=base_url,
            doc=submitted.doc,
            custom_info=submitted.custom_info,
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

        A task is in flight from its acceptance until the provider calls back: the seed
        counts tasks "同时处理" (being processed), and a task whose result is being posted is
        no longer processed. So the count drops just before the first callback attempt
        leaves, and a client that frees its slot on receiving the callback can never be
        seen above the limit, however fast it refills the slot.
        """
        task.state = "processing"
        started = time.monotonic()
        try:
            result = await self._moderate(task)
        except Exception as exc:  # noqa: BLE001 - an emulator fault still ends the task, as code 100
            result = self._failure(task, 100, f"server error: {type(exc).__name__}")
        task.result = result
        try:
            await asyncio.sleep(max(0.0, task.duration - (time.monotonic() - started)))
        finally:
            self.processing -= 1
            self._pump()
        task.state = "delivering"
        body = dumps(seal(self.private_key, result)).encode()
        self._set_in_flight(self.in_flight - 1)  # the first attempt leaves with no await in between
        try:
            await self._deliver(task, body)
        finally:
            task.state = "done"

    async def _moderate(self, task: Task) -> dict[str, Any]:
        if task.fails:
            return self._failure(task, 100, "server error")
        try:
            data = await self._download(task.doc.url)
            fmt = detect_format(data, task.doc.format)
            pages = await asyncio.to_thread(document_pages, data, fmt, self.config.text_page_length)
        except FileError as exc:
            return self._failure(task, 14, str(exc))
        return self._verdict(task, pages)

    def _failure(self, task: Task, code: int, message: str) -> dict[str, Any]:
        result = CallbackResult(
            code=code,
            message=message,
            request_id=task.request_id,
            doc_info=DocInfo(pages=0, images=0, text_length=0),
            custom_info=task.custom_info,
        )
        return self._stamp(result.wire())

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
        """HEAD, as the seed requires. A presigned S3 URL signs its method and so refuses HEAD;
        unless ``strict_head``, the size is then read from the GET's headers before its body."""
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
        image_budget, text_budget = effective_limits(task.custom_info)
        results: list[PageResult] = []
        for page in pages:
            content, images = page.text[:text_budget], page.images[:image_budget]
            text_budget -= len(content)
            image_budget -= len(images)
            results.append(self._page_result(task, page, content, images))
        suggestion, risk_type = _worst([(p.summary.suggestion, p.summary.risk_type) for p in results])
        if task.doc.callback_rule != CALLBACK_RULE_ALL:
            results = [p for p in results if p.summary.suggestion != SUGGESTION_PASS]
        result = CallbackResult(
            code=0,
            message=BUSINESS_CODES[0][1],
            request_id=task.request_id,
            doc_info=DocInfo(
                pages=len(pages), images=sum(len(p.images) for p in pages), text_length=sum(len(p.text) for p in pages)
            ),
            suggestion=suggestion,
            risk_type=risk_type,
            custom_info=task.custom_info,
            pages=results,
        )
        return self._stamp(result.wire())

    def _page_result(self, task: Task, page: Page, content: str, images: list[tuple[str, bytes]]) -> PageResult:
        """One page, judged on the part of its text and images within the limits; its full text is served."""
        index = page.number - 1 + self.config.page_index_base
        task.texts[index] = page.text
        text = self._text_result(task, index, content) if content else None
        image_results = [self._image_result(task, index, i, name, blob) for i, (name, blob) in enumerate(images)]
        suggestion, risk_type = _worst([(r.suggestion, r.risk_type) for r in [*image_results, *([text] if text else [])]])
        return PageResult(
            page=index,
            summary=PageSummary(suggestion=suggestion, risk_type=risk_type),
            images=image_results or None,
            text=text,
        )

    def _judge(self, text: str) -> tuple[int, int, list[tuple[str, int]]]:
        """``(suggestion, riskType, keyword hits)`` of a text: the reject word wins over the review word."""
        words = ((self.config.reject_word, SUGGESTION_REJECT), (self.config.review_word, SUGGESTION_REVIEW))
        for word, suggestion in words:
            hits = [(word, at) for at in _occurrences(text, word)]
            if hits:
                return suggestion, self.config.risk_type, hits
        return SUGGESTION_PASS, 0, []

    def _text_result(self, task: Task, index: int, content: str) -> PageTextResult:
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
            "label": 0 if suggestion == SUGGESTION_PASS else 1,
            "review": suggestion == SUGGESTION_REVIEW,
            "rate": 0.6 if suggestion == SUGGESTION_REVIEW else 0.99,
            "content": content,
            "details": details,
        }
        return PageTextResult(
            url=f"{task.base_url}/static/text/{task.request_id}/{index}.txt",
            suggestion=suggestion,
            risk_type=risk_type,
            details={TEXT_TASK_ID: {"texts": [item]}},
        )

    def _image_result(self, task: Task, index: int, position: int, file_name: str, blob: bytes) -> PageImageResult:
        """An image is judged by the text it carries (a PNG's ``docpipe:text`` chunk, see documents.py)."""
        name = f"{task.request_id}-{index}-{position}"
        extension = file_name.rpartition(".")[2].lower() if "." in file_name else "png"
        fmt = "jpeg" if extension in ("jpg", "jpeg") else extension
        suggestion, risk_type, _ = self._judge("\n".join(page_texts(blob, fmt)))
        task.images[f"{name}.{extension}"] = (blob, mimetypes.guess_type(f"x.{extension}")[0] or "application/octet-stream")
        item = {"label": _IMAGE_LABELS[suggestion], "rate": 0.99, "review": suggestion == SUGGESTION_REVIEW, "name": name}
        return PageImageResult(
            url=f"{task.base_url}/static/image/{task.request_id}/{name}.{extension}",
            name=name,
            suggestion=suggestion,
            risk_type=risk_type,
            details={IMAGE_TASK_ID: {"fileList": [item]}},
        )

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

    # -- files the results point at, and control routes ---------------------------------------

    def _served(self, request: Request, endpoint: str, files: str, key: str) -> tuple[Any, Response | None]:
        """Look up a file a result points at (``task.texts`` or ``task.images``); 404 when absent."""
        self.arrive(endpoint)
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
        return PlainTextResponse(public_key_of(self.private_key), media_type="application/x-pem-file")

    async def task_state(self, request: Request) -> JSONResponse:
        """One task as the emulator sees it, for tests and debugging (not part of Tuputech's API)."""
        task = self.tasks.get(request.path_params["request_id"])
        if task is None:
            return JSONResponse({"error": "unknown requestId"}, status_code=404)
        state = {"state": task.state, "callback_attempts": task.callback_attempts, "delivered": task.delivered}
        return JSONResponse({**state, "result": task.result})

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


def create_app(config: Config) -> Starlette:
    emulator = TuputechEmulator(config)
    routes = [
        Route(SUBMIT_PATH, emulator.submit, methods=["POST"]),
        Route("/static/text/{request_id}/{page:int}.txt", emulator.page_text, methods=["GET"]),
        Route("/static/image/{request_id}/{name}", emulator.image, methods=["GET"]),
        Route("/_emulator/public_key", emulator.public_key, methods=["GET"]),
        Route("/_emulator/tasks/{request_id}", emulator.task_state, methods=["GET"]),
        *emulator.control_routes(),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = emulator
    return app
