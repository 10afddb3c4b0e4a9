"""``docpipe callbacks``: the receiver where callback providers (tuputech) deliver results.

A callback is kept only when everything about it agrees: the provider's signature, the job id
in the path, the job id the provider echoes from the submit, and the task id recorded for that
job (or, for a submit whose answer was lost, a task the job may have: it is adopted). It is
stored under its provider task id, so a late callback of an earlier attempt can never stand in
for the right one. Everything else is refused before any write (no trace in Redis or S3):
a malformed job id, a body over the size cap, a bad signature, a timestamp outside the replay
window, a nonce seen before.

On acceptance the task's concurrency slot is freed at once (a provider calls back once it has
finished, so the slot is free on its side too) and its processing time is noted: the longest
recent one bounds how long a task without a callback keeps its slot, all in one round trip. The
answer goes back at once (the provider gives us 5 s), and the step waiting for the result is
then woken (``wake``); one a worker was running meanwhile finds it at its next look.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline import jobs, links
from pipeline.providers import get_provider, provider_names
from pipeline.limits import free_slot_lua
from pipeline.liveness import RECEIVER_KEY, Heartbeat
from pipeline.providers.base import Callback, CallbackRejected, Provider
from pipeline.runtime import async_redis_client, get_runtime

log = logging.getLogger(__name__)

STORE_TTL = 14 * 24 * 3600
PROCESSING_SAMPLES = 100
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _key(provider: str, task_id: str) -> str:
    return f"docpipe:callback:{provider}:{task_id}"


def _nonce_key(provider: str, nonce: str) -> str:
    return f"docpipe:callback-nonce:{provider}:{nonce}"


def processing_key(provider: Provider) -> str:
    return f"docpipe:processing:{provider.lease_key()}"


def load(provider: str, task_id: str) -> dict[str, Any] | None:
    raw = get_runtime().redis.get(_key(provider, task_id))
    return None if raw is None else json.loads(raw)


def forget(provider: str, task_id: str) -> None:
    get_runtime().redis.delete(_key(provider, task_id))


def longest_processing(provider: Provider) -> float | None:
    """The longest time from submit to callback among the recent tasks, if any was seen."""
    samples = get_runtime().redis.lrange(processing_key(provider), 0, PROCESSING_SAMPLES - 1)
    return max((float(s) for s in samples), default=None)


async def receive(request: Request) -> JSONResponse:
    """``POST /callbacks/{provider}/{job_id}``: cheap refusals first, then ``handle``."""
    name, job_id = request.path_params["provider"], request.path_params["job_id"]
    if name not in provider_names() or not get_provider(name).uses_callbacks or not _JOB_ID.fullmatch(job_id):
        return JSONResponse({"error": "not found"}, status_code=404)
    cap = get_runtime().settings.callback_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        return JSONResponse({"error": "body too large"}, status_code=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            return JSONResponse({"error": "body too large"}, status_code=413)
    return await handle(name, job_id, bytes(body), request.app.state.redis)


async def handle(name: str, job_id: str, body: bytes, client: redis.asyncio.Redis) -> JSONResponse:
    """Verify, check, keep and free the slot on the event loop: the waiting submit's slot is freed
    without a hop to a thread (which link downloads kept busy: up to 25 ms in bench.concurrency's
    trace). Only a Redis that refuses writes sends the rest to a thread."""
    provider = get_provider(name)
    try:
        callback = provider.open_callback(body)
        _check_signed_fields(job_id, callback)
        await keep_async(provider, job_id, callback, client)
    except CallbackRejected as rejected:
        log.warning("callback for %s/%s refused (%d): %s", name, job_id, rejected.status, rejected.reason)
        return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
    except WRITES_REFUSED as exc:
        return await run_in_threadpool(_spool, provider, job_id, callback, exc)
    except redis.ResponseError as exc:  # not Redis refusing writes: nothing to spool; the provider retries
        log.error("callback for %s/%s not kept: Redis answered %s", name, job_id, type(exc).__name__)
        return JSONResponse({"error": "busy, retry"}, status_code=503)
    except redis.RedisError:  # cannot even read: let the provider retry
        return JSONResponse({"error": "busy, retry"}, status_code=503)
    # The seed's own example answer (001, 4.4); the waiting step is woken once it has left.
    return JSONResponse({"message": "ok"}, background=BackgroundTask(wake, job_id))


def wake(job_id: str) -> bool:
    """Hand the job's waiting step, whose result just came, to a message due now: it would
    otherwise look when its poll schedule says, seconds or (learnt, or backed off) a minute
    later, holding the finished document back from its archive. The message it had is fenced
    off (``JobLedger.redrive``) and does nothing when it comes due. A step running now is left to
    finish: it sees the result, or schedules its next look. Best effort: the poll is the net."""
    rt = get_runtime()
    try:
        current = rt.redis.hget(jobs.key(job_id), "msg")
        if not current:
            return False
        msg = str(uuid.uuid4())
        handed = rt.ledger.redrive(job_id, current.decode(), msg, waiting_at="await")
        if handed is None:
            return False
        from workers.tasks import publish  # the Celery app is only needed to send

        step, payload = handed
        publish(step, payload, msg, 0.0)
    except Exception as exc:  # noqa: BLE001 - the step's own poll finds the result anyway
        log.info("callback for %s: waiting step not woken (%s)", job_id, type(exc).__name__)
        return False
    return True


# What Redis answers while it refuses writes (out of memory, a read-only replica), a script's
# writes included: the callbacks that come meanwhile are spooled to disk.
WRITES_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)


def _spool(provider: Provider, job_id: str, callback: Callback, refusal: redis.RedisError) -> JSONResponse:
    """Redis refuses writes (OOM, a read-only replica): check what can be read and keep the callback
    on disk, since the provider retries only for seconds; the spool is drained into Redis when it
    accepts writes again."""
    try:
        _check_by_reading(provider, job_id, callback)
    except CallbackRejected as rejected:
        return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
    except redis.RedisError:
        return JSONResponse({"error": "busy, retry"}, status_code=503)
    Spool.default().put(provider.name, job_id, callback)
    log.warning("callback for %s/%s spooled to disk: Redis refused it (%s)", provider.name, job_id, type(refusal).__name__)
    return JSONResponse({"message": "ok"})


def _check_signed_fields(job_id: str, callback: Callback) -> None:
    """The refusals that need no Redis: whose job the provider echoes, when and with what nonce it signed."""
    if callback.job_id != job_id:
        raise CallbackRejected(403, "the job id the provider echoes is not the one in the path")
    window = get_runtime().settings.callback_replay_window
    if callback.timestamp is None or abs(time.time() - callback.timestamp) > window:
        raise CallbackRejected(403, f"timestamp outside the {window:.0f}s replay window")
    if callback.nonce is None:
        raise CallbackRejected(409, "a callback without a nonce cannot be told from a replay")


REPLAYED = "nonce seen before (a replay or a repeated delivery)"
NOT_WAITED_FOR = "not the task this job is waiting for"


def _check_by_reading(provider: Provider, job_id: str, callback: Callback) -> None:
    """The checks of ``_KEEP``, by reading only: whether a callback Redis cannot store now is one to keep."""
    pipe = get_runtime().redis.pipeline(transaction=False)
    pipe.exists(_nonce_key(provider.name, callback.nonce or ""))
    pipe.hgetall(jobs.key(job_id))
    seen, fields = pipe.execute()
    if seen:
        raise CallbackRejected(409, REPLAYED)
    record = jobs.decoded(fields)
    recorded = record.get("provider_task_id")
    if recorded != callback.task_id and not (not recorded and record.get("sending_at")):
        raise CallbackRejected(409, NOT_WAITED_FOR)


# One round trip from a verified callback to the freed slot, which a waiting submit takes at once.
# KEYS: 1 nonce, 2 job record, 3 result store, 4 processing times, 5 lease set, 6 lease waiters.
# ARGV: 1 task id, 2 payload, 3 store ttl, 4 nonce ttl, 5 now, 6 processing samples kept,
# 7 lease id ('' when the provider has no in-flight limit).
# Refuses a nonce seen before, and a task that is neither the job's nor one a submit without an
# answer may have created (then adopted); stores the result before freeing the slot, so a worker
# that takes the slot never outruns it.
_KEEP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'replayed', 0} end
local f = redis.call('HMGET', KEYS[2], 'provider_task_id', 'sending_at', 'submitted_at')
local recorded, sending, submitted = f[1], f[2], f[3]
if recorded == '' then recorded = false end
if sending == '' then sending = false end
if submitted == '' then submitted = false end
if recorded ~= ARGV[1] and not (not recorded and sending) then return {'not_waited_for', 0} end
redis.call('SET', KEYS[3], ARGV[2], 'NX', 'EX', ARGV[3])
redis.call('SET', KEYS[1], '1', 'EX', ARGV[4])
local since = submitted or sending or ARGV[5]
local adopted = 0
if not recorded then
  redis.call('HSET', KEYS[2], 'provider_task_id', ARGV[1], 'submitted_at', since)
  redis.call('HDEL', KEYS[2], 'sending_at')
  adopted = 1
end
redis.call('LPUSH', KEYS[4], string.format('%.3f', tonumber(ARGV[5]) - tonumber(since)))
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[6]) - 1)
if ARGV[7] ~= '' then
  local freed = 0""" + free_slot_lua("KEYS[5]", "KEYS[6]", "ARGV[7]") + """end
return {'kept', adopted}
"""


