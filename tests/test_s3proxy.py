"""The S3 signature-checking front as a real process, with moto's real S3 inside it.

What is pinned: everything boto3 does through it works (keys with spaces, unicode, ``%``,
``+``; multipart uploads; ranges), byte for byte; and it refuses what AWS
refuses, with AWS's codes: a presigned GET used for HEAD, a tampered or expired URL, the
wrong secret, an unknown key, a body that is not the one signed, no signature at all.
Outages come from its fault switch. Signatures are made by botocore (boto3 itself, or
botocore's signer on hand-made requests), never by the code under test.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import boto3
import httpx
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from pipeline.devstack import free_port, wait_until

# Its module-scoped servers start once, on one xdist worker, not once on every worker that runs one of its tests.
pytestmark = pytest.mark.xdist_group("s3proxy")

MB = 1024 * 1024
BUCKET = "proxy-tests"
AWKWARD_KEYS = [
    "with space.txt",
    "ünïcödé/日本語 €.txt",
    "100%.txt",
    "a+b=c&d.txt",
    "%20literal%2F.txt",
    "tilde~(parens)!'*.txt",
    "semi;colon,comma:@$.txt",
    "question?hash#.txt",
]


@dataclass
class ProxiedS3:
    endpoint: str  # the proxy
    proxy: subprocess.Popen

    def client(self, secret: str = "testing", key: str = "testing", region: str = "us-east-1") -> BaseClient:
        """boto3 as the pipeline makes it, minus retries: every refusal must surface, not be retried away."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
            region_name=region, config=Config(signature_version="s3v4", retries={"total_max_attempts": 1}),
        )

    def faults(self, mode: str, seconds: float | None = None) -> dict:
        return httpx.post(f"{self.endpoint}/_proxy/faults", json={"mode": mode, "seconds": seconds}).json()

    def stats(self) -> dict:
        return httpx.get(f"{self.endpoint}/_proxy/stats").json()

    def signed(self, method: str, path: str, body: bytes = b"", *, send: bytes | None = None,
               send_method: str | None = None, region: str = "us-east-1") -> httpx.Response:
        """A request signed by botocore's own S3 signer; ``send``/``send_method`` change it after signing."""
        request = AWSRequest(method=method, url=f"{self.endpoint}{path}", data=body)
        S3SigV4Auth(Credentials("testing", "testing"), "s3", region).add_auth(request)
        return httpx.request(send_method or method, request.url, headers=dict(request.headers.items()),
                             content=body if send is None else send)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedS3]:
    proxy_port = free_port()
    log = tmp_path_factory.mktemp("s3proxy") / "s3proxy.log"  # a file, not a pipe: a full pipe would block it
    with log.open("wb") as sink:  # the child keeps its own descriptor
        proxy = subprocess.Popen(
            [sys.executable, "-m", "emulators.s3proxy", "--listen-port", str(proxy_port),
             "--access-key", "testing", "--secret-key", "testing"],
            stdout=subprocess.DEVNULL, stderr=sink,
        )
    front = ProxiedS3(f"http://127.0.0.1:{proxy_port}", proxy)
    try:
        wait_until(lambda: httpx.get(f"{front.endpoint}/_proxy/health").status_code == 200, 30, "s3proxy")
        assert httpx.get(f"{front.endpoint}/moto-api/").status_code == 200  # moto's own control pages, unsigned
        front.client().create_bucket(Bucket=BUCKET)
        yield front
    finally:
        proxy.terminate()
        proxy.wait(10)
        assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def s3(proxied: ProxiedS3) -> Iterator[BaseClient]:
    proxied.faults("ok")
    yield proxied.client()
    proxied.faults("ok")


def _code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return error.value.response["Error"]["Code"]


# --- what must work ------------------------------------------------------------------------------


def test_bucket_and_object_round_trip(proxied: ProxiedS3, s3: BaseClient) -> None:
    s3.create_bucket(Bucket="proxy-crud")
    assert "proxy-crud" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    body = bytes(range(256)) * 40
    put = s3.put_object(Bucket="proxy-crud", Key="doc.bin", Body=body, ContentType="application/x-test")
    got = s3.get_object(Bucket="proxy-crud", Key="doc.bin")
    assert got["Body"].read() == body and got["ETag"] == put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    part = s3.get_object(Bucket="proxy-crud", Key="doc.bin", Range="bytes=100-1099")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 100-1099/{len(body)}" and part["ContentLength"] == 1000
    assert part["Body"].read() == body[100:1100]
    head = s3.head_object(Bucket="proxy-crud", Key="doc.bin")
    assert head["ContentLength"] == len(body) and head["ContentType"] == "application/x-test"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="proxy-crud")["Contents"]] == ["doc.bin"]
    s3.delete_object(Bucket="proxy-crud", Key="doc.bin")
    with pytest.raises(ClientError) as gone:
        s3.head_object(Bucket="proxy-crud", Key="doc.bin")
    assert gone.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    s3.delete_bucket(Bucket="proxy-crud")


