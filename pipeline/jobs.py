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

import contextvars
import hashlib
import json
import time
from functools import cache
from typing import Any

import redis

from pipeline.limits import take_lease_lua

RECORD_TTL = 7 * 24 * 3600
ACTIVE = "docpipe:active"
WORKER_PREFIX = "docpipe:worker:"
HELD_PREFIX = "docpipe:held:"
# Every worker process whose heartbeat has run: where the reconciler finds the held sets. Found by
# a SCAN for ``HELD_PREFIX`` instead, every pass walked the whole keyspace, one job record after
# another: 2.4 s and 10,000 round trips per pass with a million records.
HOLDERS = "docpipe:holders"
# Per queue lane (a provider's queue at one priority: one Redis list, first in first out), the
# send time of the latest message a worker received from it (``workers.transport``): a message
# sent well before that mark left its list too, so one nobody claimed was lost.
RECEIVED = "docpipe:received"
FINAL_STATES = ("done", "failed", "cancelled")
STATES = "docpipe:states"  # every job by state (as the scripts below move them), for the metrics
FAILURES = "docpipe:failures"  # failed jobs by stage:code[:provider code]


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


def lane(provider: str, priority: int) -> str:
    """The Redis list holding a provider's messages of one priority, as kombu names it
    (``priority_steps`` 0-9, separator ``:``; priority 0 is the queue's own name)."""
    return f"docpipe.{provider}" if priority == 0 else f"docpipe.{provider}:{priority}"


def sent_headers(provider: str, priority: int) -> dict[str, Any]:
    """The headers every docpipe message carries for ``RECEIVED``: its lane and when it was sent."""
    return {"docpipe_lane": lane(provider, priority), "docpipe_sent": round(time.time(), 3)}


def record(client: redis.Redis, job_id: str, **fields: Any) -> None:
    """Merge fields into the job's record; ``None`` values are skipped.

    A change of ``state`` is counted in the job's batches in the same script (see
    ``pipeline.batches``): watching a batch of any size then costs one read of its counters.
    """
    mapping = {k: str(v) for k, v in fields.items() if v is not None}
    _scripts(client)["record"](keys=[key(job_id)], args=[job_id, RECORD_TTL, time.time(), json.dumps(mapping)])


def read(client: redis.Redis, job_id: str) -> dict[str, str]:
    return decoded(client.hgetall(key(job_id)))


def decoded(fields: dict[bytes, bytes]) -> dict[str, str]:
    """A hash as ``HGETALL`` answers it (a record, a batch's counters), in text."""
    return {k.decode(): v.decode() for k, v in fields.items()}


def states(client: redis.Redis, job_ids: list[str]) -> dict[str, str | None]:
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(key(job_id), "state")
    return {job_id: (v.decode() if v else None) for job_id, v in zip(job_ids, pipe.execute())}


# --- batch accounting, shared by the scripts below -------------------------------------------

# Moves a job between its batches' state counters (``docpipe:batch:<name>:counts``), keeps
# failures by reason, and lists finished jobs in order (``:finished``) for ``as_completed``.
# Keys are built here from the record's ``batches`` field, so docpipe needs one Redis (not a
# cluster), as its Lua limiter and ledger already do.
_ACCOUNT = """
local function account_all(old, new, old_reason, new_reason)
  if old == new then return end
  if old and old ~= '' then redis.call('HINCRBY', 'docpipe:states', old, -1) end
  if old == 'failed' and old_reason and old_reason ~= '' then redis.call('HINCRBY', 'docpipe:failures', old_reason, -1) end
  if new and new ~= '' then redis.call('HINCRBY', 'docpipe:states', new, 1) end
  if new == 'failed' and new_reason and new_reason ~= '' then redis.call('HINCRBY', 'docpipe:failures', new_reason, 1) end
end

local function account(job_id, batches, old, new, old_reason, new_reason, now)
  if not batches or batches == '' or old == new then return end
  for b in string.gmatch(batches, '%S+') do
    local base = 'docpipe:batch:' .. b
    if old and old ~= '' then redis.call('HINCRBY', base .. ':counts', old, -1) end
    if old == 'failed' and old_reason and old_reason ~= '' then redis.call('HINCRBY', base .. ':reasons', old_reason, -1) end
    if new and new ~= '' then redis.call('HINCRBY', base .. ':counts', new, 1) end
    if new == 'failed' and new_reason and new_reason ~= '' then redis.call('HINCRBY', base .. ':reasons', new_reason, 1) end
    if new == 'done' or new == 'failed' or new == 'cancelled' then
      redis.call('RPUSH', base .. ':finished', job_id)
      redis.call('HSET', base, 'last_finished_at', now)
      redis.call('HSETNX', base, 'first_finished_at', now)
    end
  end
end

local function join(record, job_id, batch, fallback_state, fallback_reason, skipped, now)
  if not batch or batch == '' then return 0 end
  local base = 'docpipe:batch:' .. batch
  if redis.call('SADD', base .. ':members', job_id) == 0 then return 0 end
  local state, reason = fallback_state, fallback_reason
  local current = redis.call('HMGET', record, 'state', 'batches', 'reason')
  if current[1] then
    state, reason = current[1], current[3]
    local batches = current[2] or ''
    redis.call('HSET', record, 'batches', batches == '' and batch or (batches .. ' ' .. batch))
  end
  redis.call('HINCRBY', base, 'total', 1)
  if skipped == '1' then redis.call('HINCRBY', base, 'skipped', 1) end
  account(job_id, batch, '', state, '', reason, now)
  return 1
end
"""

