"""The shell interface, and the promise that secrets stay out of logs, records and archives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import redis

from pipeline import enqueue, storage
from pipeline.devstack import DEMO_BAIDU_KEY, DEMO_BAIDU_SECRET, DEMO_IDP_PASSWORD, LocalStack
from pipeline.samples import make_batch, make_corrupt_pdf, make_report_pdf


def docpipe(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.env, "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_submit_wait_prints_where_each_result_landed(stack, baidu, docs):
    good = make_batch(docs, 2)
    bad = make_corrupt_pdf(docs / "broken.pdf")
    done = docpipe(stack, "submit", *(str(s.path) for s in good), "--provider", "baidu", "--wait", "--timeout", "180")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done 2, failed 0" in done.stdout
    assert "s3://docpipe-results/baidu/" in done.stdout

    failed = docpipe(stack, "submit", str(bad.path), "--provider", "baidu", "--wait", "--timeout", "180")
    assert failed.returncode == 1  # a failed document makes the command fail...
    assert "failed 1" in failed.stdout and "broken.pdf" in failed.stdout  # ...and says which and why
    assert "error.json" in failed.stdout


def test_unknown_provider_and_missing_file_are_clear_errors(stack, baidu, docs):
    missing = docpipe(stack, "submit", str(docs / "nope.pdf"), "--provider", "baidu")
    assert "no such file" in missing.stdout
    assert missing.returncode == 1
    unknown = docpipe(stack, "submit", str(docs / "nope.pdf"), "--provider", "nosuch")
    assert unknown.returncode == 2 and "unknown provider" in (unknown.stdout + unknown.stderr)


def test_ingest_of_a_prefix_skips_what_is_archived_on_a_second_run(stack, baidu, docs):
    client = storage.s3_client()
    client.create_bucket(Bucket="cli-inbox")
    for sample in make_batch(docs, 3):
        client.upload_file(str(sample.path), "cli-inbox", f"scans/{sample.path.name}")
    first = docpipe(stack, "ingest", "s3://cli-inbox/scans/", "--provider", "baidu", "--timeout", "180")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "3 documents, 0 already archived" in first.stdout
    submits = baidu.endpoint("submit")["accepted"]
    again = docpipe(stack, "ingest", "s3://cli-inbox/scans/", "--provider", "baidu", "--timeout", "60")
    assert "3 documents, 3 already archived" in again.stdout
    assert baidu.endpoint("submit")["accepted"] == submits


@pytest.mark.after_all
def test_no_secret_in_any_log_record_or_archive(stack, tmp_path):
    """After every other test ran on the stack: no key, password, token or signature leaked."""
    stack.activate()  # other modules may have pointed this process at stacks of their own
    # One document through each provider, so that every kind of log line and archive is there.
    own = [
        enqueue(make_batch(tmp_path / "b", 1)[0].path, provider="baidu"),
        enqueue(make_batch(tmp_path / "i", 1)[0].path, provider="idp"),
        enqueue(make_report_pdf(tmp_path / "report.pdf", 1, flagged_page=1).path, provider="tuputech"),
    ]
    for handle in own:
        handle.wait(timeout=180)
    keys = stack.tuputech_keys()
    pem_line = keys["client_private"].splitlines()[1]  # a line of our private key's body
    secrets = [DEMO_BAIDU_SECRET, DEMO_IDP_PASSWORD, pem_line, "access_token=24.", "Bearer ey", "X-Amz-Signature="]
    client = redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"])
    link_secret = client.get("docpipe:link-secret")
    if link_secret:  # the key that signs document links
        secrets.append(link_secret.decode())
    signature = re.compile(r"[A-Za-z0-9+/]{300,}={0,2}")  # an RSA-2048 signature is 344 base64 characters
    link = re.compile(r"/documents/[0-9a-f]{32}/\d+/[A-Za-z0-9_-]{20,}")  # a signed document link
    # Every log of docpipe's own processes (the emulators, Redis and the S3 servers are not docpipe's).
    ours = [p for p in stack.workdir.glob("*.log") if not p.name.startswith(("emulator-", "redis", "s3", "moto"))]
    assert any(p.name.startswith("worker-") for p in ours)
    for log in ours:
        text = log.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{secret[:12]}... in {log.name}"
        assert DEMO_BAIDU_KEY not in text
        assert not signature.search(text), f"a signature in {log.name}"
        assert not link.search(text), f"a signed document link in {log.name}"

    for key in client.scan_iter("docpipe:job:*"):
        record = json.dumps({k.decode(): v.decode() for k, v in client.hgetall(key).items()})
        for secret in secrets:
            assert secret not in record

    bucket = storage.get_settings().results_bucket
    archived = 0
    for obj in storage.list_objects(bucket):
        if obj["Key"].endswith(".json"):
            text = storage.read_object(bucket, obj["Key"]).decode()
            archived += 1
            for secret in secrets:
                assert secret not in text, f"{secret[:12]}... in {obj['Key']}"
            assert not signature.search(text), f"a signature in {obj['Key']}"
            assert not link.search(text), f"a signed document link in {obj['Key']}"
    assert archived >= 2 * len(own)