@cache
def _keep_script(client: redis.Redis) -> Script:
    return client.register_script(_KEEP)


@cache
def _async_keep_script(client: redis.asyncio.Redis) -> AsyncScript:
    return client.register_script(_KEEP)


def keep(provider: Provider, job_id: str, callback: Callback) -> None:
    """Store the result under its task, remember the nonce, adopt a task whose submit lost its
    answer, note how long the task took, and free its slot; ``CallbackRejected`` for a replay or
    a task the job is not waiting for, with nothing written. ``WRITES_REFUSED`` says Redis refused
    the writes."""
    keys, args = _keep_call(provider, job_id, callback)
    _kept(provider, job_id, callback, _keep_script(get_runtime().redis)(keys=keys, args=args))


async def keep_async(provider: Provider, job_id: str, callback: Callback, client: redis.asyncio.Redis) -> None:
    """``keep``, on the event loop, with the receiver's own client (``_lifespan``'s)."""
    keys, args = _keep_call(provider, job_id, callback)
    script = _async_keep_script(client)
    _kept(provider, job_id, callback, await script(keys=keys, args=args))


def _keep_call(provider: Provider, job_id: str, callback: Callback) -> tuple[list[str], list[Any]]:
    rt = get_runtime()
    leases, waiters = rt.leases.keys(provider.lease_key())
    keys = [
        _nonce_key(provider.name, callback.nonce or ""),
        jobs.key(job_id),
        _key(provider.name, callback.task_id),
        processing_key(provider),
        leases,
        waiters,
    ]
    args = [
        callback.task_id,
        json.dumps(callback.payload, ensure_ascii=False),
        STORE_TTL,
        int(2 * rt.settings.callback_replay_window),
        time.time(),
        PROCESSING_SAMPLES,
        job_id if provider.max_in_flight() else "",
    ]
    return keys, args


