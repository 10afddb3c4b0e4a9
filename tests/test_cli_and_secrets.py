"""The shell interface, and the promise that secrets stay out of logs, records and archives."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import pytest
import redis

from pipeline import enqueue, storage
from pipeline.devstack import DEMO_BAIDU_KEY, DEMO_BAIDU_SECRET, DEMO_IDP_PASSWORD, LocalStack, local_http
from pipeline.samples import make_batch, make_corrupt_pdf, make_report_pdf

# Its tests share one session stack, watched by Flower (the last one reads what the others left there).
pytestmark = [pytest.mark.usefixtures("flower"), pytest.mark.xdist_group("secrets")]


def docpipe(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.env, "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_submit_wait_names_the_batch_and_each_failure_with_its_reason(stack, baidu, docs):
    good = make_batch(docs, 2)
    bad = make_corrupt_pdf(docs / "broken.pdf")
    done = docpipe(stack, "submit", *(str(s.path) for s in good), "--provider", "baidu", "--wait", "--timeout", "180")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"batch baidu-\d{8}-\d{6}-[0-9a-f]{4}", done.stdout)  # named at the start
    assert "2 processed, 0 already archived" in done.stdout and "done=2" in done.stdout

    failed = docpipe(stack, "submit", str(bad.path), "--provider", "baidu", "--wait", "--timeout", "180", "--batch", "cli-broken")
    assert failed.returncode == 1  # a failed document makes the command fail...
    assert "broken.pdf" in failed.stdout and "stage:" in failed.stdout  # ...and says which and why


def test_unknown_provider_and_missing_file_are_clear_errors(stack, baidu, docs):
    missing = docpipe(stack, "submit", str(docs / "nope.pdf"), "--provider", "baidu")
    assert "no such file" in missing.stderr and "nope.pdf" in missing.stderr
    assert missing.returncode == 1
    unknown = docpipe(stack, "submit", str(docs / "nope.pdf"), "--provider", "nosuch")
    assert unknown.returncode == 2 and "unknown provider" in (unknown.stdout + unknown.stderr)
    typo = docpipe(stack, "ingest", "/typo", "--provider", "baidu")
    assert typo.returncode == 2 and "/typo" in typo.stderr


def test_ingest_of_a_prefix_skips_what_is_archived_on_a_second_run(stack, baidu, docs):
    client = storage.s3_client()
    client.create_bucket(Bucket="cli-inbox")
    for sample in make_batch(docs, 3):
        client.upload_file(str(sample.path), "cli-inbox", f"scans/{sample.path.name}")
    first = docpipe(stack, "ingest", "s3://cli-inbox/scans/", "--provider", "baidu", "--wait", "--timeout", "180", "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(first.stdout)
    assert (report["total"], report["enqueued"], report["skipped"], report["counts"]) == (3, 3, 0, {"done": 3})
    submits = baidu.endpoint("submit")["accepted"]
    again = docpipe(stack, "ingest", "s3://cli-inbox/scans/", "--provider", "baidu", "--wait", "--timeout", "60", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    second = json.loads(again.stdout)
    assert (second["total"], second["enqueued"], second["skipped"]) == (3, 0, 3)
    assert baidu.endpoint("submit")["accepted"] == submits


def _broker_text(client: redis.Redis) -> str:
    """Every message waiting in the queues or held unacknowledged, with its body decoded: kombu
    base64-encodes bodies, so a secret inside one would not show in the raw text, and any
    message's encoded body (a job is some 300 bytes) looks like a signature to the pattern."""
    keys = list(client.scan_iter("docpipe.*"))
    raw = [m for k in keys if client.type(k) == b"list" for m in client.lrange(k, 0, -1)]
    raw += client.hvals("unacked")  # each: [message, exchange, routing key]
    decoded = [repr(client.hgetall(k)) for k in keys if client.type(k) == b"hash"]  # not messages: as they are
    for item in raw:
        message = json.loads(item)
        message = message[0] if isinstance(message, list) else message
        body = message.get("body", "")
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        decoded.append(json.dumps({**message, "body": body}))
    return "\n".join(decoded)


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

    # Flower, as an operator sees it (behind basic auth), and the broker's messages: every task
    # argument of the session.
    assert local_http().get(f"{stack.flower_url}/api/tasks", timeout=30).status_code == 401
    tasks = local_http().get(f"{stack.flower_url}/api/tasks", auth=stack.flower_auth, timeout=60)
    assert tasks.status_code == 200
    flower_text = tasks.text + local_http().get(f"{stack.flower_url}/tasks", auth=stack.flower_auth, timeout=60).text
    seen = tasks.json()
    # A step runs the stages due at once after it (stage+submit+await, await+fetch+archive): the
    # tasks are those that start a step, and each one's result names the stages it ran.
    assert {t["name"] for t in seen.values()} >= {f"docpipe.{p}.{s}" for p in ("baidu", "idp", "tuputech") for s in ("stage", "await")}
    assert any("archive" in str(t.get("result")) for t in seen.values() if t["name"].endswith(".await"))
    # Each task shows the document it works for, not its whole job (workers.tasks._shown_as).
    shown = [t["args"] for t in seen.values() if t.get("args") and not t["name"].endswith(".dispatch")]
    assert shown and all(re.fullmatch(r"\('(baidu|idp|tuputech)/[0-9a-f]{32} \(.+\)',\)", args) for args in shown), shown[:3]
    broker_text = _broker_text(client)
    for where, text in (("Flower", flower_text), ("the broker", broker_text)):
        for secret in secrets:
            assert secret not in text, f"{secret[:12]}... in {where}"
        assert not signature.search(text) and not link.search(text), where

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
