"""Document links a provider downloads from: signed, short-lived paths on the docpipe receiver.

Why not an S3 presigned URL: tuputech's seed requires the link to answer ``HEAD`` (it measures
the size first) and recommends ranged downloads. A presigned URL signs its method, so on real
S3 a presigned GET refuses HEAD (moto does not check, which is how it went unnoticed), and it
would name the bucket and key to a third party. Here the link names only the job; the
receiver checks it, and streams the staged object from S3 with its own credentials: HEAD and
single ranges included, pinned to the ETag that ``stage`` measured, so the provider gets
exactly the bytes docpipe checked.

Where the object is (bucket, key, ETag, size, format) travels in the link itself, sealed: encrypted
and authenticated (AES-GCM) with a deployment key, bound to the job id and the expiry. The
provider learns nothing from it and cannot change a byte of it, and the receiver needs no
Redis to serve it: a provider that downloads while Redis restarts gets its document (it used
to get a 500, and after its three tries failed the document with code 14). A HEAD is answered
from the seal alone, with the size and ETag ``stage`` measured: it costs no S3 request (one per
document, in the burst where every first document is downloaded at once), and the GET that
follows is still pinned to the ETag, so an object changed since staging is refused there. The key is the
setting ``DOCPIPE_LINK_SECRET``, or else one random key per deployment kept in Redis (made
once, shared by every worker and receiver, read once per process).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pipeline import jobs, storage
from pipeline.config import get_settings
from pipeline.errors import is_outage
from pipeline.models import Job
from pipeline.runtime import BuiltOnce, get_runtime
from pipeline.sniff import FORMAT_EXTENSIONS

log = logging.getLogger(__name__)

SECRET_KEY = "docpipe:link-secret"
MEDIA_TYPES = {
    "pdf": "application/pdf",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "gif": "image/gif",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "doc": "application/msword",
    "html": "text/html; charset=utf-8",
    "txt": "text/plain; charset=utf-8",
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_TOKEN = 4096  # an S3 key is at most 1024 bytes; the sealed location fits with room


@BuiltOnce
def _secret() -> bytes:
    configured = get_runtime().settings.link_secret.get_secret_value()
    if configured:
        return configured.encode()
    client = get_runtime().redis
    client.set(SECRET_KEY, secrets.token_hex(32), nx=True)
    return client.get(SECRET_KEY)


def _sealer() -> AESGCM:
    return AESGCM(hashlib.sha256(b"docpipe document links\n" + _secret()).digest())


def warm_up() -> None:
    """Read the link key (a Redis round trip when it is not configured) before the first link needs it."""
    _sealer()


def _seal(job_id: str, expires: int, where: dict[str, Any]) -> str:
    nonce = secrets.token_bytes(12)
    sealed = _sealer().encrypt(nonce, json.dumps(where, separators=(",", ":")).encode(), f"{job_id}\n{expires}".encode())
    return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def _unseal(job_id: str, expires: int, token: str) -> dict[str, Any] | None:
    """The object's location, or None for a token this deployment did not seal for this job and expiry."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return json.loads(_sealer().decrypt(raw[:12], raw[12:], f"{job_id}\n{expires}".encode()))
    except (ValueError, InvalidTag):
        return None


def document_link(job: Job, lifetime: float) -> str:
    """A link to the job's staged document, valid for ``lifetime`` seconds (the document's deadline)."""
    document = job.document
    assert document is not None
    expires = int(time.time() + lifetime)
    where = {"b": document.bucket, "k": document.key, "e": document.etag or "", "s": document.size, "f": document.format}
    token = _seal(job.job_id, expires, where)
    base = get_runtime().settings.callback_base_url.rstrip("/")
    name = f"document.{FORMAT_EXTENSIONS.get(document.format, document.format)}"
    return f"{base}/documents/{job.job_id}/{expires}/{token}/{name}"


def redact(text: str) -> str:
    """A link with its signature replaced, for anything that is logged or kept."""
    return re.sub(r"(/documents/[0-9a-f]{32}/\d+/)[A-Za-z0-9_-]+", r"\1REDACTED", text)


# --- the receiver's side ---------------------------------------------------------------------


def _refused(status: int, reason: str) -> Response:
    return PlainTextResponse(reason, status_code=status)


def _single_range(header: str | None) -> str | None:
    """The ``Range`` header when it asks for one range of bytes (S3 serves exactly those forms);
    None for the whole object: several ranges are answered whole, which HTTP allows."""
    if header and _RANGE.fullmatch(header.strip()) and header.strip() != "bytes=-":
        return header.strip()
    return None