# KEYS: record. ARGV: job_id, ttl, now, fields (JSON).
_RECORD = _ACCOUNT + """
local fields = cjson.decode(ARGV[4])
local skipped = fields['skipped'] == '1'  -- found already archived: counted as such in its batches
fields['skipped'] = nil
local before = redis.call('HMGET', KEYS[1], 'state', 'batches', 'reason')
if before[1] == 'cancelled' then
  fields['state'] = nil  -- a step that was running when its job was cancelled does not revive it
end
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if fields['state'] then
  account_all(before[1] or '', fields['state'], before[3], fields['reason'])
  account(ARGV[1], before[2], before[1] or '', fields['state'], before[3], fields['reason'], ARGV[3])
  if skipped and before[2] and before[1] ~= fields['state'] then
    for b in string.gmatch(before[2], '%S+') do redis.call('HINCRBY', 'docpipe:batch:' .. b, 'skipped', 1) end
  end
end
return 1
"""

# KEYS: record. ARGV: job_id, batch, state when there is no record, its reason, skipped (0/1), now.
_JOIN = _ACCOUNT + """
return join(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""


# --- the fenced transitions --------------------------------------------------------------------

# KEYS: record, active. ARGV: msg, step, payload, due, grace, job_id, ttl, now, force, fields (JSON), batch,
# keep_final.
# A job whose record holds a live message is in flight and keeps it (0), unless forced; any
# other record (none, final, or a lost chain's) starts afresh with this message (1), staying
# in the batches it belonged to (counted as queued again). Either way it joins ``batch``.
# With keep_final (a start from a listing, which nobody looked up in the archive), a finished
# job stays finished and joins as skipped (2). A record that already holds this very message
# is this start, asked again after its answer was lost (1, nothing changes).
_START = _ACCOUNT + """
local before = redis.call('HMGET', KEYS[1], 'msg', 'state', 'batches', 'reason')
local msg, state = before[1], before[2]
if msg == ARGV[1] then
  return 1
end
if ARGV[12] == '1' and (state == 'done' or state == 'failed') then
  join(KEYS[1], ARGV[6], ARGV[11], state, '', '1', ARGV[8])
  return 2
end
local live = msg and msg ~= '' and state ~= 'done' and state ~= 'failed' and state ~= 'cancelled'
if live and ARGV[9] ~= '1' and redis.call('ZSCORE', KEYS[2], ARGV[6]) then
  join(KEYS[1], ARGV[6], ARGV[11], 'queued', '', '0', ARGV[8])
  return 0
end
redis.call('DEL', KEYS[1])
local fields = cjson.decode(ARGV[10])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'msg', ARGV[1], 'step', ARGV[2], 'payload', ARGV[3], 'due', ARGV[4],
  'holder', '', 'updated_at', ARGV[8])
