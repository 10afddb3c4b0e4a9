"""The callback receiver, over HTTP, on the session's Redis: only the right task's callback is kept.

Job records are written here as ``submit`` leaves them; callbacks are signed with the
emulator's key the way the provider signs them (tests.tuputech_signing), or forged.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

import httpx
import pytest
import redis

from pipeline import callbacks, jobs
from pipeline.providers import get_provider
from pipeline.runtime import get_runtime
from tests.tuputech_signing import generate_key_pair, seal


@pytest.fixture
def receiver(stack):
    stack.activate()
    return stack


def _job() -> str:
    return uuid.uuid4().hex


def _payload(job_id: str, task_id: str, **changes) -> dict:
    payload = {
        "code": 0,
        "requestId": task_id,
        "docInfo": {"pages": 1, "images": 0, "textLength": 3},
        "customInfo": {"docpipeJob": job_id},
        "suggestion": 0,
        "riskType": 0,
        "pages": [],
        "timestamp": int(time.time()),
        "nonce": secrets.randbelow(10**10),
    }
    return {**payload, **changes}


def _post(stack, job_id: str, body) -> httpx.Response:
    url = f"{stack.env['DOCPIPE_CALLBACK_BASE_URL']}/callbacks/tuputech/{job_id}"
    return httpx.post(url, **({"content": body} if isinstance(body, bytes) else {"json": body}), timeout=30)


def _signed(stack, payload: dict) -> dict:
    return seal(stack.tuputech_keys()["provider_private"], payload)


def _traces(client: redis.Redis, payloads: list[dict]) -> dict[bytes, object]:
    """Everything a callback for these payloads can write: the job records, stored results,
    nonces and leases they name (the processing-time sample goes in one transaction with the
    stored result). Only theirs: the session's workers may still be finishing an earlier test's
    documents, whose records and callbacks change on their own."""
    jobs_named = {p["customInfo"]["docpipeJob"] for p in payloads if isinstance(p, dict) and "customInfo" in p}
    names = [f"docpipe:job:{j}" for j in jobs_named]
    names += [f"docpipe:callback:tuputech:{p['requestId']}" for p in payloads if "requestId" in p]
    names += [f"docpipe:callback-nonce:tuputech:{p['nonce']}" for p in payloads if "nonce" in p]
    found: dict[bytes, object] = {}
    for name in names:
        kind = client.type(name)
        if kind != b"none":
            found[name.encode()] = client.hgetall(name) if kind == b"hash" else client.dump(name)
    for lease in client.scan_iter("docpipe:lease:*", count=1000, _type="zset"):
        found[lease] = sorted(m for m in client.zrange(lease, 0, -1) if m.decode() in jobs_named)
    return found


def test_the_right_tasks_callback_is_kept_once_frees_the_slot_and_is_timed(receiver):
    rt, provider = get_runtime(), get_provider("tuputech")
    job_id, task_id = _job(), secrets.token_hex(16)
    jobs.record(rt.redis, job_id, provider_task_id=task_id, submitted_at=time.time() - 4)
    assert rt.leases.try_acquire(provider.lease_key(), job_id, 30, 60)
    body = _signed(receiver, _payload(job_id, task_id))
    assert _post(receiver, job_id, body).status_code == 200
    assert rt.redis.get(f"docpipe:callback:tuputech:{task_id}") is not None
    assert rt.leases.try_acquire(provider.lease_key(), "probe", 30, 1) and not rt.redis.zscore(f"docpipe:lease:{provider.lease_key()}", job_id)
    assert float(rt.redis.lindex(f"docpipe:processing:{provider.lease_key()}", 0)) >= 4
    again = _post(receiver, job_id, body)  # the provider retries a delivery, or someone replays it
    assert again.status_code == 409


def test_every_refusal_happens_before_any_write(receiver):
    rt = get_runtime()
    job_id, task_id = _job(), secrets.token_hex(16)
    jobs.record(rt.redis, job_id, provider_task_id=task_id, submitted_at=time.time())
    forger, _ = generate_key_pair()
    payloads = {
        "forged": _payload(job_id, task_id),
        "another job's echo": _payload(_job(), task_id),
        "replayed from long ago": _payload(job_id, task_id, timestamp=int(time.time()) - 3600),
        "an earlier attempt's task": _payload(job_id, secrets.token_hex(16)),
        "malformed job id": _payload(job_id, task_id),
    }
    before = _traces(rt.redis, list(payloads.values()))
    refusals = {
        "forged": (job_id, seal(forger, payloads["forged"]), 403),
        "not json": (job_id, b"not json", 400),
        "not an envelope": (job_id, {"json": "{}"}, 400),
        "malformed job id": ("../../etc", _signed(receiver, payloads["malformed job id"]), 404),
        "another job's echo": (job_id, _signed(receiver, payloads["another job's echo"]), 403),
        "replayed from long ago": (job_id, _signed(receiver, payloads["replayed from long ago"]), 403),
        "an earlier attempt's task": (job_id, _signed(receiver, payloads["an earlier attempt's task"]), 409),
        "over the size cap": (job_id, b"{" + b" " * (rt.settings.callback_max_bytes + 1) + b"}", 413),
    }
    for what, (path_job, body, status) in refusals.items():
        assert _post(receiver, path_job, body).status_code == status, what
    assert _traces(rt.redis, list(payloads.values())) == before  # no trace of any of them
    assert _post(receiver, job_id, _signed(receiver, _payload(job_id, task_id))).status_code == 200  # the right one still gets in


def test_a_callback_adopts_the_task_of_a_submit_whose_answer_was_lost(receiver):
    rt = get_runtime()
    job_id, task_id = _job(), secrets.token_hex(16)
    jobs.record(rt.redis, job_id, sending_at=time.time() - 2)
    assert _post(receiver, job_id, _signed(receiver, _payload(job_id, task_id))).status_code == 200
    record = jobs.read(rt.redis, job_id)
    assert record["provider_task_id"] == task_id and "sending_at" not in record


def test_a_callback_redis_cannot_store_is_checked_by_reading_spooled_and_kept_once_redis_accepts_writes(receiver, tmp_path, monkeypatch):
    """Redis refusing writes (OOM, a read-only replica) is played by the one function that writes:
    the rest, the reads that decide whether to spool and the drain, run on the real Redis."""
    rt, provider = get_runtime(), get_provider("tuputech")
    job_id, task_id = _job(), secrets.token_hex(16)
    jobs.record(rt.redis, job_id, provider_task_id=task_id, submitted_at=time.time() - 3)
    assert rt.leases.try_acquire(provider.lease_key(), job_id, 30, 60)
    spool = callbacks.Spool(tmp_path / "spool")
    monkeypatch.setattr(callbacks.Spool, "_default", spool)

    async def refused(*_args, **_kwargs):
        raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr(callbacks, "keep_async", refused)
    body = json.dumps(_signed(receiver, _payload(job_id, task_id))).encode()
    assert asyncio.run(callbacks.handle("tuputech", job_id, body, None)).status_code == 200
    other = json.dumps(_signed(receiver, _payload(job_id, secrets.token_hex(16)))).encode()
    assert asyncio.run(callbacks.handle("tuputech", job_id, other, None)).status_code == 409  # not this job's task: refused, not spooled
    assert [p.name for p in (tmp_path / "spool").glob("*.json")] == [f"tuputech-{job_id}-{task_id}.json"]
    assert rt.redis.get(f"docpipe:callback:tuputech:{task_id}") is None

    assert spool.drain() == 1
    assert rt.redis.get(f"docpipe:callback:tuputech:{task_id}") is not None
    assert rt.redis.zscore(f"docpipe:lease:{provider.lease_key()}", job_id) is None  # its slot freed
    assert list((tmp_path / "spool").glob("*.json")) == []
    assert spool.drain() == 0


def test_a_callback_wakes_a_step_waiting_at_await_and_no_step_a_worker_holds(receiver, monkeypatch):
    """``wake`` hands the waiting step to a message due now and fences the old one off; a step
    some worker is running, or a job not yet waiting for its result, is left alone."""
    import workers.tasks

    rt = get_runtime()
    published = []
    monkeypatch.setattr(workers.tasks, "publish", lambda step, payload, msg, countdown: published.append((step, payload["job_id"], msg, countdown)))
    job_id, first, waiting = _job(), str(uuid.uuid4()), str(uuid.uuid4())
    payload = {"job_id": job_id, "provider": "tuputech", "source": "s3://b/k.pdf", "location": "s3://b/k.pdf"}
    assert rt.ledger.start(job_id, first, "submit", payload, provider="tuputech", source="s3://b/k.pdf")
    assert not callbacks.wake(job_id) and published == []  # still at submit: not waiting for a result

    assert rt.ledger.claim(job_id, first, "worker-a") == "ok"
    assert rt.ledger.advance(job_id, first, waiting, "await", payload, time.time() + 60, "worker-a")
    assert callbacks.wake(job_id)
    [(step, woken_job, msg, countdown)] = published
    assert (step, woken_job, countdown) == ("await", job_id, 0.0) and msg != waiting
    assert rt.ledger.claim(job_id, waiting, "worker-b") == "stale"  # the old message, when it comes due, does nothing

    assert rt.ledger.claim(job_id, msg, "worker-b") == "ok"  # now a worker runs the step
    assert not callbacks.wake(job_id) and len(published) == 1
    assert rt.ledger.finish(job_id, msg, "worker-b")  # not left in flight for the tests after it


@pytest.mark.parametrize(
    ("record", "nonce_seen", "kept"),
    [
        ({"provider_task_id": "THIS"}, False, True),
        ({"provider_task_id": "THIS"}, True, False),  # a replay
        ({"provider_task_id": "ANOTHER"}, False, False),  # an earlier attempt's task
        ({"sending_at": "1.0"}, False, True),  # a submit that lost its answer: adopted
        ({"provider_task_id": "", "sending_at": "1.0"}, False, True),
        ({}, False, False),  # no submit ever left
        ({"sending_at": ""}, False, False),
    ],
)
def test_the_read_only_check_refuses_exactly_what_the_keeping_script_refuses(receiver, record, nonce_seen, kept):
    """``_check_by_reading`` decides, while Redis refuses writes, which callbacks to spool; the
    script decides the rest of the time. The same record must get the same answer from both."""
    from pipeline.providers.base import Callback, CallbackRejected

    rt, provider = get_runtime(), get_provider("tuputech")
    job_id, task_id, nonce = _job(), secrets.token_hex(16), str(secrets.randbelow(10**10))
    fields = {k: (task_id if v == "THIS" else v) for k, v in record.items()}
    if fields:
        jobs.record(rt.redis, job_id, **fields)
    if nonce_seen:
        rt.redis.set(f"docpipe:callback-nonce:tuputech:{nonce}", "1", ex=60)
    callback = Callback(task_id=task_id, job_id=job_id, timestamp=time.time(), nonce=nonce, payload=_payload(job_id, task_id))
    try:
        callbacks._check_by_reading(provider, job_id, callback)
        by_reading = True
    except CallbackRejected:
        by_reading = False
    try:
        callbacks.keep(provider, job_id, callback)
        by_script = True
    except CallbackRejected:
        by_script = False
    assert (by_reading, by_script) == (kept, kept)


def test_the_receiver_keeps_an_idle_connection_open_longer_than_a_providers_client_does(receiver):
    """A provider's client keeps an idle connection 5 s (httpx's default): were the receiver to
    close it then too, a download sent at that moment would die with it (tuputech fails the task,
    code 14). Here a connection idle for longer than that still answers."""
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", receiver.ports["callbacks"], timeout=10)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        time.sleep(5.5)  # the idle time itself is what is tested
        conn.request("GET", "/health")  # on the same socket: a closed one fails here (RemoteDisconnected)
        second = conn.getresponse()
        second.read()
        assert (first.status, second.status) == (200, 200) and conn.sock is sock
    finally:
        conn.close()
