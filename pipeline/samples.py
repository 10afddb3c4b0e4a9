"""Sample documents for the demo, tests and benchmarks, made here rather than downloaded.

Invoices are PDFs with a real text layer (reportlab); ID-card-like pages and receipts are
images (Pillow) that carry their text in a PNG text chunk or JPEG comment, which the
emulators read in place of OCR. Every value is derived from the document number, so a
test can say what a document's result must contain.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, PngImagePlugin


@dataclass(frozen=True)
class Sample:
    path: Path
    kind: str
    expected: dict[str, str]  # field name -> value the result must contain


def invoice_fields(n: int) -> dict[str, str]:
    rng = random.Random(n)
    return {
        "Invoice No": f"INV-{100000 + n}",
        "Date": f"2026-{1 + n % 12:02d}-{1 + n % 28:02d}",
        "Seller": rng.choice(["Baidu Online Network Technology", "Alibaba Cloud Computing", "Tencent Cloud"]),
        "Buyer": f"Customer {n:04d} Ltd",
        "Total": f"{rng.randint(100, 99999)}.{rng.randint(0, 99):02d}",
    }


def id_card_fields(n: int) -> dict[str, str]:
    rng = random.Random(10_000 + n)
    return {
        "Name": rng.choice(["Zhang Wei", "Li Na", "Wang Fang", "Liu Yang", "Chen Jie"]) + f" {n}",
        "Sex": rng.choice(["M", "F"]),
        "Birth": f"19{rng.randint(60, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "ID Number": f"11010{rng.randint(10**12, 10**13 - 1)}",
        "Address": f"{rng.randint(1, 300)} Shangdi 10th Street, Haidian, Beijing",
    }


def make_invoice_pdf(path: Path, n: int, pages: int = 1) -> Sample:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    fields = invoice_fields(n)
    pdf = canvas.Canvas(str(path), pagesize=A4)
    for page in range(1, pages + 1):
        pdf.setFont("Helvetica-Bold", 16)
        pdf.drawString(72, 790, f"VAT INVOICE (page {page} of {pages})")
        pdf.setFont("Helvetica", 11)
        y = 750
        if page == 1:
            for key, value in fields.items():
                pdf.drawString(72, y, f"{key}: {value}")
                y -= 20
        y -= 10
        pdf.drawString(72, y, "| Item | Qty | Amount |")
        for row in range(3):
            y -= 18
            pdf.drawString(72, y, f"| Service {page}.{row + 1} | {row + 1} | {(row + 1) * 10 + n % 10}.00 |")
        pdf.showPage()
    pdf.save()
    return Sample(path, "invoice-pdf", fields)


def make_report_pdf(path: Path, n: int, flagged_page: int | None = None, word: str = "FORBIDDEN") -> Sample:
    """A few pages of prose; ``word`` on ``flagged_page`` is what the moderation emulator objects to."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pages = 1 + n % 3
    pdf = canvas.Canvas(str(path), pagesize=A4)
    for page in range(1, pages + 1):
        pdf.setFont("Helvetica", 11)
        pdf.drawString(72, 790, f"Quarterly report {n}, page {page}")
        pdf.drawString(72, 770, f"Revenue grew by {n % 17} percent in region {page}.")
        if page == flagged_page:
            pdf.drawString(72, 750, f"This line carries the word {word} for the moderator.")
        pdf.showPage()
    pdf.save()
    verdict = "pass" if flagged_page is None else {"FORBIDDEN": "reject", "REVIEW": "review"}.get(word, "pass")
    return Sample(path, "report-pdf", {"verdict": verdict, "pages": str(pages)})


def _card_image(lines: list[str], size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (236, 242, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle([8, 8, size[0] - 8, size[1] - 8], outline=(60, 90, 160), width=4)
    for index, line in enumerate(lines):
        draw.text((30, 30 + index * 28), line, fill=(20, 20, 20))
    return image


def make_id_card_png(path: Path, n: int) -> Sample:
    fields = id_card_fields(n)
    lines = ["RESIDENT IDENTITY CARD"] + [f"{k}: {v}" for k, v in fields.items()]
    info = PngImagePlugin.PngInfo()
    info.add_text("docpipe:text", "\n".join(lines))
    _card_image(lines, (640, 400)).save(path, format="PNG", pnginfo=info)
    return Sample(path, "id-card-png", fields)


def make_receipt_jpeg(path: Path, n: int) -> Sample:
    """A JPEG carries no text chunk: its result is derived from its hash, its fields are not known in advance."""
    lines = ["TAXI RECEIPT", f"Receipt {n}", f"Fare: {10 + n % 50}.00"]
    _card_image(lines, (480, 640)).save(path, format="JPEG", quality=85)
    return Sample(path, "receipt-jpeg", {})


def make_corrupt_pdf(path: Path) -> Sample:
    """Starts like a PDF, then stops: the header lies, the end is missing."""
    path.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\n" + bytes(random.Random(7).randbytes(2048)))
    return Sample(path, "corrupt-pdf", {})


def make_oversize_png(path: Path, megabytes: float = 9.0) -> Sample:
    """A PNG of noise: barely compressible, so base64+urlencode takes it over Baidu's 10 MB."""
    side = int((megabytes * 1024 * 1024 / 3) ** 0.5)
    noise = random.Random(42).randbytes(side * side * 3)
    Image.frombytes("RGB", (side, side), noise).save(path, format="PNG", compress_level=1)
    return Sample(path, "oversize-png", {})


def make_batch(folder: Path, count: int, *, corrupt: int = 0) -> list[Sample]:
    """``count`` good documents, mixed kinds, plus ``corrupt`` broken ones."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for n in range(count):
        kind = n % 4
        if kind in (0, 1):
            samples.append(make_invoice_pdf(folder / f"invoice-{n:04d}.pdf", n, pages=1 + (n % 3 == 0)))
        elif kind == 2:
            samples.append(make_id_card_png(folder / f"id-card-{n:04d}.png", n))
        else:
            samples.append(make_receipt_jpeg(folder / f"receipt-{n:04d}.jpg", n))
    for n in range(corrupt):
        samples.append(make_corrupt_pdf(folder / f"broken-{n:02d}.pdf"))
    return samples


def make_text_pdf(path: Path, lines: list[str]) -> Path:
    """A one-page PDF whose text layer holds ``lines`` (tests use it for documents that say what
    an emulator should do with them: ``EMULATE: ...``)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))  # Chinese text must survive the text layer
    pdf = canvas.Canvas(str(path), pagesize=A4)
    for index, line in enumerate(lines):
        pdf.setFont("Helvetica" if line.isascii() else "STSong-Light", 11)
        pdf.drawString(72, 790 - 18 * index, line)
    pdf.showPage()
    pdf.save()
    return path


def png_bytes(lines: list[str]) -> bytes:
    """A small PNG whose text chunk holds ``lines`` (for unit tests)."""
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("docpipe:text", "\n".join(lines))
    _card_image(lines, (320, 200)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