account_all(state or '', fields['state'], before[4], '')
if before[3] and before[3] ~= '' then
  redis.call('HSET', KEYS[1], 'batches', before[3])
  account(ARGV[6], before[3], state or '', fields['state'], before[4], '', ARGV[8])
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[6])
join(KEYS[1], ARGV[6], ARGV[11], 'queued', '', '0', ARGV[8])
return 1
"""

# KEYS: record, active, held set of the holder. ARGV: msg, holder, now, stall, job_id, worker prefix, claim token.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'msg') ~= ARGV[1] then
  return 'stale'
end
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= '' and redis.call('EXISTS', ARGV[6] .. holder) == 1 then
  if holder == ARGV[2] then
    if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'claim') == ARGV[7] then
      return 'ok'  -- our own claim, asked again because its answer was lost
    end
    return 'running'
  end
  return 'busy'
end
redis.call('HSET', KEYS[1], 'holder', ARGV[2], 'claim', ARGV[7], 'claimed_at', ARGV[3], 'updated_at', ARGV[3],
  'running', redis.call('HGET', KEYS[1], 'step') or '')
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


# KEYS: record, active. ARGV: expected msg, new msg, now, grace, job_id, and a step the job must
# be waiting at, held by no worker ('' for any step, held or not: a dead worker's), and '1' when
# the new message goes ahead of its stage's fresh ones (the reconciler's: ``stages.priority``).
# Hands a job's step to a new message; returns its step and payload to publish. The record
# remembers which message went ahead (``ahead``): the reconciler reads its lane from it.
_REDRIVE = """
local f = redis.call('HMGET', KEYS[1], 'msg', 'step', 'payload', 'holder')
local step, payload = f[2], f[3]
if f[1] ~= ARGV[1] or not step or not payload then
  return false
end
if ARGV[6] ~= '' and (step ~= ARGV[6] or (f[4] and f[4] ~= '')) then
  return false
end
redis.call('HSET', KEYS[1], 'msg', ARGV[2], 'holder', '', 'due', ARGV[3], 'updated_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'redriven', 1)
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[1], 'ahead', ARGV[2])
end
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[5])
return {step, payload}
"""

# KEYS: record, active. ARGV: msg, job_id, deadline, due ('' to keep it).
# Moves the deadline of an unclaimed message: the reconciler's next look at one waiting its turn,
# or a message sent only now (a listing's first steps, fanned out from their dispatch message
# minutes after their start), which is due from now. One that moved meanwhile (claimed or
# handed on) keeps its own.
_RESCHEDULE = """
local f = redis.call('HMGET', KEYS[1], 'msg', 'holder')
if f[1] ~= ARGV[1] or (f[2] and f[2] ~= '') then
  return 0
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'due', ARGV[4])
end
redis.call('ZADD', KEYS[2], 'XX', tonumber(ARGV[3]), ARGV[2])
return 1
"""

# KEYS: record, active. ARGV: job_id, now.
# Stops a job that no provider has seen: not once a submit may have left (``sending_at``) or
# was accepted. Answers what the job was: cancelled, at_provider, done/failed/cancelled, unknown.
_CANCEL = _ACCOUNT + """
local f = redis.call('HMGET', KEYS[1], 'state', 'provider_task_id', 'sending_at', 'batches', 'reason')
local state = f[1]
if not state then return 'unknown' end
if state == 'done' or state == 'failed' or state == 'cancelled' then return state end
if (f[2] and f[2] ~= '') or (f[3] and f[3] ~= '') then return 'at_provider' end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'msg', '', 'holder', '', 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'payload')
redis.call('ZREM', KEYS[2], ARGV[1])
account_all(state, 'cancelled', f[5], '')
account(ARGV[1], f[4], state, 'cancelled', f[5], '', ARGV[2])
return 'cancelled'
"""

# KEYS: record. ARGV: now, the message that claimed the step ('' when run outside a step).
# A submit about to leave, unless the job was cancelled (0) or handed to another message (-1).
_MAY_SEND = """
local f = redis.call('HMGET', KEYS[1], 'state', 'msg')
if f[1] == 'cancelled' then return 0 end
if ARGV[2] ~= '' and f[2] ~= ARGV[2] then return -1 end
"""
_MARK_SENDING = """
redis.call('HSET', KEYS[1], 'sending_at', ARGV[1], 'updated_at', ARGV[1])
return 1
"""
_SENDING = _MAY_SEND + _MARK_SENDING
# KEYS: record, lease set. ARGV: now, msg, lease id, limit, lease ttl in ms.
_SENDING_IN_SLOT = (
    _MAY_SEND + "local held = 0" + take_lease_lua("KEYS[2]", "ARGV[3]", "ARGV[4]", "ARGV[5]") + "if held == 0 then return 2 end" + _MARK_SENDING
)

# The message whose claim the current thread runs a step under (set by ``pipeline.driver``).
claimed_msg: contextvars.ContextVar[str] = contextvars.ContextVar("docpipe_claimed_msg", default="")

# KEYS: record. ARGV: msg, holder, now.
_UNCLAIM = """
if redis.call('HGET', KEYS[1], 'msg') == ARGV[1] and redis.call('HGET', KEYS[1], 'holder') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'holder', '', 'updated_at', ARGV[3])
  return 1