def _stream(body) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(storage.CHUNK)
    finally:
        body.close()


async def serve_document(request: Request) -> Response:
    """``GET``/``HEAD /documents/{job_id}/{expires}/{signature}/{name}``: the staged bytes, or a refusal.

    Refused before any S3 request when the path is malformed, expired or not sealed by us.

    S3 away: the provider's download waits here rather than fail. tuputech, told "file error"
    three times in a row, fails the task (code 14): in bench.chaos' 30 s S3 outage, ten to
    fourteen documents downloading then ended as provider_failed, for an outage of ours. The
    wait sleeps on the event loop, not in a thread: thirty waiting downloads held the receiver's
    threads, and the callbacks that came meanwhile found none.
    """
    opened = _open(request)
    if isinstance(opened, Response):
        return opened
    if request.method == "HEAD" and opened.get("e") and isinstance(opened.get("s"), int):
        return _head_from_seal(opened)
    deadline = time.monotonic() + get_settings().link_outage_wait
    delay, waited = 0.5, False
    while True:
        try:
            answer = await run_in_threadpool(_answer, request, opened)
        except Exception as exc:
            if not is_outage(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("document link of %s: S3 unavailable (%s); the download waits", request.path_params.get("job_id"), type(exc).__name__)
            await asyncio.sleep(delay)
            await run_in_threadpool(_note_late_download, request.path_params["job_id"])
            delay, waited = min(2 * delay, 5.0), True
            continue
        if waited:
            await run_in_threadpool(_note_late_download, request.path_params["job_id"])
        return answer


def _note_late_download(job_id: str) -> None:
    """The provider is still waiting for the document, or got it late, so its task starts late:
    the time by which its callback must come counts from now (``Provider.overdue_at``), or the
    document would end as callback_missing while its download still waited here."""
    try:
        jobs.record(get_runtime().redis, job_id, document_served_at=time.time())
    except Exception as exc:  # noqa: BLE001 - the download matters more than the note
        log.info("document link of %s: late download not noted (%s)", job_id, type(exc).__name__)


def _open(request: Request) -> dict[str, Any] | Response:
    """The sealed location of a well-formed, unexpired link of ours; else the refusal (no S3 request)."""
    job_id, expires_text, token = (request.path_params[k] for k in ("job_id", "expires", "signature"))
    if not _JOB_ID.fullmatch(job_id) or not expires_text.isdigit() or len(token) > MAX_TOKEN:
        return _refused(404, "not found")
    expires = int(expires_text)
    if time.time() > expires:
        return _refused(403, "link expired")
    where = _unseal(job_id, expires, token)
    if not where or not where.get("b") or not where.get("k"):
        return _refused(403, "bad signature")
    return where


def _head_from_seal(where: dict[str, Any]) -> Response:
    """What S3's HEAD would say of the object as staged (links sealed before the size was sealed ask S3)."""
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(where["s"]), "ETag": f'"{where["e"]}"'}
    return Response(status_code=200, headers=headers, media_type=MEDIA_TYPES.get(where.get("f", ""), "application/octet-stream"))


def _answer(request: Request, where: dict[str, Any]) -> Response:
    bucket, key, etag = where["b"], where["k"], where.get("e", "")
    pinned = {"IfMatch": f'"{etag}"'} if etag else {}
    media_type = MEDIA_TYPES.get(where.get("f", ""), "application/octet-stream")
    client = storage.s3_client()
    try:
        if request.method == "HEAD":
            meta = client.head_object(Bucket=bucket, Key=key, **pinned)
            headers = {"Accept-Ranges": "bytes", "Content-Length": str(meta["ContentLength"]), "ETag": meta["ETag"]}
            return Response(status_code=200, headers=headers, media_type=media_type)
        wanted = _single_range(request.headers.get("range"))
        answer = client.get_object(Bucket=bucket, Key=key, **pinned, **({"Range": wanted} if wanted else {}))
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412"):
            return _refused(410, "the document changed since it was staged")
        if code in ("404", "NoSuchKey", "NotFound"):
            return _refused(404, "not found")
        if code == "InvalidRange":
            return _refused(416, "range not satisfiable")
        raise
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(answer["ContentLength"]), "ETag": answer["ETag"]}
    if answer.get("ContentRange"):
        headers["Content-Range"] = answer["ContentRange"]
    status = 206 if answer.get("ContentRange") else 200
    return StreamingResponse(_stream(answer["Body"]), status_code=status, headers=headers, media_type=media_type)


def routes() -> list[Route]:
    return [
        Route("/documents/{job_id}/{expires}/{signature}/{name}", serve_document, methods=["GET", "HEAD"]),
    ]
