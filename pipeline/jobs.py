"""Job identity, and the record in Redis that says which one message may move a job next.

The archive in S3 is the source of truth for "done". The Redis record makes progress cheap to
watch, remembers a provider task id across a crash, and fences the job's messages: it holds
the id of the one Celery message allowed to run the job's next step (``msg``), and the step
and payload that message carries (so that a lost message can be sent again from it).

Why fencing: after a crash the same step can exist twice (a killed worker's unacked message
comes back after the broker's visibility timeout; the reconciler has meanwhile re-sent it; a
publish was retried). Every step first *claims* the job with its message id. A message whose
id is no longer the record's is stale and does nothing; one whose step a live worker is
running already is busy and does nothing. So a poll or a submit never runs twice at once, and
no step runs again after the job moved on. Each transition is one Lua script, atomic in Redis.

``docpipe:active`` (a sorted set) holds every unfinished job with the time by which it must
have moved; ``docpipe:held:<worker>`` the messages each worker has received. The reconciler
(``pipeline.reconcile``) reads both.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis

RECORD_TTL = 7 * 24 * 3600
ACTIVE = "docpipe:active"
WORKER_PREFIX = "docpipe:worker:"
HELD_PREFIX = "docpipe:held:"
FINAL_STATES = ("done", "failed", "cancelled")


def make_job_id(provider: str, source: str, content_id: str, options: dict[str, Any]) -> str:
    """Deterministic: the same document, provider and options always make the same job."""
    canonical = json.dumps(
        {"provider": provider, "source": source, "content": content_id, "options": options},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def key(job_id: str) -> str:
    return f"docpipe:job:{job_id}"


def held_key(holder: str) -> str:
    return f"{HELD_PREFIX}{holder}"


def record(client: redis.Redis, job_id: str, **fields: Any) -> None:
    """Merge fields into the job's record; ``None`` values are skipped."""
    mapping = {k: str(v) for k, v in fields.items() if v is not None}
    mapping["updated_at"] = str(time.time())
    pipe = client.pipeline()
    pipe.hset(key(job_id), mapping=mapping)
    pipe.expire(key(job_id), RECORD_TTL)
    pipe.execute()


def read(client: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(key(job_id)).items()}


def states(client: redis.Redis, job_ids: list[str]) -> dict[str, str | None]:
    pipe = client.pipeline()
    for job_id in job_ids:
        pipe.hget(key(job_id), "state")
    return {job_id: (v.decode() if v else None) for job_id, v in zip(job_ids, pipe.execute())}


# --- the fenced transitions --------------------------------------------------------------------

# KEYS: record, active. ARGV: msg, step, payload, due, grace, job_id, ttl, now, force, fields (JSON).
# A job whose record holds a live message is in flight and keeps it (0), unless forced; any
# other record (none, final, or a lost chain's) starts afresh with this message (1).
_START = """
local msg = redis.call('HGET', KEYS[1], 'msg')
local state = redis.call('HGET', KEYS[1], 'state')
local live = msg and msg ~= '' and state ~= 'done' and state ~= 'failed' and state ~= 'cancelled'
if live and ARGV[9] ~= '1' and redis.call('ZSCORE', KEYS[2], ARGV[6]) then
  return 0
end
redis.call('DEL', KEYS[1])
local fields = cjson.decode(ARGV[10])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'msg', ARGV[1], 'step', ARGV[2], 'payload', ARGV[3], 'due', ARGV[4],
  'holder', '', 'updated_at', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[6])
return 1
"""

# KEYS: record, active, held set of the holder. ARGV: msg, holder, now, stall, job_id, worker prefix.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'msg') ~= ARGV[1] then
  return 'stale'
end
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= '' and holder ~= ARGV[2] and redis.call('EXISTS', ARGV[6] .. holder) == 1 then
  return 'busy'