end
return 0
"""

# KEYS: record, active. ARGV: msg, job_id.
_ABANDON = _ACCOUNT + """
if redis.call('HGET', KEYS[1], 'msg') == ARGV[1] then
  local before = redis.call('HMGET', KEYS[1], 'state', 'batches')
  account_all(before[1] or '', '', '', '')
  if before[2] then
    for b in string.gmatch(before[2], '%S+') do
      redis.call('SREM', 'docpipe:batch:' .. b .. ':members', ARGV[2])
      redis.call('HINCRBY', 'docpipe:batch:' .. b, 'total', -1)
      if before[1] then redis.call('HINCRBY', 'docpipe:batch:' .. b .. ':counts', before[1], -1) end
    end
  end
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


@cache
def _scripts(client: redis.Redis) -> dict[str, Any]:
    scripts = (("record", _RECORD), ("join", _JOIN), ("sending", _SENDING), ("sending_in_slot", _SENDING_IN_SLOT))
    return {name: client.register_script(source) for name, source in scripts}


def mark_sending(client: redis.Redis, job_id: str) -> int:
    """Record that a submit leaves now: 1; nothing written when the job was cancelled (0) or, while
    this step ran, handed to another message (-1: a worker taken for dead, whose step the
    reconciler gave to another; only one of them may send)."""
    return int(_scripts(client)["sending"](keys=[key(job_id)], args=[time.time(), claimed_msg.get()]))


NO_SLOT = 2


def mark_sending_in_slot(client: redis.Redis, job_id: str, leases: str, limit: int, ttl: float) -> int:
    """``mark_sending`` and the job's in-flight lease (lease id: the job id) in one round trip, for a
    request that leaves as soon as it holds its slot: ``NO_SLOT`` and nothing written when every
    slot is taken; a cancelled or superseded job takes no slot."""
    args = [time.time(), claimed_msg.get(), job_id, limit, int(ttl * 1000)]
    return int(_scripts(client)["sending_in_slot"](keys=[key(job_id), leases], args=args))


