"""Batches as an operator and a script use them: named, watched from counters, retried, cancelled,
with the documented exit codes and JSON; and the metrics and logs that show them. All on the
session's real stack."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import redis

import pipeline
from pipeline import batches, storage
from pipeline.devstack import LocalStack, free_port, local_http, wait_until
from pipeline.runtime import get_runtime
from pipeline.samples import make_batch

# Its tests share one session stack, watched by Flower (the last one reads what the others left there).
pytestmark = [pytest.mark.usefixtures("flower"), pytest.mark.xdist_group("batches")]


def docpipe(stack: LocalStack, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **stack.env, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=full, capture_output=True, text=True, timeout=timeout)


def _inbox(stack: LocalStack, bucket: str, docs, count: int, corrupt: int = 0) -> None:
    stack.activate()
    client = storage.s3_client()
    client.create_bucket(Bucket=bucket)
    for sample in make_batch(docs, count, corrupt=corrupt):
        client.upload_file(str(sample.path), bucket, f"in/{sample.path.name}")
    client.put_object(Bucket=bucket, Key="in/notes.txt", Body=b"not a document")  # left out by --exclude


def test_a_batch_is_watched_from_its_counters_and_its_failures_are_grouped_and_listed(stack, baidu, docs):
    _inbox(stack, "batch-inbox", docs, 3, corrupt=1)
    run = docpipe(stack, "ingest", "s3://batch-inbox/in/", "-p", "baidu", "--exclude", "*.txt", "--batch", "b-grouped",
                  "--wait", "--timeout", "240", "--json")
    assert run.returncode == 1, run.stdout + run.stderr  # one document failed
    report = json.loads(run.stdout)
    assert report["batch"] == "b-grouped" and report["total"] == 4 and report["complete"]
    assert report["counts"] == {"done": 3, "failed": 1}
    [(reason, count)] = report["failures_by_reason"].items()
    assert reason.startswith("stage:") and count == 1
    assert [job["source"].rsplit("/", 1)[1] for job in report["failed_jobs"]] == ["broken-00.pdf"]  # the corrupt one

    status = docpipe(stack, "status", "b-grouped", "--json")
    assert status.returncode == 1 and json.loads(status.stdout)["counts"] == {"done": 3, "failed": 1}
    listed = docpipe(stack, "jobs", "b-grouped", "--state", "failed", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["state"] == "failed" and rows[0]["reason"] == reason and rows[0]["error"]

    done_id = next(json.loads(line)["job_id"] for line in docpipe(stack, "jobs", "b-grouped", "--state", "done", "--json").stdout.splitlines())
    shown = docpipe(stack, "result", done_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["job_id"] == done_id
    failed = docpipe(stack, "result", rows[0]["job_id"], "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)["code"] == reason.split(":")[1]

    # A failure error.json calls permanent is kept by `retry`, and sent again by `retry --all`.
    kept = docpipe(stack, "retry", "b-grouped", "--json")
    assert kept.returncode == 0 and json.loads(kept.stdout)["retried"] == 0 and len(json.loads(kept.stdout)["kept"]) == 1
    submits = baidu.endpoint("submit")["accepted"]
    again = docpipe(stack, "retry", "b-grouped", "--all", "--wait", "--timeout", "240", "--json")
    assert again.returncode == 1  # it fails again, being corrupt
    after = json.loads(again.stdout)
    assert after["counts"] == {"done": 3, "failed": 1} and after["total"] == 4  # counted once, not twice
    assert baidu.endpoint("submit")["accepted"] == submits  # refused before any submit, again


def test_listing_again_sends_nothing_archived_whether_redis_remembers_it_or_not(stack, baidu, docs):
    """An S3 listing is enqueued a chunk at a time without asking S3 per document: a finished
    job Redis remembers is skipped at once, and one it forgot is found archived by its stage
    step, which ends it without a request to the provider or a second archive."""
    _inbox(stack, "relist-inbox", docs, 3, corrupt=1)
    first = docpipe(stack, "ingest", "s3://relist-inbox/in/", "-p", "baidu", "--exclude", "*.txt", "--batch", "b-relist-1",
                    "--wait", "--timeout", "240", "--json")
    assert first.returncode == 1 and json.loads(first.stdout)["counts"] == {"done": 3, "failed": 1}, first.stdout + first.stderr
    submits = baidu.endpoint("submit")["accepted"]
    client = get_runtime().redis
    job_ids = [member.job_id for member in batches.members(client, "b-relist-1")]
    archived = {job_id: storage.archive_names("baidu", job_id) for job_id in job_ids}

    remembered = docpipe(stack, "ingest", "s3://relist-inbox/in/", "-p", "baidu", "--exclude", "*.txt", "--batch", "b-relist-2",
                         "--wait", "--timeout", "240", "--json")
    report = json.loads(remembered.stdout)
    assert report["counts"] == {"done": 3, "failed": 1} and report["skipped"] == 4, remembered.stdout

    client.delete(*(f"docpipe:job:{job_id}" for job_id in job_ids))  # a Redis that lost its records
    forgotten = docpipe(stack, "ingest", "s3://relist-inbox/in/", "-p", "baidu", "--exclude", "*.txt", "--batch", "b-relist-3",
                        "--wait", "--timeout", "240", "--json")
    report = json.loads(forgotten.stdout)
    assert forgotten.returncode == 1 and report["complete"], forgotten.stdout + forgotten.stderr
    assert report["counts"] == {"done": 3, "failed": 1} and report["skipped"] == 4
    assert [job["source"].rsplit("/", 1)[1] for job in report["failed_jobs"]] == ["broken-00.pdf"]
    assert baidu.endpoint("submit")["accepted"] == submits  # nothing sent again
    assert {job_id: storage.archive_names("baidu", job_id) for job_id in job_ids} == archived

    # Its summary says so too: found archived by their stage steps, none of them was processed again.
    client.delete(*(f"docpipe:job:{job_id}" for job_id in job_ids))
    told = docpipe(stack, "ingest", "s3://relist-inbox/in/", "-p", "baidu", "--exclude", "*.txt", "--batch", "b-relist-4",
                   "--wait", "--timeout", "240")
    assert "b-relist-4: 0 processed, 4 already archived" in told.stdout, told.stdout + told.stderr


def test_cancel_stops_what_no_provider_has_seen_and_names_what_it_has(stack, baidu, docs):
    samples = make_batch(docs, 24)  # at 2 submits a second, most of them still wait when the cancel comes
    stack.activate()
    batch = pipeline.ingest(str(docs), "baidu", batch="b-cancel")
    wait_until(lambda: baidu.endpoint("submit")["accepted"] >= 1, 60, "a first submit")
    outcome = batches.cancel(get_runtime().redis, "b-cancel")
    assert outcome.cancelled >= 1 and outcome.cancelled + len(outcome.at_provider) + outcome.ended == len(samples)
    assert all(member.state not in batches.FINAL for member in outcome.at_provider)
    status = batch.wait(timeout=240)
    assert status.counts.get("cancelled") == outcome.cancelled
    assert status.counts.get("done", 0) == len(samples) - outcome.cancelled
    # Nothing cancelled reached the provider afterwards: one submit per document that was not cancelled.
    assert baidu.endpoint("submit")["accepted"] == len(samples) - outcome.cancelled
    again = docpipe(stack, "cancel", "b-cancel", "--json")  # the command, once all has ended
    assert again.returncode == 0 and json.loads(again.stdout) == {"batch": "b-cancel", "cancelled": 0, "at_provider": [], "ended": len(samples)}
    assert docpipe(stack, "status", "b-cancel").returncode == 1  # cancelled documents are not a success


def test_the_python_handle_yields_each_document_once_as_it_ends(stack, idp, docs):
    make_batch(docs, 5)
    stack.activate()
    batch = pipeline.ingest(str(docs), "idp", include=["invoice-*"])
    assert re.fullmatch(r"idp-\d{8}-\d{6}-[0-9a-f]{4}", batch.name)
    seen = [handle.source.rsplit("/", 1)[1] for handle, result in batch.results(timeout=240) if result.job_id == handle.job_id]
    assert sorted(seen) == ["invoice-0000.pdf", "invoice-0001.pdf", "invoice-0004.pdf"]
    status = batch.status()
    assert status.complete and status.succeeded and status.throughput() and status.eta() == 0.0


def test_deployment_problems_are_one_message_and_exit_code_2(stack, docs):
    make_batch(docs, 3)
    cases = {
        "cannot reach Redis": {"DOCPIPE_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"},
        "does not exist": {"DOCPIPE_RESULTS_BUCKET": "no-such-results"},
        "missing credentials DOCPIPE_BAIDU_API_KEY": {"DOCPIPE_BAIDU_API_KEY": ""},
    }
    for expected, env in cases.items():
        run = docpipe(stack, "ingest", str(docs), "-p", "baidu", env=env, timeout=120)
        assert run.returncode == 2 and expected in run.stderr, (expected, run.stdout, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and "hunter2" not in run.stderr  # one line, no password
    missing = docpipe(stack, "ingest", "s3://no-such-inbox/x/", "-p", "baidu")
    assert missing.returncode == 2 and "no-such-inbox" in missing.stderr
    assert docpipe(stack, "status", "no-such-batch").returncode == 2
    created = docpipe(stack, "init", "--json", env={"DOCPIPE_STAGING_BUCKET": "fresh-staging", "DOCPIPE_RESULTS_BUCKET": "fresh-results"})
    assert created.returncode == 0 and json.loads(created.stdout)["created"] == ["fresh-staging", "fresh-results"]
    assert json.loads(docpipe(stack, "init", "--json").stdout)["created"] == []
    # The buckets it created abort the multipart uploads a killed process leaves incomplete.
    stack.activate()
    for bucket in ("fresh-staging", "fresh-results"):
        (rule,) = storage.s3_client().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        assert rule["ID"] == storage.STALE_UPLOAD_RULE and rule["Status"] == "Enabled"
        assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": storage.STALE_UPLOAD_DAYS}


def test_a_wait_that_times_out_exits_3(stack, baidu, docs):
    baidu.config(processing_min=6.0, processing_max=6.0)  # past the 2 s wait, and done soon after: the tests after it wait for it
    make_batch(docs, 1)
    run = docpipe(stack, "submit", str(docs / "invoice-0000.pdf"), "-p", "baidu", "--wait", "--timeout", "2")
    assert run.returncode == 3, run.stdout + run.stderr
    # What is still running is named as such, not counted in a summary of what was processed.
    assert "timed out: 1 documents unfinished after 2s" in run.stderr, run.stderr
    assert "processed" not in run.stdout, run.stdout


def _scrape(url: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    for line in local_http().get(url, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            figures[name] = float(value)
    return figures


def _total(figures: dict[str, float], prefix: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for name, v in figures.items() if name.startswith(prefix + "{") and all(w in name for w in wanted))


@pytest.mark.after_all
def test_metrics_logs_and_flower_show_the_batches(stack, docs):
    """After the other tests: the workers' counters, the exporter's gauges, JSON log lines and Flower agree with what ran."""
    stack.activate()
    client = get_runtime().redis
    grouped = batches.status(client, "b-grouped")  # sent by this session's workers, earlier in this module
    workers = [_scrape(f"http://127.0.0.1:{stack.ports[f'metrics-{w}']}/metrics") for w in ("w1", "w2")]
    submits = sum(_total(w, "docpipe_provider_requests_total", provider="baidu", endpoint="submit", outcome="200") for w in workers)
    assert submits >= grouped.counts["done"] >= 3
    assert sum(_total(w, "docpipe_limiter_grants_total") for w in workers) >= submits
    assert sum(_total(w, "docpipe_stage_duration_seconds_count", provider="baidu", stage="archive") for w in workers) >= 3
    assert sum(_total(w, "docpipe_steps_total", provider="baidu", stage="stage", verdict="ok") for w in workers) >= grouped.total

    port = free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "metrics", "--port", str(port), "--host", "127.0.0.1"],
                                env={**os.environ, **stack.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: local_http().get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200, 30, "the exporter")
        gauges = _scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        exporter.terminate()
        exporter.wait(10)
    states = redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"]).hgetall("docpipe:states")
    assert gauges['docpipe_documents{state="done"}'] == float(states[b"done"]) >= grouped.counts["done"]
    assert any(name.startswith('docpipe_failures_by_reason{reason="stage:') for name in gauges)
    assert 'docpipe_leases_in_use{provider="tuputech"}' in gauges

    lines = [json.loads(line) for line in (stack.workdir / "worker-w2.log").read_text().splitlines() if line.startswith("{")]
    stepped = [line for line in lines if line.get("job_id")]
    assert stepped and all({"provider", "stage", "message", "level"} <= line.keys() for line in stepped)

    flower = local_http().get(f"{stack.flower_url}/metrics", auth=stack.flower_auth, timeout=30)
    assert flower.status_code == 200 and "flower_events_total" in flower.text
    tasks = local_http().get(f"{stack.flower_url}/api/tasks", params={"taskname": "docpipe.baidu.await"}, auth=stack.flower_auth, timeout=60).json()
    assert tasks and {t["name"] for t in tasks.values()} == {"docpipe.baidu.await"}
    assert any("+archive" in str(t.get("result")) for t in tasks.values())  # the look that saw it done archived it