def test_awkward_keys(proxied: ProxiedS3, s3: BaseClient) -> None:
    for n, key in enumerate(AWKWARD_KEYS):
        body = f"body {n} of {key}".encode()
        s3.put_object(Bucket=BUCKET, Key=f"awkward/{key}", Body=body)
        assert s3.get_object(Bucket=BUCKET, Key=f"awkward/{key}")["Body"].read() == body, key
        assert s3.head_object(Bucket=BUCKET, Key=f"awkward/{key}")["ContentLength"] == len(body), key
        url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": f"awkward/{key}"})
        assert httpx.get(url).content == body, key
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="awkward/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"awkward/{k}" for k in AWKWARD_KEYS)
    for key in AWKWARD_KEYS:
        s3.delete_object(Bucket=BUCKET, Key=f"awkward/{key}")
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="awkward/")


def test_multipart_upload_file(proxied: ProxiedS3, s3: BaseClient, tmp_path: Path) -> None:
    source, copy = tmp_path / "big.bin", tmp_path / "copy.bin"
    data = os.urandom(20 * MB)
    source.write_bytes(data)
    transfer = TransferConfig(multipart_threshold=8 * MB, multipart_chunksize=8 * MB, max_concurrency=3)
    s3.upload_file(str(source), BUCKET, "big/upload.bin", Config=transfer)
    head = s3.head_object(Bucket=BUCKET, Key="big/upload.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-3"')  # three parts
    s3.download_file(BUCKET, "big/upload.bin", str(copy), Config=transfer)  # ranged GETs, in parallel
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(data).digest()
    across = s3.get_object(Bucket=BUCKET, Key="big/upload.bin", Range=f"bytes={8 * MB - 10}-{8 * MB + 9}")
    assert across["Body"].read() == data[8 * MB - 10: 8 * MB + 10]


def test_a_large_body_goes_through_whole(s3: BaseClient) -> None:
    """48 MB in one PUT (one Content-Length, no parts) and back, read in chunks.

    Its memory is not checked here: the front reads a body whole (it must know the body's hash
    before moto may store it; at most ``MAX_IN_MOTO`` bodies at once) and moto copies it as it
    stores it, all in one process now. Standalone ``moto.server``'s own RSS grew by about 48 MB
    per 48 MB object put (measured), so what the front adds is not told apart by RSS.
    """
    data = os.urandom(48 * MB)
    s3.put_object(Bucket=BUCKET, Key="big/single.bin", Body=io.BytesIO(data))
    got = s3.get_object(Bucket=BUCKET, Key="big/single.bin")["Body"]
    digest = hashlib.sha256()
    for chunk in got.iter_chunks(1 * MB):
        digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()


def test_streaming_trailer_upload(proxied: ProxiedS3, s3: BaseClient) -> None:
    """What boto3 sends over TLS: aws-chunked body, STREAMING-UNSIGNED-PAYLOAD-TRAILER, a CRC32 trailer.

    boto3 only does it on https endpoints; the handler below makes it do so here.
    """
    sent: dict[str, str] = {}

    def trailer(params: dict, **_: object) -> None:
        params["context"]["checksum"]["request_algorithm"]["in"] = "trailer"

    def keep_headers(request: AWSRequest, **_: object) -> None:
        sent.update({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    s3.meta.events.register("before-call.s3.PutObject", trailer)
    s3.meta.events.register("before-send.s3.PutObject", keep_headers)
    data = os.urandom(3 * MB + 17)
    s3.put_object(Bucket=BUCKET, Key="chunked.bin", Body=io.BytesIO(data))
    assert sent["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert "aws-chunked" in sent["content-encoding"] and sent["x-amz-trailer"] == "x-amz-checksum-crc32"
    assert s3.get_object(Bucket=BUCKET, Key="chunked.bin")["Body"].read() == data


# --- what must be refused --------------------------------------------------------------------------


def test_presigned_url_is_for_its_method_only(proxied: ProxiedS3, s3: BaseClient) -> None:
    s3.put_object(Bucket=BUCKET, Key="presigned.txt", Body=b"presigned body")
    get_url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "presigned.txt"})
    before = proxied.stats()["refusals_by_code"].get("SignatureDoesNotMatch", 0)
    assert httpx.get(get_url).content == b"presigned body"
    head = httpx.head(get_url)
    assert head.status_code == 403 and head.content == b""  # S3 answers HEAD errors without a body
    assert proxied.stats()["refusals_by_code"]["SignatureDoesNotMatch"] == before + 1
    head_url = s3.generate_presigned_url("head_object", Params={"Bucket": BUCKET, "Key": "presigned.txt"})
    assert httpx.head(head_url).status_code == 200
    put_url = s3.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": "presigned-put.txt"})
    assert httpx.put(put_url, content=b"uploaded").status_code == 200
    assert httpx.get(put_url).status_code == 403
    assert s3.get_object(Bucket=BUCKET, Key="presigned-put.txt")["Body"].read() == b"uploaded"


def test_tampered_presigned_urls(proxied: ProxiedS3, s3: BaseClient) -> None:
    s3.put_object(Bucket=BUCKET, Key="tamper.txt", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key="other.txt", Body=b"y")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "tamper.txt"}, ExpiresIn=60)
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    for tampered in (url.replace(signature, flipped), url.replace("tamper.txt", "other.txt"),
                     url.replace("X-Amz-Expires=60", "X-Amz-Expires=600")):
        response = httpx.get(tampered)
        assert response.status_code == 403
        assert "<Code>SignatureDoesNotMatch</Code>" in response.text
    assert httpx.get(url).content == b"x"


