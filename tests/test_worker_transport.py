"""docpipe's broker transport: who holds a message is noted with its unacked record, and
acknowledgements, batched off the event loop, still reach Redis."""

from __future__ import annotations

import json
from types import SimpleNamespace

import redis

from pipeline import enqueue
from pipeline.devstack import wait_until
from pipeline.samples import make_batch
from workers.transport import held_note


def _message(body: object, message_id: str = "m-1") -> SimpleNamespace:
    return SimpleNamespace(decode=lambda: body, headers={"id": message_id})


def test_a_step_message_is_noted_by_job_and_message_id():
    body = [[{"job_id": "a" * 32, "provider": "baidu"}], {}, {}]  # Celery's protocol 2: (args, kwargs, embed)
    assert held_note(_message(body, "msg-7")) == f"{'a' * 32} msg-7"


def test_a_message_that_is_not_a_step_is_not_noted():
    assert held_note(_message([[], {}, {}])) is None
    assert held_note(_message([["not a dict"], {}, {}])) is None

    def undecodable() -> object:
        raise ValueError("not JSON")

    assert held_note(SimpleNamespace(decode=undecodable, headers={"id": "x"})) is None


def test_every_step_of_a_finished_document_is_acknowledged_and_no_longer_held(baidu, docs, stack):
    """The batched acknowledgements reach Redis: once the document is archived, none of its
    messages stays in the broker's unacked records or in a worker's held set."""
    handle = enqueue(make_batch(docs, 1)[0].path, provider="baidu")
    handle.wait(timeout=120)
    client = redis.Redis.from_url(stack.env["DOCPIPE_REDIS_URL"])

    def ours_outstanding() -> list[str]:
        unacked = [raw for raw in client.hvals("unacked") if handle.job_id.encode() in raw]
        held = [m for key in client.scan_iter("docpipe:held:*") for m in client.smembers(key) if m.decode().startswith(handle.job_id)]
        return [json.loads(raw)[0]["headers"]["task"] for raw in unacked] + [m.decode() for m in held]

    wait_until(lambda: not ours_outstanding(), 15, "the document's messages acknowledged")
