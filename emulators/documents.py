"""What an emulator "recognises" in a document, derived deterministically from its bytes.

No OCR runs here: a PDF's text layer is read with pypdf, a PNG's text chunks with
Pillow, and anything else yields values derived from the content hash. Lines shaped
``Key: value`` become key/value fields; lines with two or more ``|`` form a table whose
first row is the header.

A line ``EMULATE: <behaviour> [argument]`` is a directive: it asks the emulator that reads
the document to misbehave in one documented way for this document only, as a payment
provider's magic card numbers do (see ``directive``; each emulator's docstring lists the
behaviours it knows). The line is still recognised text like any other.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from PIL import Image
from pypdf import PdfReader


@dataclass
class PageContent:
    number: int
    lines: list[str]
    fields: list[tuple[str, str, int]] = field(default_factory=list)  # (key, value, line index)
    table: list[dict[str, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def page_texts(data: bytes, fmt: str) -> list[str]:
    """The text of each page: PDF text layer, PNG text chunks, or a line derived from the hash."""
    if fmt == "pdf":
        try:
            return [page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages] or [""]
        except Exception:  # noqa: BLE001 - a broken PDF still "recognises" as its hash below
            pass
    elif fmt in ("png", "jpeg", "bmp", "tiff", "gif"):
        try:
            with Image.open(io.BytesIO(data)) as image:
                text = getattr(image, "text", {}) or {}
                if text.get("docpipe:text"):
                    return [text["docpipe:text"]]
        except Exception:  # noqa: BLE001
            pass
    digest = hashlib.sha256(data).hexdigest()
    return [f"Document hash: {digest[:16]}\nLength: {len(data)}"]


def analyse(data: bytes, fmt: str) -> list[PageContent]:
    pages = []
    for number, text in enumerate(page_texts(data, fmt), start=1):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        page = PageContent(number=number, lines=lines)
        header: list[str] | None = None
        for index, line in enumerate(lines):
            if line.count("|") >= 2:
                cells = [c.strip() for c in line.strip("|").split("|")]
                if header is None:
                    header = cells
                else:
                    page.table.append(dict(zip(header, cells)))
            elif ":" in line:
                key, _, value = line.partition(":")
                if key.strip() and value.strip():
                    page.fields.append((key.strip(), value.strip(), index))
        pages.append(page)
    return pages


def box_for(line_index: int, value: str) -> tuple[list[list[int]], list[int]]:
    """A plausible box for a line: 4 corner points and (x, y, w, h)."""
    x, y, w, h = 60, 80 + 28 * line_index, 12 * max(1, len(value)), 22
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]], [x, y, w, h]


# "EMULATE:" at the start of a line, then the behaviour (one word), then the rest of the line.
_DIRECTIVE = re.compile(r"EMULATE:[ \t]*(?P<behaviour>\S+)(?:[ \t]+(?P<argument>.*?))?[ \t]*")


def find_directive(texts: Iterable[str]) -> tuple[str, str] | None:
    """The first ``EMULATE: <behaviour> [argument]`` line of the pages, in reading order.

    The behaviour is returned in lower case, the argument as written ("" when absent).
    Whether an emulator knows the behaviour, and what it makes of the argument, is its own
    business: one it does not understand leaves the document behaving as any other.
    """
    for text in texts:
        for line in text.splitlines():
            match = _DIRECTIVE.fullmatch(line.strip())
            if match:
                return match["behaviour"].lower(), match["argument"] or ""
    return None


def directive(data: bytes, fmt: str) -> tuple[str, str] | None:
    """The document's directive, read from the text ``page_texts`` recognises (parses: call off the loop)."""
    return find_directive(page_texts(data, fmt))


def int_argument(argument: str) -> int | None:
    """A directive's argument as an integer, or None when it is not one."""
    try:
        return int(argument.strip())
    except ValueError:
        return None