def test_expired_presigned_url(proxied: ProxiedS3, s3: BaseClient) -> None:
    s3.put_object(Bucket=BUCKET, Key="expiring.txt", Body=b"soon gone")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "expiring.txt"}, ExpiresIn=1)
    wait_until(lambda: httpx.get(url).status_code == 403, 10, "the URL to expire", interval=0.1)
    response = httpx.get(url)
    assert "<Code>AccessDenied</Code>" in response.text and "<Message>Request has expired</Message>" in response.text


def test_wrong_credentials(proxied: ProxiedS3) -> None:
    with pytest.raises(ClientError) as wrong_secret:
        proxied.client(secret="not-the-secret").list_objects_v2(Bucket=BUCKET)
    assert _code(wrong_secret) == "SignatureDoesNotMatch"
    assert wrong_secret.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as unknown_key:
        proxied.client(key="AKIDNOBODYKNOWS").list_objects_v2(Bucket=BUCKET)
    assert _code(unknown_key) == "InvalidAccessKeyId"
    with pytest.raises(ClientError) as on_head:  # HEAD errors carry no body: botocore sees the status only
        proxied.client(secret="not-the-secret").head_bucket(Bucket=BUCKET)
    assert on_head.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_unsigned_and_misdirected_requests(proxied: ProxiedS3) -> None:
    with httpx.Client(base_url=proxied.endpoint) as client:  # one connection, kept across refusals
        unsigned = client.put(f"/{BUCKET}/unsigned.bin", content=b"u" * (2 * MB))
        assert unsigned.status_code == 403 and "<Code>AccessDenied</Code>" in unsigned.text
        unsigned = client.get(f"/{BUCKET}")
        assert unsigned.status_code == 403 and "<Code>AccessDenied</Code>" in unsigned.text
    elsewhere = proxied.signed("GET", f"/{BUCKET}", region="eu-west-1")
    assert elsewhere.status_code == 400 and "<Code>AuthorizationHeaderMalformed</Code>" in elsewhere.text
    assert proxied.signed("GET", f"/{BUCKET}").status_code == 200  # botocore's signer, raw request: fine


def test_one_date_header_on_answers_and_refusals(proxied: ProxiedS3) -> None:
    """Two Date headers are joined by clients into one date nobody can parse."""
    answered = proxied.signed("GET", f"/{BUCKET}")
    refused = httpx.get(f"{proxied.endpoint}/{BUCKET}")
    assert (answered.status_code, refused.status_code) == (200, 403)
    for response in (answered, refused):
        assert len(response.headers.get_list("date")) == 1, response.headers


def test_metadata_keys_keep_their_underscores(s3: BaseClient) -> None:
    """As on S3: ``x-amz-meta-my_key`` is not ``x-amz-meta-my-key`` (a WSGI server drops or folds such names)."""
    s3.put_object(Bucket=BUCKET, Key="meta.txt", Body=b"m", Metadata={"my_key": "under", "other-key": "dash"})
    assert s3.head_object(Bucket=BUCKET, Key="meta.txt")["Metadata"] == {"my_key": "under", "other-key": "dash"}