# (job id, first message id, its step, its payload, the record's fields): one job for ``start_many``.
Start = tuple[str, str, str, dict[str, Any], dict[str, Any]]


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
        self._reschedule = client.register_script(_RESCHEDULE)
        self._abandon = client.register_script(_ABANDON)
        self._unclaim = client.register_script(_UNCLAIM)
        self._cancel = client.register_script(_CANCEL)

    def start(
        self, job_id: str, msg: str, step: str, payload: dict[str, Any], *, force: bool = False, batch: str = "", **fields: Any
    ) -> bool:
        """Open a job with its first message; False when a live chain already has it (nothing
        changed but its joining ``batch``)."""
        return bool(self._start(**self._start_call(job_id, msg, step, payload, force=force, batch=batch, **fields)))

    def start_many(self, starts: list[Start], *, batch: str = "") -> list[int | Exception]:
        """``start`` for the jobs of a listing, in one round trip: each job's answer (1 started,
        0 a live chain has it, 2 finished already: joined as skipped), or the error of that one.
        Asked again with the same message ids, it answers the same: a chunk whose answers were
        lost can be sent again."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id, msg, step, payload, fields in starts:
            self._start(**self._start_call(job_id, msg, step, payload, batch=batch, keep_final=True, **fields), client=pipe)
        return [answer if isinstance(answer, Exception) else int(answer) for answer in pipe.execute(raise_on_error=False)]

    def _start_call(
        self,
        job_id: str,
        msg: str,
        step: str,
        payload: dict[str, Any],
        *,
        force: bool = False,
        batch: str = "",
        keep_final: bool = False,
        **fields: Any,
    ) -> dict[str, Any]:
        now = time.time()
        values = {k: str(v) for k, v in {"state": "queued", "stage": "queued", **fields}.items() if v is not None}
        args = [msg, step, json.dumps(payload), now, self.grace, job_id, RECORD_TTL, now, int(force), json.dumps(values), batch, int(keep_final)]
        return {"keys": [key(job_id), ACTIVE], "args": args}

    def join(self, job_id: str, batch: str, *, state: str, reason: str = "", skipped: bool = False) -> bool:
        """Count a job in ``batch`` (once): by its record's state, or by ``state`` when it has no
        record (a document found already archived)."""
        return bool(_scripts(self._redis)["join"](keys=[key(job_id)], args=[job_id, batch, state, reason, int(skipped), time.time()]))

    def claim(self, job_id: str, msg: str, holder: str, token: str = "") -> str:
        """``ok`` (run the step), ``stale`` (the job has moved on: drop), ``busy`` (another live worker
        runs it: drop) or ``running`` (another thread of this process runs it: drop, and keep its
        held entry, which is that thread's).

        A copy of the same message can reach the same process while the first still runs (kombu
        puts unacknowledged messages back when a broker connection drops): a thread pool shares
        one holder id, so only "nobody holds this step" lets a claim through. A step that ended
        without handing the job on gives its claim back (``unclaim``).

        ``token`` names this attempt to claim: asked again with the same token (the first answer
        was lost with a Redis that died after running the script), the claim answers ``ok``
        again instead of taking its own earlier success for another thread's."""
        args = [msg, holder, time.time(), self.stall, job_id, WORKER_PREFIX, token]
        answer = self._claim(keys=[key(job_id), ACTIVE, held_key(holder)], args=args)
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def advance(self, job_id: str, msg: str, next_msg: str, step: str, payload: dict[str, Any], due: float, holder: str) -> bool:
        """Hand the job to ``next_msg`` (to be published next); False when ``msg`` no longer owns it."""
        args = [msg, next_msg, step, json.dumps(payload), due, self.grace, job_id, time.time(), RECORD_TTL]
        return bool(self._advance(keys=[key(job_id), ACTIVE, held_key(holder)], args=args))

    def running(self, job_id: str, stage: str) -> None:
        """Say which stage the claimed step runs now: a claim names its message's step, and a step
        that runs the next stages inline (``driver.run_inline``) names each as it starts. Only
        for the eyes (an operator reading the record, ``bench.chaos`` picking its victim): nothing
        decides on it."""
        self._redis.hset(key(job_id), "running", stage)

    def finish(self, job_id: str, msg: str, holder: str) -> bool:
        """The job reached its end with ``msg``: no message may move it any more."""
        return bool(self._finish(keys=[key(job_id), ACTIVE, held_key(holder)], args=[msg, job_id, time.time()]))

    def unclaim(self, job_id: str, msg: str, holder: str) -> None:
        """Give back a claim whose step ended without handing the job on (an error escaped it): the
        message comes back (unacknowledged) or the reconciler re-drives it, and may claim again."""
        self._unclaim(keys=[key(job_id)], args=[msg, holder, time.time()])

    def cancel(self, job_id: str) -> str:
        """Stop a job no provider has seen: ``cancelled``; else what it is (``at_provider``, a final state, ``unknown``)."""
        answer = self._cancel(keys=[key(job_id), ACTIVE], args=[job_id, time.time()])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def release(self, job_id: str, msg: str, holder: str) -> None:
        """Forget that ``holder`` received ``msg`` (a message it dropped as stale or busy)."""
        self._redis.srem(held_key(holder), f"{job_id} {msg}")

    def abandon(self, job_id: str, msg: str) -> bool:
        """Undo a ``start`` whose message could not be published, unless something moved the job
        since (False: it runs)."""
        return bool(self._abandon(keys=[key(job_id), ACTIVE], args=[msg, job_id]))

    def redrive(
        self, job_id: str, expected_msg: str, new_msg: str, *, waiting_at: str = "", ahead: bool = False
    ) -> tuple[str, dict[str, Any]] | None:
        """Give a job's step to ``new_msg`` if ``expected_msg`` still owns it: (step, payload) to publish.

        A stuck job's (the reconciler's: its holder may be a dead worker); with ``waiting_at``, only
        a job waiting at that step that no worker holds (a step running now is left to finish).
        ``ahead``: the new message is published ahead of its stage's fresh ones (the record says so)."""
        args = [expected_msg, new_msg, time.time(), self.grace, job_id, waiting_at, int(ahead)]
        answer = self._redrive(keys=[key(job_id), ACTIVE], args=args)
        if not answer:
            return None
        step, payload = (part.decode() if isinstance(part, bytes) else part for part in answer)
        return step, json.loads(payload)

    def resent(self, sent: list[tuple[str, str]]) -> None:
        """(job id, message id) each: these unclaimed messages are published only now, so they are
        due from now. A message that no longer owns its job is left alone."""
        now = time.time()
        self._reschedule_all([(job_id, msg, now + self.grace, str(now)) for job_id, msg in sent])

    def look_later(self, waiting: list[tuple[str, str, float]]) -> None:
        """(job id, message id, when) each: unclaimed messages waiting their turn, to be looked at
        again ``when`` (the reconciler's). One that moved meanwhile is left alone."""
        self._reschedule_all([(job_id, msg, when, "") for job_id, msg, when in waiting])

    def _reschedule_all(self, entries: list[tuple[str, str, float, str]]) -> None:
        pipe = self._redis.pipeline(transaction=False)  # one round trip for them all
        for job_id, msg, deadline, due in entries:
            self._reschedule(keys=[key(job_id), ACTIVE], args=[msg, job_id, deadline, due], client=pipe)
        pipe.execute()
