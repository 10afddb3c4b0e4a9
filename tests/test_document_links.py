"""The document links tuputech downloads from, served by the real receiver from the real S3 front.

The stack's S3 checks every signature with its method, as real S3 does: the presigned GET URL
docpipe used to hand out is refused there for HEAD, which the seed says the provider sends
first (001, the ``url`` row). The receiver's links answer HEAD and ranges, expire, and never
name the bucket.
"""

from __future__ import annotations

import time

import httpx
import pytest

from pipeline import jobs, links, storage
from pipeline.models import DocumentInfo, Job
from pipeline.runtime import get_runtime

CONTENT = bytes(range(256)) * 40  # 10 KiB that tell every offset apart


@pytest.fixture
def staged(stack) -> Job:
    """A document in the staging bucket and the job record ``stage`` would leave for it."""
    stack.activate()
    job_id = f"{time.time_ns():032x}"[-32:]
    bucket, key = get_runtime().settings.staging_bucket, f"tests/links/{job_id}/a report.pdf"
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=CONTENT)
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    jobs.record(get_runtime().redis, job_id, doc_bucket=bucket, doc_key=key, doc_etag=etag, doc_format="pdf")
    document = DocumentInfo(bucket=bucket, key=key, filename="a report.pdf", size=len(CONTENT), format="pdf", etag=etag)
    return Job(job_id=job_id, provider="tuputech", source=f"s3://{bucket}/{key}", location=f"s3://{bucket}/{key}", document=document)


def test_a_presigned_get_url_refuses_head_on_an_s3_that_checks_methods(staged):
    url = storage.s3_client().generate_presigned_url(
        "get_object", Params={"Bucket": staged.document.bucket, "Key": staged.document.key}, ExpiresIn=600
    )
    assert httpx.get(url).content == CONTENT
    assert httpx.head(url).status_code == 403


def test_the_link_answers_head_get_and_ranges_without_naming_the_bucket(staged):
    link = links.document_link(staged, lifetime=600)
    assert staged.document.bucket not in link and "report" not in link and link.endswith("/document.pdf")
    head = httpx.head(link)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(CONTENT)
    assert head.headers["accept-ranges"] == "bytes" and head.headers["content-type"] == "application/pdf"
    assert httpx.get(link).content == CONTENT
    first = httpx.get(link, headers={"Range": "bytes=0-99"})
    assert first.status_code == 206 and first.content == CONTENT[:100]
    assert first.headers["content-range"] == f"bytes 0-99/{len(CONTENT)}"
    tail = httpx.get(link, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == CONTENT[-10:]
    assert httpx.get(link, headers={"Range": f"bytes={len(CONTENT) + 5}-"}).status_code == 416


def test_tampered_expired_and_foreign_links_are_refused(staged):
    link = links.document_link(staged, lifetime=600)
    prefix, expires, signature, name = link.rsplit("/", 3)
    tampered = f"{prefix}/{expires}/{signature[:-2]}xx/{name}"
    longer = f"{prefix}/{int(expires) + 3600}/{signature}/{name}"
    expired = links.document_link(staged, lifetime=-1)
    other_job = link.replace(staged.job_id, "f" * 32)
    assert [httpx.get(u).status_code for u in (tampered, longer, expired, other_job)] == [403, 403, 403, 403]
    assert httpx.get(link.replace(staged.job_id, "not-a-job")).status_code == 404


def test_a_document_changed_after_staging_is_not_served(staged):
    """The GET is pinned to the staged ETag. The HEAD before it answers from the seal (what was
    staged), so the provider learns of the change from the download it then attempts."""
    link = links.document_link(staged, lifetime=600)
    storage.s3_client().put_object(Bucket=staged.document.bucket, Key=staged.document.key, Body=b"other bytes")
    assert httpx.get(link).status_code == 410
    assert httpx.get(link, headers={"Range": "bytes=0-9"}).status_code == 410
    head = httpx.head(link)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(CONTENT)


def test_a_head_is_answered_from_the_seal_without_asking_s3(stack, staged):
    """tuputech sends a HEAD before every download: answered from the sealed size and ETag, it
    costs no S3 request, as S3 failing every request meanwhile shows."""
    link = links.document_link(staged, lifetime=600)
    stack.s3_faults("error500", seconds=30)
    try:
        head = httpx.head(link)
    finally:
        stack.s3_faults("ok")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(CONTENT)
    assert head.headers["etag"] == f'"{staged.document.etag}"' and head.headers["content-type"] == "application/pdf"
    assert httpx.get(link).content == CONTENT


def test_the_signature_never_reaches_a_log_or_archive_through_redact(staged):
    link = links.document_link(staged, lifetime=600)
    signature = link.rsplit("/", 2)[-2]
    assert signature not in links.redact(f"downloading {link} failed")


def test_the_link_carries_where_the_document_is_and_needs_no_job_record(staged):
    """The receiver serves a link from what is sealed in it: with the job's Redis record gone (as
    while Redis restarts, when tuputech may well be downloading), the document is still served."""
    link = links.document_link(staged, lifetime=600)
    get_runtime().redis.delete(jobs.key(staged.job_id))
    assert httpx.get(link).content == CONTENT


def test_a_download_waits_out_s3_being_away_instead_of_failing(staged, monkeypatch):
    """tuputech fails a task whose download fails three times (code 14, "file error"): in
    bench.chaos' S3 outage, documents downloading then ended as provider_failed for an outage of
    ours. The link now waits S3 out (``DOCPIPE_LINK_OUTAGE_WAIT``) and then serves the bytes."""
    import asyncio

    from botocore.exceptions import EndpointConnectionError
    from starlette.requests import Request

    real = storage.s3_client()
    refusals = {"left": 2}

    class AwayAtFirst:
        def get_object(self, **kwargs):
            if refusals["left"]:
                refusals["left"] -= 1
                raise EndpointConnectionError(endpoint_url="http://s3.invalid")
            return real.get_object(**kwargs)

    monkeypatch.setattr(storage, "s3_client", lambda *args: AwayAtFirst())
    path = httpx.URL(links.document_link(staged, lifetime=600)).path
    job_id, expires, signature, name = path.split("/")[-4:]
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b"",
             "path_params": {"job_id": job_id, "expires": expires, "signature": signature, "name": name}}

    answer = asyncio.run(links.serve_document(Request(scope)))

    async def body() -> bytes:
        return b"".join([chunk async for chunk in answer.body_iterator])

    assert answer.status_code == 200 and asyncio.run(body()) == CONTENT
    assert refusals["left"] == 0