def _kept(provider: Provider, job_id: str, callback: Callback, result: list[Any]) -> None:
    outcome, adopted = result
    if outcome == b"replayed":
        raise CallbackRejected(409, REPLAYED)
    if outcome == b"not_waited_for":
        raise CallbackRejected(409, NOT_WAITED_FOR)
    if adopted:
        log.info("%s/%s: adopting task %s, named by its callback (its submit got no answer)", provider.name, job_id, callback.task_id)


class Spool:
    """Callbacks that were verified but could not be written to Redis, one file each, fsynced
    before the provider is answered, and put into Redis by a background thread as soon as it
    accepts writes again (each then goes through the same checks and keeping as a new one)."""

    _default: Spool | None = None

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()

    @classmethod
    def default(cls) -> Spool:
        if cls._default is None:
            cls._default = cls(Path(get_runtime().settings.callback_spool_dir).expanduser())
        return cls._default

    def put(self, provider: str, job_id: str, callback: Callback) -> None:
        final = self.directory / f"{provider}-{job_id}-{callback.task_id}.json"
        partial = final.with_suffix(".part")
        entry = {"provider": provider, "job_id": job_id, "callback": asdict(callback)}
        with partial.open("w") as fh:
            json.dump(entry, fh)
            fh.flush()
            os.fsync(fh.fileno())
        partial.rename(final)

    def drain(self) -> int:
        """Keep every spooled callback Redis now accepts; return how many were kept."""
        kept = 0
        for path in sorted(self.directory.glob("*.json")):
            entry = json.loads(path.read_text())
            provider, callback = get_provider(entry["provider"]), Callback(**entry["callback"])
            try:
                keep(provider, entry["job_id"], callback)
                wake(entry["job_id"])
                kept += 1
            except CallbackRejected as rejected:  # taken meanwhile (a retried delivery got in), or no longer wanted
                log.info("spooled callback %s dropped: %s", path.name, rejected.reason)
            except redis.ResponseError as exc:
                if isinstance(exc, WRITES_REFUSED):
                    return kept  # still refused: try again later
                # Refused for itself, not for Redis' state: set aside, so that it holds no other back.
                path.rename(path.with_suffix(".refused"))
                log.error("spooled callback %s set aside as %s: Redis answered %s", path.name, path.with_suffix(".refused").name, exc)
                continue
            except redis.RedisError:
                return kept  # Redis away: try again later
            path.unlink()
        return kept

    def run(self, every: float = 1.0) -> None:
        while not self._stop.wait(every):
            try:
                self.drain()
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                log.warning("callback spool not drained (%s)", type(exc).__name__)

    def start(self) -> None:
        threading.Thread(target=self.run, name="docpipe-callback-spool", daemon=True).start()


