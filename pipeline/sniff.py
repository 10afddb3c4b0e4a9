"""Tell a document's format from its bytes, never from its name, and measure what the
providers' limits are written in, reading as little as possible.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Iterator

from PIL import Image, ImageFile

HEAD_BYTES = 64 * 1024

FORMAT_EXTENSIONS = {"pdf": "pdf", "png": "png", "jpeg": "jpg", "bmp": "bmp", "ofd": "ofd", "tiff": "tiff", "gif": "gif"}
IMAGE_FORMATS = {"png", "jpeg", "bmp", "tiff", "gif"}


def sniff_format(head: bytes) -> str | None:
    """The format of a document from its first bytes, or None when it is none we know."""
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"PK\x03\x04"):
        names = head[:65536]
        if b"OFD.xml" in names[:4096]:
            return "ofd"
        for marker, fmt in ((b"word/", "docx"), (b"xl/", "xlsx"), (b"ppt/", "pptx")):
            if marker in names:
                return fmt
        return None
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):  # OLE2: legacy .doc/.ppt/.xls
        return "doc"
    return _text_format(head)


def _text_format(head: bytes) -> str | None:
    """Plain text or HTML: decodes as UTF-8 (a cut multi-byte character at the end is fine), no NULs."""
    if not head or b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:
            return None
        text = head[: exc.start].decode("utf-8")
    lowered = text.lstrip().lower()
    return "html" if lowered.startswith(("<!doctype html", "<html")) else "txt"


def pdf_looks_complete(tail: bytes) -> bool:
    """A PDF whose last KiB has no ``%%EOF`` was cut short or is not a PDF at all."""
    return b"%%EOF" in tail


def image_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from an image's header, or None if the header does not parse."""
    parser = ImageFile.Parser()
    try:
        parser.feed(head)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for corrupt headers
        return None
    if parser.image is not None:
        return parser.image.size
    try:
        with Image.open(io.BytesIO(head)) as image:
            return image.size
    except Exception:  # noqa: BLE001
        return None


def _base64_pieces(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``base64(data)`` piece by piece: each piece encodes a multiple of 3 bytes (the last one
    excepted), so the pieces put together are the encoding of the whole."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        cut = len(data) - len(data) % 3
        if cut:
            yield base64.b64encode(data[:cut])
        carry = data[cut:]
    if carry:
        yield base64.b64encode(carry)


def urlencoded_base64_size(chunks: Iterable[bytes]) -> int:
    """Length of ``urlencode(base64(data))`` computed chunk by chunk, as Baidu measures its 10 MB.

    base64 output characters ``+``, ``/`` and ``=`` become three characters each once
    url-encoded, so the size depends on the content, not only on the length.
    """
    return sum(_encoded_len(piece) for piece in _base64_pieces(chunks))


def urlencoded_base64(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``urlencode(base64(data))`` piece by piece, as a form field's value streamed out: the same
    bytes as ``urllib.parse.quote_plus`` of the whole encoding, never the whole in memory."""
    for piece in _base64_pieces(chunks):
        yield piece.replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


def _encoded_len(b64: bytes) -> int:
    return len(b64) + 2 * (b64.count(b"+") + b64.count(b"/") + b64.count(b"="))
