"""What kind of file an upload is, judged by the emulators from its leading bytes.

The emulators are referees: they must not reuse the client's sniffing, or a mistake in it
would be made on both sides of every test. This is their own table of magic numbers,
covering what the baidu and idp emulators accept or must refuse (tuputech reads office
formats itself, see ``emulators.tuputech.detect_format``). Names are the ones
``emulators.documents`` understands.
"""

from __future__ import annotations

import io
import zipfile

# (leading bytes, kind). Order matters only where one prefix starts another (none do).
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "pdf"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
)

IMAGE_KINDS = frozenset({"png", "jpeg", "bmp", "tiff", "gif"})

# A stored file's usual suffixes, first one preferred when the emulator names a file itself.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "pdf": ("pdf",),
    "png": ("png",),
    "jpeg": ("jpg", "jpeg"),
    "bmp": ("bmp",),
    "tiff": ("tiff", "tif"),
    "gif": ("gif",),
    "ofd": ("ofd",),
}


def kind_of(blob: bytes) -> str | None:
    """The file's kind, or None for anything the table does not know (text included)."""
    for magic, kind in MAGIC:
        if blob.startswith(magic):
            return kind
    if blob.startswith(b"PK\x03\x04") and _is_ofd(blob):
        return "ofd"
    return None


def _is_ofd(blob: bytes) -> bool:
    """OFD (GB/T 33190) is a zip whose root holds ``OFD.xml``."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            return "OFD.xml" in archive.namelist()
    except zipfile.BadZipFile:
        return False


def suffix_for(kind: str) -> str:
    return SUFFIXES.get(kind, ("bin",))[0]
