"""Job identity and the small status record kept in Redis for progress and waiting.

The archive in S3 is the source of truth for "done"; the Redis record only makes
progress cheap to watch and lets ``submit`` remember a provider task id across a crash.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis

RECORD_TTL = 7 * 24 * 3600


def make_job_id(provider: str, source: str, content_id: str, options: dict[str, Any]) -> str:
    """Deterministic: the same document, provider and options always make the same job."""
    canonical = json.dumps(
        {"provider": provider, "source": source, "content": content_id, "options": options},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _key(job_id: str) -> str:
    return f"docpipe:job:{job_id}"


def record(client: redis.Redis, job_id: str, **fields: Any) -> None:
    """Merge fields into the job's record; ``None`` values are skipped."""
    mapping = {k: str(v) for k, v in fields.items() if v is not None}
    mapping["updated_at"] = str(time.time())
    pipe = client.pipeline()
    pipe.hset(_key(job_id), mapping=mapping)
    pipe.expire(_key(job_id), RECORD_TTL)
    pipe.execute()


def read(client: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(_key(job_id)).items()}


def states(client: redis.Redis, job_ids: list[str]) -> dict[str, str | None]:
    pipe = client.pipeline()
    for job_id in job_ids:
        pipe.hget(_key(job_id), "state")
    return {job_id: (v.decode() if v else None) for job_id, v in zip(job_ids, pipe.execute())}


def in_flight(client: redis.Redis, job_id: str, *, stale_after: float) -> bool:
    """A chain for this job is queued or running and has shown progress recently."""
    record = read(client, job_id)
    if record.get("state") not in ("queued", "staged", "submitted", "fetched"):
        return False
    return time.time() - float(record.get("updated_at", 0)) < stale_after


def forget(client: redis.Redis, job_id: str) -> None:
    client.delete(_key(job_id))
