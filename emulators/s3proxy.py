"""An S3 front that checks every request's Signature V4, as real S3 does, before moto sees it.

Why it exists: moto's server accepts any signature, ignores a presigned URL's method and
never lets one expire, so a client that signs wrongly (a presigned GET used for HEAD, a
stale URL, the wrong secret) passes every local test and fails only against AWS. This
proxy is the referee: it answers such requests with S3's own 403s and XML errors, and
hands the rest to moto unchanged. moto's S3 runs in this same process (``moto_wsgi``): one
HTTP hop, as with S3 itself, and a third of the CPU two servers took per request.

It also plays S3 outages on demand (``POST /_proxy/faults``): for a while every request
is answered 503 SlowDown (or 500 InternalError), as S3 does when it sheds load.

``python -m emulators.s3proxy --listen-port P --access-key testing --secret-key testing
[--region us-east-1]``

It also counts, per object key, the writes S3 accepted (``GET /_proxy/writes``): the
referee of "a result is archived once".

Control routes (no signature needed): ``POST /_proxy/faults`` with
``{"mode": "ok" | "slowdown" | "error500", "seconds": N}``, ``GET /_proxy/stats``,
``GET /_proxy/writes?suffix=S[&bucket=B]`` (``{"keys": {key: writes}}``, ``DELETE`` clears
it), ``GET /_proxy/health``. Nothing here comes from ``pipeline``: a referee that shared the
client's reading of the protocol could never catch its mistakes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate, parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote_to_bytes
from xml.sax.saxutils import escape

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulators import REFEREE_SERVER
from emulators.moto_wsgi import HOP_BY_HOP, MotoS3, WsgiAnswer, is_control, target_path

log = logging.getLogger("emulators.s3proxy")

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW_SECONDS = 15 * 60  # S3's RequestTimeTooSkewed threshold
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600  # S3 refuses X-Amz-Expires above a week
FAULT_MODES = ("ok", "slowdown", "error500")
# Object keys whose writes are counted; past it new keys are only counted as untracked (a
# key and its count take ~200 bytes: 50 MB at most).
MAX_WRITE_KEYS = 250_000
_HEX64 = re.compile(r"[0-9a-f]{64}")


class S3Error(Exception):
    """A refusal in S3's words: the status, the ``<Code>`` and the ``<Message>`` AWS would send."""

    def __init__(self, status: int, code: str, message: str, **details: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details

    def response(self, method: str) -> Response:
        request_id = secrets.token_hex(8).upper()
        headers = {
            "x-amz-request-id": request_id,
            "x-amz-id-2": secrets.token_urlsafe(48),
            "date": formatdate(usegmt=True),
        }
        if method == "HEAD":  # S3 sends HEAD errors with a status and no body
            return Response(status_code=self.status, headers=headers)
        extra = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in self.details.items())
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{escape(self.message)}</Message>{extra}"
            f"<RequestId>{request_id}</RequestId><HostId>{headers['x-amz-id-2']}</HostId></Error>"
        )
        return Response(body, status_code=self.status, media_type="application/xml", headers=headers)


# --- Signature V4, server side -------------------------------------------------------------------
#
# Computed from the request as it came off the wire, by the documented algorithm
# (https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html). botocore's
# signer works from the client's URL before it is sent; a server has only the wire form, so
# the canonical URI and query are rebuilt from the raw bytes: percent-decoded once and
# encoded once again the way the spec says, which is what S3 does (it never double-encodes
# and never normalises ``.``/``//`` segments). The test suite checks this against botocore.


def uri_encode(raw: bytes, safe: str) -> str:
    """RFC 3986 encoding as SigV4 wants it: everything but ``A-Za-z0-9-_.~`` and ``safe``."""
    return quote(raw, safe=safe)


def canonical_uri(raw_path: bytes) -> str:
    return uri_encode(unquote_to_bytes(raw_path), safe="/~") or "/"