end
redis.call('HSET', KEYS[1], 'holder', ARGV[2], 'claimed_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[5])
redis.call('SADD', KEYS[3], ARGV[5] .. ' ' .. ARGV[1])
return 'ok'
"""

# KEYS: record, active, held set. ARGV: msg, next msg, step, payload, due, grace, job_id, now, ttl.
# Idempotent: asked again after it succeeded (a retried call), it answers 1 again.
_ADVANCE = """
local cur = redis.call('HGET', KEYS[1], 'msg')
if cur == ARGV[2] then
  return 1
end
if cur ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'msg', ARGV[2], 'step', ARGV[3], 'payload', ARGV[4], 'due', ARGV[5],
  'holder', '', 'updated_at', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('ZADD', KEYS[2], tonumber(ARGV[5]) + tonumber(ARGV[6]), ARGV[7])
redis.call('SREM', KEYS[3], ARGV[7] .. ' ' .. ARGV[1])
return 1
"""

# KEYS: record, active, held set. ARGV: msg, job_id, now.
_FINISH = """
local cur = redis.call('HGET', KEYS[1], 'msg')
redis.call('SREM', KEYS[3], ARGV[2] .. ' ' .. ARGV[1])
if cur ~= ARGV[1] and cur ~= '' then
  return 0
end
redis.call('HSET', KEYS[1], 'msg', '', 'holder', '', 'updated_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'payload')
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


# KEYS: record, active. ARGV: expected msg, new msg, now, grace, job_id.
# Hands a job that stopped moving to a new message; returns its step and payload to publish.
_REDRIVE = """
if redis.call('HGET', KEYS[1], 'msg') ~= ARGV[1] then
  return false
end
local step = redis.call('HGET', KEYS[1], 'step')
local payload = redis.call('HGET', KEYS[1], 'payload')
if not step or not payload then
  return false
end
redis.call('HSET', KEYS[1], 'msg', ARGV[2], 'holder', '', 'due', ARGV[3], 'updated_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'redriven', 1)
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[5])
return {step, payload}
"""

# KEYS: record, active. ARGV: msg, job_id.
_ABANDON = """
if redis.call('HGET', KEYS[1], 'msg') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class JobLedger:
    """The fenced transitions of job records, on one Redis client (scripts registered once)."""

    def __init__(self, client: redis.Redis, *, grace: float, stall: float) -> None:
        self._redis = client
        self.grace = grace  # how long past its due time a step may wait for a worker
        self.stall = stall  # how long a claimed step may run before it counts as stuck
        self._start = client.register_script(_START)
        self._claim = client.register_script(_CLAIM)
        self._advance = client.register_script(_ADVANCE)
        self._finish = client.register_script(_FINISH)
        self._redrive = client.register_script(_REDRIVE)
        self._abandon = client.register_script(_ABANDON)

    def start(self, job_id: str, msg: str, step: str, payload: dict[str, Any], *, force: bool = False, **fields: Any) -> bool:
        """Open a job with its first message; False when a live chain already has it (nothing changed)."""
        now = time.time()
        values = {k: str(v) for k, v in {"state": "queued", "stage": "queued", **fields}.items() if v is not None}
        return bool(
            self._start(
                keys=[key(job_id), ACTIVE],
                args=[msg, step, json.dumps(payload), now, self.grace, job_id, RECORD_TTL, now, int(force), json.dumps(values)],
            )
        )

    def claim(self, job_id: str, msg: str, holder: str) -> str:
        """``ok`` (run the step), ``stale`` (the job has moved on: drop) or ``busy`` (a live worker runs it: drop)."""
        answer = self._claim(keys=[key(job_id), ACTIVE, held_key(holder)], args=[msg, holder, time.time(), self.stall, job_id, WORKER_PREFIX])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def advance(self, job_id: str, msg: str, next_msg: str, step: str, payload: dict[str, Any], due: float, holder: str) -> bool:
        """Hand the job to ``next_msg`` (to be published next); False when ``msg`` no longer owns it."""
        args = [msg, next_msg, step, json.dumps(payload), due, self.grace, job_id, time.time(), RECORD_TTL]
        return bool(self._advance(keys=[key(job_id), ACTIVE, held_key(holder)], args=args))

    def finish(self, job_id: str, msg: str, holder: str) -> bool:
        """The job reached its end with ``msg``: no message may move it any more."""
        return bool(self._finish(keys=[key(job_id), ACTIVE, held_key(holder)], args=[msg, job_id, time.time()]))

    def release(self, job_id: str, msg: str, holder: str) -> None:
        """Forget that ``holder`` received ``msg`` (a message it dropped as stale or busy)."""
        self._redis.srem(held_key(holder), f"{job_id} {msg}")

    def abandon(self, job_id: str, msg: str) -> None:
        """Undo a ``start`` whose message could not be published, unless something moved the job since."""
        self._abandon(keys=[key(job_id), ACTIVE], args=[msg, job_id])

    def redrive(self, job_id: str, expected_msg: str, new_msg: str) -> tuple[str, dict[str, Any]] | None:
        """Give a stuck job's step to ``new_msg`` if ``expected_msg`` still owns it: (step, payload) to publish."""
        answer = self._redrive(keys=[key(job_id), ACTIVE], args=[expected_msg, new_msg, time.time(), self.grace, job_id])
        if not answer:
            return None
        step, payload = (part.decode() if isinstance(part, bytes) else part for part in answer)
        return step, json.loads(payload)