def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def create_app() -> Starlette:
    """The receiver: providers' callbacks, and the signed document links tuputech downloads from."""
    return Starlette(
        routes=[
            Route("/callbacks/{provider}/{job_id}", receive, methods=["POST"]),
            *links.routes(),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=_lifespan,
    )


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    """The receiver's Redis client for its event loop (its connections belong to that loop), the
    spool's drainer, and what the first callback and the first download would otherwise build
    while the rest wait (``_warm_up``)."""
    await run_in_threadpool(_warm_up)
    settings = get_runtime().settings
    app.state.redis = async_redis_client(settings)
    Spool.default().start()
    # While no receiver beats, callback providers' submits wait (``stages.submit``): a task sent
    # then would have its results posted to nobody, and end as callback_missing.
    heartbeat = Heartbeat(get_runtime().redis, key=RECEIVER_KEY, every=settings.heartbeat_every, ttl=settings.heartbeat_ttl)
    heartbeat.start(tolerate_outage=True)
    try:
        yield
    finally:
        await run_in_threadpool(heartbeat.stop)
        await app.state.redis.aclose()


def _warm_up() -> None:
    """Before the first request: the S3 client and the link key that every document link needs,
    the providers' keys that check callbacks, and pooled Redis connections. Built by the first
    download instead, the S3 client alone took tens of ms of CPU under the receiver's GIL just as
    the first documents of a batch were downloaded and called back."""
    from pipeline.warmup import warm_up

    warm_up(threads=4, http=False, also=[("link key", links.warm_up)])