def canonical_query(raw_query: bytes, drop: Iterable[str] = ()) -> str:
    """Every parameter decoded and re-encoded, sorted by name then value; ``+`` stays a plus."""
    skip = set(drop)
    pairs = []
    for part in raw_query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        name_enc = uri_encode(unquote_to_bytes(name), safe="-_.~")
        if name_enc not in skip:
            pairs.append((name_enc, uri_encode(unquote_to_bytes(value), safe="-_.~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_headers(headers: Mapping[str, list[str]], signed: list[str]) -> str:
    lines = []
    for name in signed:
        values = headers.get(name, [])
        lines.append(f"{name}:" + ",".join(" ".join(v.split()) for v in values))
    return "\n".join(lines) + "\n"


def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


@dataclass
class Verified:
    """What a valid signature leaves to check on the body: the SHA-256 it promised, if any."""

    access_key: str
    payload_sha256: str | None = None


@dataclass
class SigV4Verifier:
    """Checks requests against known credentials, for one region, as S3 does."""

    credentials: dict[str, str]
    region: str = "us-east-1"
    clock: Callable[[], float] = time.time  # epoch seconds; a test may pass another clock

    def verify(self, method: str, raw_path: bytes, raw_query: bytes, headers: Mapping[str, list[str]]) -> Verified:
        """Raise ``S3Error`` unless the request carries a valid SigV4 signature."""
        query_names = {unquote_to_bytes(p.partition(b"=")[0]).decode("latin-1") for p in raw_query.split(b"&") if p}
        authorization = (headers.get("authorization") or [""])[0]
        if "X-Amz-Algorithm" in query_names:
            if authorization:
                raise S3Error(400, "InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                              "query parameter, Signature query string parameter or the Authorization header "
                              "should be specified")
            return self._verify_presigned(method, raw_path, raw_query, headers)
        if authorization.startswith(ALGORITHM):
            return self._verify_header(method, raw_path, raw_query, headers, authorization)
        if authorization.startswith("AWS ") or {"AWSAccessKeyId", "Signature"} <= query_names:
            raise S3Error(400, "InvalidRequest", "The authorization mechanism you have provided is not supported. "
                          "Please use AWS4-HMAC-SHA256.")
        raise S3Error(403, "AccessDenied", "Access Denied")

    def _verify_header(
        self, method: str, raw_path: bytes, raw_query: bytes, headers: Mapping[str, list[str]], authorization: str
    ) -> Verified:
        fields = dict(
            item.strip().split("=", 1) for item in authorization[len(ALGORITHM):].split(",") if "=" in item
        )
        if not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
            raise S3Error(400, "AuthorizationHeaderMalformed", "The authorization header is malformed; "
                          "it must contain Credential, SignedHeaders and Signature.")
        try:
            if "x-amz-date" in headers:
                timestamp = headers["x-amz-date"][0]
            else:
                date = parsedate_to_datetime(headers["date"][0])
                timestamp = date.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        except (KeyError, TypeError, ValueError):
            raise S3Error(403, "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header") from None
        payload = (headers.get("x-amz-content-sha256") or [None])[0]
        if payload is None:
            raise S3Error(400, "InvalidRequest", "Missing required header for this request: x-amz-content-sha256")
        if not (_HEX64.fullmatch(payload) or payload == UNSIGNED_PAYLOAD or payload.startswith("STREAMING-")):
            raise S3Error(400, "InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                          "STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, "
                          "or a valid sha256 value.")
        when = self._parse_time(timestamp, "AuthorizationHeaderMalformed")
        if abs(self.clock() - when) > MAX_SKEW_SECONDS:
            raise S3Error(403, "RequestTimeTooSkewed", "The difference between the request time and the current "
                          "time is too large.", RequestTime=timestamp,
                          ServerTime=_iso(self.clock()), MaxAllowedSkewMilliseconds=str(MAX_SKEW_SECONDS * 1000))
        access_key = self._check_scope(fields["Credential"], timestamp, "AuthorizationHeaderMalformed")
        signed = fields["SignedHeaders"].split(";")
        # The payload hash is the header's value, whatever it is: S3 signs what the client declared
        # (for aws-chunked uploads a STREAMING-* constant) and checks a hex digest against the body.
        self._check_signature(method, raw_path, canonical_query(raw_query), headers, signed, payload,
                              fields["Credential"], timestamp, fields["Signature"], access_key)
        return Verified(access_key, payload if _HEX64.fullmatch(payload) else None)

    def _verify_presigned(
        self, method: str, raw_path: bytes, raw_query: bytes, headers: Mapping[str, list[str]]
    ) -> Verified:
        params: dict[str, str] = {}
        for part in raw_query.split(b"&"):
            name, _, value = part.partition(b"=")
            params.setdefault(unquote_to_bytes(name).decode(errors="replace"),
                              unquote_to_bytes(value).decode(errors="replace"))
        error = "AuthorizationQueryParametersError"
        missing = [p for p in ("X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
                               "X-Amz-Signature") if p not in params]
        if params["X-Amz-Algorithm"] != ALGORITHM or missing:
            raise S3Error(400, error, "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                          "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
                          "X-Amz-Expires parameters.")
        timestamp = params["X-Amz-Date"]
        access_key = self._check_scope(params["X-Amz-Credential"], timestamp, error)
        when = self._parse_time(timestamp, error)
        try:
            expires = int(params["X-Amz-Expires"])
        except ValueError:
            raise S3Error(400, error, "X-Amz-Expires should be a number") from None
        if not 0 < expires <= MAX_PRESIGN_EXPIRES:
            raise S3Error(400, error, "X-Amz-Expires must be less than a week (in seconds) that is 604800")
        now = self.clock()
        if now > when + expires:
            raise S3Error(403, "AccessDenied", "Request has expired", **{
                "X-Amz-Expires": str(expires), "Expires": _iso(when + expires), "ServerTime": _iso(now)})
        payload = (headers.get("x-amz-content-sha256") or [UNSIGNED_PAYLOAD])[0]
        self._check_signature(method, raw_path, canonical_query(raw_query, drop=["X-Amz-Signature"]), headers,
                              params["X-Amz-SignedHeaders"].split(";"), payload, params["X-Amz-Credential"],
                              timestamp, params["X-Amz-Signature"], access_key)
        return Verified(access_key)

    def _parse_time(self, timestamp: str, error: str) -> float:
        try:
            return datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise S3Error(400, error, f"X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\", "
                          f"got {timestamp!r}") from None

    def _check_scope(self, credential: str, timestamp: str, error: str) -> str:
        """The access key of a well-formed credential scope for this region; S3's refusals otherwise."""
        parts = credential.split("/")
        if len(parts) != 5:
            raise S3Error(400, error, f"Error parsing the X-Amz-Credential parameter; the Credential is mal-formed; "
                          f"expecting \"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request\". ({credential})")
        access_key, date, region, service, terminator = parts
        if access_key not in self.credentials:
            raise S3Error(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our "
                          "records.", AWSAccessKeyId=access_key)
        if date != timestamp[:8]:
            raise S3Error(400, error, f"Invalid credential date \"{date}\". This date is not the same as "
                          f"X-Amz-Date: \"{timestamp[:8]}\".")
        if region != self.region:
            raise S3Error(400, error, f"The authorization header is malformed; the region '{region}' is wrong; "
                          f"expecting '{self.region}'", Region=self.region)
        if service != "s3" or terminator != "aws4_request":
            raise S3Error(400, error, f"The authorization header is malformed; incorrect service \"{service}\" "
                          f"or terminal \"{terminator}\". This endpoint belongs to \"s3\".")
        return access_key

    def _check_signature(
        self, method: str, raw_path: bytes, query: str, headers: Mapping[str, list[str]], signed: list[str],
        payload: str, credential: str, timestamp: str, provided: str, access_key: str,
    ) -> None:
        if "host" not in signed:
            raise S3Error(403, "AccessDenied", "There were headers present in the request which were not signed",
                          HeadersNotSigned="host")
        canonical = "\n".join([method, canonical_uri(raw_path), query, canonical_headers(headers, signed),
                               ";".join(signed), payload])
        scope = credential.split("/", 1)[1]
        to_sign = "\n".join([ALGORITHM, timestamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = signing_key(self.credentials[access_key], timestamp[:8], self.region)
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), provided.encode("utf-8", "replace")):
            raise S3Error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the "
                          "signature you provided. Check your key and signing method.", AWSAccessKeyId=access_key,
                          StringToSign=to_sign, SignatureProvided=provided, CanonicalRequest=canonical)


def _operation(method: str, raw_path: bytes, raw_query: bytes) -> str:
    """A request's kind, for the statistics: method, object or bucket, and its sub-resource
    (the first query parameter: ``uploads``, ``delete``, ``list-type`` ...), never the key."""
    target = "object" if b"/" in raw_path.strip(b"/") else "bucket"
    sub = raw_query.split(b"&", 1)[0].split(b"=", 1)[0].decode("latin-1") if raw_query else ""
    return f"{method} {target}" + (f"?{sub}" if sub else "")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the proxy -----------------------------------------------------------------------------------


@dataclass
class Faults:
    mode: str = "ok"
    until: float | None = None  # time.monotonic() the fault ends; None: until told otherwise

    def active(self) -> str | None:
        if self.mode != "ok" and self.until is not None and time.monotonic() >= self.until:
            self.mode, self.until = "ok", None
        return None if self.mode == "ok" else self.mode

    def as_dict(self) -> dict[str, Any]:
        mode = self.active() or "ok"
        remaining = None if self.until is None else max(0.0, self.until - time.monotonic())
        return {"mode": mode, "remaining_seconds": remaining}


def written_key(method: str, raw_path: bytes, raw_query: bytes) -> tuple[str, str] | None:
    """``(bucket, key)`` when this request, answered 2xx, wrote an object's content; else None.

    Writes are PutObject and CopyObject (a PUT to a key with no sub-resource) and
    CompleteMultipartUpload (a POST with only ``uploadId``). A part upload, a tag or ACL
    change is no write of the object. Query parameters of the signature (``X-Amz-*``) and
    botocore's ``x-id`` name no sub-resource. Path-style addressing only, which is what a
    client pointed at this proxy by endpoint URL uses.
    """
    if method not in ("PUT", "POST"):
        return None
    names = set()
    for part in raw_query.split(b"&"):
        name = unquote_to_bytes(part.partition(b"=")[0]).decode("utf-8", "replace")
        if name and not name.lower().startswith("x-amz-") and name != "x-id":
            names.add(name)
    if (method, names) not in (("PUT", set()), ("POST", {"uploadId"})):
        return None
    bucket, _, key = unquote_to_bytes(raw_path).decode("utf-8", "replace").lstrip("/").partition("/")
    if not bucket or not key or is_control(raw_path):
        return None
    return bucket, key


class WriteCounts:
    """Successful writes per object key, bounded: keys past ``limit`` are counted in bulk only."""

    def __init__(self, limit: int = MAX_WRITE_KEYS) -> None:
        self.limit = limit
        self.counts: dict[tuple[str, str], int] = {}
        self.untracked = 0

    def add(self, bucket: str, key: str) -> None:
        where = (bucket, key)
        if where in self.counts or len(self.counts) < self.limit:
            self.counts[where] = self.counts.get(where, 0) + 1
        else:
            self.untracked += 1

    def matching(self, suffix: str, bucket: str | None = None) -> dict[str, int]:
        """Counts by key; without ``bucket``, a key written in several buckets sums them."""
        found: dict[str, int] = {}
        for (in_bucket, key), count in self.counts.items():
            if key.endswith(suffix) and (bucket is None or in_bucket == bucket):
                found[key] = found.get(key, 0) + count
        return found


class PayloadMismatch(Exception):
    """The body's SHA-256 is not the one the client signed."""

    def __init__(self, declared: str, computed: str) -> None:
        super().__init__(declared)
        self.declared, self.computed = declared, computed


# Requests whose bodies are held at once (each is read whole before moto sees it): bounded, so
# that sixteen uploaders of 8 MB parts and more cannot pile their bodies up in this process.
MAX_IN_MOTO = 16


class S3Proxy:
    """The routes and state of one front: verifier, moto's S3 behind it, faults and counters."""

    def __init__(self, credentials: dict[str, str], region: str = "us-east-1") -> None:
        self.moto = MotoS3()
        self.in_moto = asyncio.Semaphore(MAX_IN_MOTO)
        self.verifier = SigV4Verifier(dict(credentials), region)
        self.faults = Faults()
        self.counts: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.operations: Counter[str] = Counter()  # forwarded requests by kind ("GET object", "GET bucket?list-type")
        self.writes = WriteCounts()

    # -- control routes ------------------------------------------------------------------------

    async def set_faults(self, request: Request) -> JSONResponse:
        body = await request.json()
        mode = body.get("mode", "ok")
        if mode not in FAULT_MODES:
            return JSONResponse({"error": f"mode must be one of {FAULT_MODES}"}, status_code=400)
        seconds = body.get("seconds")
        self.faults.mode = mode
        self.faults.until = None if mode == "ok" or seconds is None else time.monotonic() + float(seconds)
        return JSONResponse(self.faults.as_dict())

    async def stats(self, request: Request) -> JSONResponse:
        return JSONResponse({
            "forwarded": self.counts["forwarded"],
            "refused_signature": self.counts["refused_signature"],
            "refused_fault": self.counts["refused_fault"],
            "moto_errors": self.counts["moto_errors"],
            "refusals_by_code": dict(self.refusals),
            "operations": dict(self.operations),
            "faults": self.faults.as_dict(),
        })

    async def written(self, request: Request) -> JSONResponse:
        if request.method == "DELETE":
            self.writes = WriteCounts()
            return JSONResponse({"cleared": True})
        suffix = request.query_params.get("suffix", "")
        keys = self.writes.matching(suffix, request.query_params.get("bucket"))
        return JSONResponse({"keys": keys, "untracked_writes": self.writes.untracked})

    # -- S3 ----------------------------------------------------------------------------------------

    async def s3(self, request: Request) -> Response:
        method = request.method
        if fault := self.faults.active():
            self.counts["refused_fault"] += 1
            if fault == "slowdown":
                error = S3Error(503, "SlowDown", "Please reduce your request rate.")
            else:
                error = S3Error(500, "InternalError", "We encountered an internal error. Please try again.")
            return self._refuse(request, error)
        headers: dict[str, list[str]] = {}
        for raw_name, raw_value in request.scope["headers"]:
            headers.setdefault(raw_name.decode("latin-1").lower(), []).append(raw_value.decode("latin-1"))
        raw_path = target_path(request.scope)
        raw_query: bytes = request.scope.get("query_string", b"")
        # moto's own control API is not S3 and carries no signature; CORS preflights are unsigned on S3.
        if is_control(raw_path) or method == "OPTIONS":
            verified = Verified("")
        else:
            try:
                verified = self.verifier.verify(method, raw_path, raw_query, headers)
            except S3Error as error:
                self.counts["refused_signature"] += 1
                self.refusals[error.code] += 1
                log.warning("refused %s %s: %s", method, raw_path.decode("latin-1"), error)
                return self._refuse(request, error)
        return await self._forward(request, raw_path, raw_query, verified)

    @staticmethod
    def _refuse(request: Request, error: S3Error) -> Response:
        """S3's error, closing the connection if the client still holds back its body.

        Why: a client that sent ``Expect: 100-continue`` and gets a final answer never sends
        the body the connection still owes; reused (botocore does), its next request would be
        read as that body. Other clients' unread bodies are read and discarded by the server.
        """
        response = error.response(request.method)
        if request.headers.get("expect", "").lower() == "100-continue":
            response.headers["connection"] = "close"
        return response

    async def _forward(self, request: Request, raw_path: bytes, raw_query: bytes, verified: Verified) -> Response:
        """Hand the request to moto once its body is known to be the one the client signed:
        moto never stores what S3 would have refused (XAmzContentSHA256Mismatch)."""
        async with self.in_moto:  # bodies are read whole: a bounded number of them at once
            try:
                body = await request.body()
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening any more
            try:
                # In a thread, as werkzeug's threaded server ran moto: a large body's hash and copy do not hold the loop.
                answer = await run_in_threadpool(self._checked_call, request.scope, body, verified.payload_sha256)
            except PayloadMismatch as mismatch:
                self.counts["refused_signature"] += 1
                self.refusals["XAmzContentSHA256Mismatch"] += 1
                return S3Error(400, "XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not "
                               "match what was computed.", ClientComputedContentSHA256=mismatch.declared,
                               S3ComputedContentSHA256=mismatch.computed).response(request.method)
            except Exception as exc:  # moto's own failure: S3's 500, and the front stays up
                self.counts["moto_errors"] += 1
                log.warning("moto failed on %s %s: %r", request.method, raw_path.decode("latin-1"), exc)
                return S3Error(500, "InternalError", "We encountered an internal error. Please try again.").response(request.method)
        self.counts["forwarded"] += 1
        self.operations[_operation(request.method, raw_path, raw_query)] += 1
        # S3 has committed a write once it answers 2xx (a 412 to a conditional PUT wrote nothing).
        if 200 <= answer.status < 300 and (where := written_key(request.method, raw_path, raw_query)):
            self.writes.add(*where)
        response = Response(answer.body, status_code=answer.status)
        # moto's headers as it set them: a HEAD's Content-Length is the object's, not the empty body's.
        response.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers if k.lower() not in HOP_BY_HOP
        ]
        if not any(name == b"date" for name, _ in response.raw_headers):  # werkzeug's server added it; S3 sends one
            response.raw_headers.append((b"date", formatdate(usegmt=True).encode("latin-1")))
        return response

    def _checked_call(self, scope: dict[str, Any], body: bytes, declared: str | None) -> WsgiAnswer:
        if declared and (computed := hashlib.sha256(body).hexdigest()) != declared:
            raise PayloadMismatch(declared, computed)
        return self.moto(scope, body)


def create_app(
    access_key: str = "testing", secret_key: str = "testing", region: str = "us-east-1",
    *, credentials: dict[str, str] | None = None,
) -> Starlette:
    """The front and moto's S3 as one ASGI app; ``credentials`` (access key -> secret) adds more key pairs."""
    proxy = S3Proxy({access_key: secret_key, **(credentials or {})}, region)
    methods = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]
    app = Starlette(
        routes=[
            Route("/_proxy/faults", proxy.set_faults, methods=["POST"]),
            Route("/_proxy/stats", proxy.stats, methods=["GET"]),
            Route("/_proxy/writes", proxy.written, methods=["GET", "DELETE"]),
            Route("/_proxy/health", lambda request: JSONResponse({"ok": True}), methods=["GET"]),
            Route("/{path:path}", proxy.s3, methods=methods),
        ],
    )
    app.state.proxy = proxy
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulators.s3proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--access-key", default="testing")
    parser.add_argument("--secret-key", default="testing")
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(args.access_key, args.secret_key, args.region)
    # No Date/Server of uvicorn's: moto's answers carry S3's (see ``_forward``), refusals their own.
    uvicorn.run(app, host=args.listen_host, port=args.listen_port, log_level="warning", access_log=False,
                date_header=False, server_header=False, **REFEREE_SERVER)


if __name__ == "__main__":
    main()