def test_signed_method_and_body_are_checked(proxied: ProxiedS3, s3: BaseClient) -> None:
    s3.put_object(Bucket=BUCKET, Key="keep.txt", Body=b"keep me")
    as_get = proxied.signed("GET", f"/{BUCKET}/keep.txt", send_method="DELETE")
    assert as_get.status_code == 403 and "<Code>SignatureDoesNotMatch</Code>" in as_get.text
    assert s3.get_object(Bucket=BUCKET, Key="keep.txt")["Body"].read() == b"keep me"
    swapped = proxied.signed("PUT", f"/{BUCKET}/swapped.txt", b"hello", send=b"jello")
    assert swapped.status_code == 400 and "<Code>XAmzContentSHA256Mismatch</Code>" in swapped.text
    with pytest.raises(ClientError):
        s3.head_object(Bucket=BUCKET, Key="swapped.txt")  # moto never got the body to store
    key = quote("signed by hand/ü+%.txt")
    assert proxied.signed("PUT", f"/{BUCKET}/{key}", b"hand made").status_code == 200
    assert s3.get_object(Bucket=BUCKET, Key="signed by hand/ü+%.txt")["Body"].read() == b"hand made"


# --- outages ---------------------------------------------------------------------------------------


def test_slowdown_then_recovery(proxied: ProxiedS3, s3: BaseClient) -> None:
    before = proxied.stats()["refused_fault"]
    started = time.monotonic()
    assert proxied.faults("slowdown", seconds=1.0)["mode"] == "slowdown"
    with pytest.raises(ClientError) as listing:
        s3.list_objects_v2(Bucket=BUCKET)
    assert _code(listing) == "SlowDown" and listing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    with pytest.raises(ClientError) as upload:  # a file-like body: boto3 waits for 100-continue
        s3.put_object(Bucket=BUCKET, Key="during-outage.txt", Body=io.BytesIO(b"x" * 100_000))
    assert _code(upload) == "SlowDown"
    with pytest.raises(ClientError) as small:  # a bytes body: sent whole, read and thrown away
        s3.put_object(Bucket=BUCKET, Key="during-outage.txt", Body=b"y" * 100_000)
    assert _code(small) == "SlowDown"
    wait_until(lambda: s3.list_objects_v2(Bucket=BUCKET) is not None, 10, "S3 back", interval=0.05)
    assert time.monotonic() - started >= 0.95
    assert proxied.stats()["refused_fault"] >= before + 3
    s3.put_object(Bucket=BUCKET, Key="after-outage.txt", Body=b"fine")


def test_internal_errors_until_switched_off(proxied: ProxiedS3, s3: BaseClient) -> None:
    proxied.faults("error500")  # no end given: until told otherwise
    with pytest.raises(ClientError) as failed:
        s3.get_object(Bucket=BUCKET, Key="anything")
    assert _code(failed) == "InternalError" and failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert proxied.faults("ok")["mode"] == "ok"
    s3.list_objects_v2(Bucket=BUCKET)


# --- the writes referee ----------------------------------------------------------------------------


def test_writes_are_counted_per_key_and_a_refused_conditional_put_is_none(proxied: ProxiedS3, s3: BaseClient) -> None:
    prefix = f"writes-{time.time_ns()}"
    twice, copied, assembled = f"{prefix}/twice/result.json", f"{prefix}/copied/result.json", f"{prefix}/parts/result.json"
    s3.put_object(Bucket=BUCKET, Key=twice, Body=b'{"n": 1}')
    s3.put_object(Bucket=BUCKET, Key=twice, Body=b'{"n": 2}')
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=BUCKET, Key=twice, Body=b'{"n": 3}', IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/first/result.json", Body=b"{}", IfNoneMatch="*")  # a new key: written
    s3.copy_object(Bucket=BUCKET, Key=copied, CopySource={"Bucket": BUCKET, "Key": twice})
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=assembled)["UploadId"]
    part = s3.upload_part(Bucket=BUCKET, Key=assembled, UploadId=upload, PartNumber=1, Body=b"{}")
    s3.complete_multipart_upload(Bucket=BUCKET, Key=assembled, UploadId=upload,
                                 MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/other.txt", Body=b"not a result")
    s3.put_object_tagging(Bucket=BUCKET, Key=twice, Tagging={"TagSet": [{"Key": "k", "Value": "v"}]})  # no content written

    keys = httpx.get(f"{proxied.endpoint}/_proxy/writes", params={"suffix": "result.json"}).json()["keys"]
    mine = {key: count for key, count in keys.items() if key.startswith(prefix)}
    assert mine == {twice: 2, f"{prefix}/first/result.json": 1, copied: 1, assembled: 1}
    in_bucket = httpx.get(f"{proxied.endpoint}/_proxy/writes", params={"suffix": "other.txt", "bucket": BUCKET}).json()
    assert in_bucket["keys"][f"{prefix}/other.txt"] == 1 and in_bucket["untracked_writes"] == 0
    elsewhere = httpx.get(f"{proxied.endpoint}/_proxy/writes", params={"suffix": "other.txt", "bucket": "no-such-bucket"})
    assert elsewhere.json()["keys"] == {}
