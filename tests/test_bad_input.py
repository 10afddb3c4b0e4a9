"""Bad input, end to end: one batch in which every kind of bad document ends with a clear
``error.json`` (which stage, which code, the provider's own code) while the rest completes.

Provider-side misbehaviour comes from the documents themselves: a line ``EMULATE: ...`` in a
document's text makes the emulator that reads it answer that way (emulators/documents.py),
so one batch holds them all.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline import DocumentFailedError, enqueue_many, stages, storage
from pipeline.errors import BadInput
from pipeline.models import DocumentInfo, Job
from pipeline.providers import get_provider
from pipeline.providers import idp_wire
from pipeline.samples import make_corrupt_pdf, make_invoice_pdf, make_oversize_png, make_report_pdf, make_text_pdf, png_bytes
from tests.conftest import outcomes

# baidu error codes that say the request or the document is wrong (DESIGN.md, and the seed's 283016)
BAIDU_PERMANENT = (3, 6, 14, 100, 216200, 216201, 216202, 282003, 283016)


def _png(path: Path, size: tuple[int, int]) -> Path:
    Image.new("RGB", size, (255, 255, 255)).save(path, format="PNG")
    return path


def _cases(docs: Path) -> list[tuple[str, Path, dict]]:
    """(provider, document, what must come of it): ``None`` stage means it must succeed."""
    empty = docs / "empty.pdf"
    empty.write_bytes(b"")
    lying = docs / "scan.pdf"  # a PNG named .pdf: its bytes, not its name, decide
    lying.write_bytes(png_bytes(["Invoice No: LIE-1"]))
    exe = docs / "tool.pdf"
    exe.write_bytes(b"MZ\x90\x00" + bytes(range(256)) * 8)
    gif = docs / "anim.gif"
    Image.new("RGB", (40, 40)).save(gif, format="GIF")
    docx = docs / "letter.docx"
    with __import__("zipfile").ZipFile(docx, "w") as archive:
        archive.writestr("word/document.xml", "<w:document/>")
    big = docs / "big.pdf"
    with big.open("wb") as fh:  # over idp's 50 MB, and a real PDF start and end
        fh.write(b"%PDF-1.4\n")
        fh.write(b"\n" * (51 * 1024 * 1024))
        fh.write(b"%%EOF\n")
    directed = lambda name, line: make_text_pdf(docs / name, ["A document for the emulator:", line])  # noqa: E731
    cases = [
        ("baidu", make_invoice_pdf(docs / "good.pdf", 1).path, {"stage": None}),
        ("baidu", empty, {"stage": "stage", "code": "empty"}),
        ("baidu", make_corrupt_pdf(docs / "corrupt.pdf").path, {"stage": "stage", "code": "corrupt"}),
        ("baidu", lying, {"stage": None, "format": "png"}),
        ("baidu", exe, {"stage": "stage", "code": "unsupported_format"}),
        ("baidu", gif, {"stage": "stage", "code": "unsupported_format"}),
        ("baidu", make_oversize_png(docs / "huge.png").path, {"stage": "stage", "code": "too_large"}),
        ("baidu", _png(docs / "tiny.png", (10, 10)), {"stage": "stage", "code": "bad_dimensions"}),
        ("baidu", _png(docs / "long.png", (9000, 20)), {"stage": "stage", "code": "bad_dimensions"}),
        ("baidu", directed("failed.pdf", "EMULATE: fail recognition failed"), {"stage": "await", "code": "provider_failed"}),
        ("baidu", directed("html.pdf", "EMULATE: not-json"), {"stage": "await", "code": "malformed_answer"}),
        ("baidu", directed("shape.pdf", "EMULATE: bad-shape"), {"stage": "await", "code": "malformed_answer"}),
        ("idp", make_invoice_pdf(docs / "good-idp.pdf", 2).path, {"stage": None}),
        ("idp", docx, {"stage": "stage", "code": "unsupported_format"}),
        ("idp", big, {"stage": "stage", "code": "too_large"}),
        ("idp", directed("illegal.pdf", f"EMULATE: refuse {idp_wire.ILLEGAL_FILE}"), {"stage": "submit", "code": "rejected_file"}),
        ("idp", directed("over.pdf", f"EMULATE: refuse {idp_wire.OVER_LIMIT}"), {"stage": "submit", "code": "too_large"}),
        ("idp", directed("checkfail.pdf", "EMULATE: fail 20001"), {"stage": "await", "code": "provider_failed", "provider_code": "20001"}),
        ("idp", directed("idp-html.pdf", "EMULATE: not-json"), {"stage": "await", "code": "malformed_answer"}),
        ("tuputech", make_report_pdf(docs / "good-report.pdf", 1).path, {"stage": None}),
        ("tuputech", _png(docs / "photo.png", (64, 64)), {"stage": "stage", "code": "unsupported_format"}),
        ("tuputech", directed("file-error.pdf", "EMULATE: code 14"), {"stage": "await", "code": "provider_failed", "provider_code": "14", "retryable": False}),
        ("tuputech", directed("shapeless.pdf", "EMULATE: bad-shape"), {"stage": "fetch", "code": "malformed_result"}),
    ]
    for code in BAIDU_PERMANENT:
        cases.append(("baidu", directed(f"code-{code}.pdf", f"EMULATE: error {code}"), {"stage": "submit", "code": "provider_rejected", "provider_code": str(code), "retryable": False}))
    return cases


def test_every_kind_of_bad_document_fails_clearly_and_the_batch_completes(stack, baidu, idp, tuputech, docs):
    cases = _cases(docs)
    sent = {provider: list(enqueue_many([path for p, path, _ in cases if p == provider], provider)) for provider in ("baidu", "idp", "tuputech")}
    handles = {s.source: s.handle for group in sent.values() for s in group}
    assert all(h is not None for h in handles.values()), [s.error for g in sent.values() for s in g if s.handle is None]
    results = dict(zip(handles, outcomes(list(handles.values()), timeout=300)))
    for provider, path, expected in cases:
        outcome = results[str(path)]
        if expected["stage"] is None:
            assert not isinstance(outcome, DocumentFailedError), (path.name, getattr(outcome, "error", None))
            if "format" in expected:
                assert outcome.document.format == expected["format"]
            continue
        assert isinstance(outcome, DocumentFailedError), f"{path.name} did not fail"
        error = outcome.error
        assert (error.stage, error.code) == (expected["stage"], expected["code"]), (path.name, error.stage, error.code, error.message)
        assert path.name in error.source and error.message, path.name  # names the document and the reason
        for key in ("provider_code", "retryable"):
            if key in expected:
                assert getattr(error, key) == expected[key], (path.name, key, getattr(error, key))
        if error.stage == "stage":  # refused before any provider request
            assert error.provider_task_id is None
    assert baidu.endpoint("submit")["accepted"] == sum(1 for p, _, e in cases if p == "baidu" and e["stage"] in (None, "await"))


def test_an_object_deleted_after_it_was_enqueued_fails_at_stage_as_not_found(stack, docs):
    stack.activate()
    bucket = storage.get_settings().staging_bucket
    job = Job(job_id="f" * 32, provider="baidu", source=f"s3://{bucket}/gone.pdf", location=f"s3://{bucket}/gone.pdf")
    with pytest.raises(BadInput) as refused:
        stages.stage(job)
    assert refused.value.code == "not_found" and "gone.pdf" in refused.value.message


def test_a_source_replaced_after_it_was_enqueued_is_not_processed_under_the_old_job(stack, docs):
    stack.activate()
    bucket = storage.get_settings().staging_bucket
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key="tests/replaced.pdf", Body=make_invoice_pdf(docs / "a.pdf", 1).path.read_bytes())
    etag = client.head_object(Bucket=bucket, Key="tests/replaced.pdf")["ETag"].strip('"')
    client.put_object(Bucket=bucket, Key="tests/replaced.pdf", Body=make_invoice_pdf(docs / "b.pdf", 2).path.read_bytes())
    source = f"s3://{bucket}/tests/replaced.pdf"
    job = Job(job_id="e" * 32, provider="baidu", source=source, location=source, source_etag=etag)
    with pytest.raises(BadInput) as refused:
        stages.stage(job)
    assert refused.value.code == "source_changed"


def test_tuputech_refuses_a_document_over_its_500_mb_at_stage(stack):
    """Made as S3 would report it: 500 MB are not worth uploading to prove a size comparison."""
    stack.activate()
    document = DocumentInfo(bucket="b", key="k.pdf", filename="k.pdf", size=500 * 1024 * 1024 + 1, format="pdf")
    job = Job(job_id="d" * 32, provider="tuputech", source="s3://b/k.pdf", location="s3://b/k.pdf")
    with pytest.raises(BadInput) as refused:
        get_provider("tuputech").check(document, job)
    assert refused.value.code == "too_large"


def test_keys_with_spaces_unicode_and_percent_are_ingested_like_any_other(stack, baidu, docs):
    stack.activate()
    from pipeline import ingest

    client = storage.s3_client()
    client.create_bucket(Bucket="odd-keys")
    body = io.BytesIO(make_invoice_pdf(docs / "o.pdf", 4).path.read_bytes()).getvalue()
    keys = ["in/a report.pdf", "in/发票 2026.pdf", "in/100% done.pdf", "in/a+b&c=d.pdf"]
    for key in keys:
        client.put_object(Bucket="odd-keys", Key=key, Body=body)
    batch = ingest("s3://odd-keys/in/", "baidu")
    status = batch.wait(timeout=240)
    assert (status.total, status.refused) == (len(keys), 0), status.as_dict()
    handles = list(batch.as_completed(timeout=10))
    assert len(handles) == len(keys)
    results = outcomes(handles)
    assert all(not isinstance(r, DocumentFailedError) for r in results), [getattr(r, "error", None) for r in results]
    assert sorted(r.document.key for r in results) == sorted(keys)


def test_a_local_file_is_measured_where_it_is_uploaded_exactly_as_stage_measures_it_from_s3(stack, docs, monkeypatch):
    """The enqueuer describes the bytes it uploads so that the stage need not read them back; for
    every kind of file it must say what stage would of the object in S3, and leave a file stage
    refuses to stage."""
    from pipeline.enqueue import prepare, stage_local_file

    stack.activate()
    large_png = docs / "large.png"
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(large_png, format="PNG")
    large_pdf = docs / "large.pdf"  # over 64 kB: whether it ends is read from its tail
    large_pdf.write_bytes(b"%PDF-1.4\n" + os.urandom(100 * 1024) + b"\n%%EOF\n")
    empty = docs / "empty.pdf"
    empty.write_bytes(b"")
    samples = [
        ("tuputech", make_report_pdf(docs / "report.pdf", 1).path),
        ("baidu", _png(docs / "tiny.png", (10, 10))),  # measured here; refused later by baidu's check, as before
        ("baidu", large_png),  # over 64 kB: its dimensions come from its header
        ("baidu", large_pdf),
        ("baidu", make_corrupt_pdf(docs / "corrupt.pdf").path),
        ("baidu", empty),
    ]
    assert min(large_png.stat().st_size, large_pdf.stat().st_size) > 64 * 1024
    measured = 0
    for provider, path in samples:
        job, local = prepare(path, provider, {"measured": "test"})
        assert local is not None
        here = stage_local_file(job, local).document
        try:
            there = stages._measure(job)
        except BadInput:
            there = None
        assert here == there, path.name
        measured += here is not None
    assert measured == 4
    # A file that goes up in parts is measured by its stage step, from S3.
    monkeypatch.setattr(storage, "multipart_threshold", lambda settings=None: 1024)
    job, local = prepare(docs / "report.pdf", "tuputech", {"measured": "in parts"})
    assert stage_local_file(job, local).document is None
    assert stages._measure(job).size == local.stat().st_size
