"""Provider credentials (OAuth access tokens, JWT logins) fetched once and shared by every
worker through Redis.

Why shared: a fleet of workers that each log in is a login storm, and some providers lock
an account out after it. One worker refreshes under a Redis lock (single flight); the
others wait for the lock and then read what it stored. A failed refresh leaves a short
cool-down so that the fleet backs off together instead of retrying in a loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from pipeline.errors import DocpipeError, Permanent, RateLimited, RateWait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credential:
    value: str
    expires_at: float  # unix time

    def fresh(self, margin: float) -> bool:
        return time.time() < self.expires_at - margin


class SharedCredential:
    """A credential cached in Redis under ``key``; ``fetch`` obtains a new one and says how long it lives."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        fetch: Callable[[], tuple[str, float]],
        *,
        cooldown: float = 30.0,
        lock_timeout: float = 90.0,  # longer than a fetch can take (rate wait + HTTP timeouts)
    ) -> None:
        self._redis = client
        self._key = f"docpipe:cred:{key}"
        self._lock_key = f"docpipe:cred-lock:{key}"
        self._cooldown_key = f"docpipe:cred-cooldown:{key}"
        self._fetch = fetch
        self._cooldown = cooldown
        self._lock_timeout = lock_timeout

    def get(self) -> str:
        """A credential that is not about to expire, refreshing it if needed."""
        cached = self._read()
        if cached and cached.fresh(self._margin(cached)):
            return cached.value
        return self._refresh(stale=cached.value if cached else None)

    def invalidate(self, stale: str) -> str:
        """The provider rejected ``stale``: refresh unless another worker already has."""
        return self._refresh(stale=stale, force=True)

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _margin(cred: Credential) -> float:
        return 60.0 if cred.expires_at - time.time() > 600 else 5.0

    def _cool_down(self, exc: Exception, stale: str | None) -> None:
        """Remember the failure for every worker: none tries again before the cool-down ends.

        A refusal that retrying cannot fix (wrong credentials) is remembered as such, so the
        documents that need a login meanwhile fail with it at once instead of each trying a
        login of its own (which could lock the account out). The stale credential is dropped
        so that nobody spends a request on it.
        """
        permanent = isinstance(exc, DocpipeError) and not exc.retryable
        memo = {"permanent": permanent, "message": str(exc), "code": getattr(exc, "code", "auth_failed")}
        pipe = self._redis.pipeline()
        pipe.set(self._cooldown_key, json.dumps(memo), px=int(self._cooldown * 1000))
        if stale is not None:
            pipe.delete(self._key)
        pipe.execute()

    def _raise_if_cooling(self) -> None:
        raw, left_ms = self._redis.get(self._cooldown_key), self._redis.pttl(self._cooldown_key)
        if raw is None or not left_ms or left_ms <= 0:
            return
        memo = json.loads(raw)
        if memo.get("permanent"):
            raise Permanent(memo["message"], code=memo.get("code", "auth_failed"))
        raise RateLimited(
            f"credential refresh is cooling down after a failure ({left_ms / 1000:.0f}s left): {memo['message']}",
            code="auth_cooldown",
            retry_after=left_ms / 1000,
        )

    def _read(self) -> Credential | None:
        raw = self._redis.get(self._key)
        if raw is None:
            return None
        data = json.loads(raw)
        return Credential(data["value"], data["expires_at"])

    def _refresh(self, *, stale: str | None, force: bool = False) -> str:
        with self._redis.lock(self._lock_key, timeout=self._lock_timeout, blocking_timeout=self._lock_timeout + 5):
            cached = self._read()
            if cached is not None and cached.value != stale and cached.fresh(self._margin(cached) if not force else 0):
                return cached.value  # another worker refreshed while we waited for the lock
            self._raise_if_cooling()
            try:
                value, lifetime = self._fetch()
            except RateWait:
                raise  # our own limiter said "later": nothing failed, no cool-down
            except Exception as exc:
                self._cool_down(exc, stale)
                raise
            expires_at = time.time() + lifetime
            self._redis.set(
                self._key, json.dumps({"value": value, "expires_at": expires_at}), px=max(1000, int(lifetime * 1000))
            )
            log.info("refreshed shared credential %s (lifetime %.0fs)", self._key.rsplit(":", 1)[-1], lifetime)
            return value
