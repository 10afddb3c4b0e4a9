"""``docpipe callbacks``: where callback providers (tuputech) deliver results.

A callback is verified with the provider's public key before anything is kept: a forged
one gets 403, a malformed one 400, and neither is stored. A valid one is stored once
(``SET NX``: a duplicate or a retried delivery changes nothing), the document's
concurrency lease is freed, and the answer goes back at once (the provider gives us 5 s).
Freeing the lease on arrival is safe without any delay: a provider calls back only once it
has finished processing the task, so the slot is already free on its side. The waiting
chain finds the result at its next look into the store; no worker waits on a socket.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline import jobs, links
from pipeline.providers import get_provider, provider_names
from pipeline.providers.base import CallbackRejected
from pipeline.runtime import get_runtime

log = logging.getLogger(__name__)

STORE_TTL = 14 * 24 * 3600


def _key(provider: str, job_id: str) -> str:
    return f"docpipe:callback:{provider}:{job_id}"


def store(provider: str, job_id: str, payload: dict[str, Any]) -> bool:
    """Keep a verified result; False when one was already kept (the first delivery wins)."""
    text = json.dumps(payload, ensure_ascii=False)
    return bool(get_runtime().redis.set(_key(provider, job_id), text, nx=True, ex=STORE_TTL))


def load(provider: str, job_id: str) -> dict[str, Any] | None:
    raw = get_runtime().redis.get(_key(provider, job_id))
    return None if raw is None else json.loads(raw)


def forget(provider: str, job_id: str) -> None:
    get_runtime().redis.delete(_key(provider, job_id))


async def receive(request: Request) -> JSONResponse:
    """``POST /callbacks/{provider}/{job_id}``; the Redis work runs in a thread, off the event loop."""
    body = await request.body()
    return await run_in_threadpool(handle, request.path_params["provider"], request.path_params["job_id"], body)


def handle(name: str, job_id: str, body: bytes) -> JSONResponse:
    if name not in provider_names() or not get_provider(name).uses_callbacks:
        return JSONResponse({"error": "unknown provider"}, status_code=404)
    provider = get_provider(name)
    try:
        payload = provider.open_callback(body)
    except CallbackRejected as rejected:
        log.warning("callback for %s/%s rejected (%d): %s", name, job_id, rejected.status, rejected.reason)
        return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
    expected = jobs.read(get_runtime().redis, job_id).get("provider_task_id")
    task_id = provider.callback_task_id(payload)
    if expected and task_id != expected:
        log.warning("callback for %s/%s names task %s, not %s: refused", name, job_id, task_id, expected)
        return JSONResponse({"error": "task does not match the job"}, status_code=409)
    first = store(name, job_id, payload)
    # Stored before released: a worker that takes the freed slot never outruns the result.
    provider.finished_at_provider(job_id)
    return JSONResponse({"stored": first, "duplicate": not first})


def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def create_app() -> Starlette:
    """The receiver: providers' callbacks, and the signed document links tuputech downloads from."""
    return Starlette(
        routes=[
            Route("/callbacks/{provider}/{job_id}", receive, methods=["POST"]),
            *links.routes(),
            Route("/health", health, methods=["GET"]),
        ]
    )
