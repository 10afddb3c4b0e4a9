"""Checks made once before a batch, so that a deployment problem is one clear message, not one per document.

An unreachable Redis, a missing bucket or absent provider credentials would otherwise fail
every document of a batch the same way, each with its own error. These checks name the
setting to fix; the CLI turns a ``ConfigError`` into one line and exit code 2.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
from botocore.exceptions import BotoCoreError, ClientError

from pipeline import storage
from pipeline.config import Settings, get_settings


class ConfigError(RuntimeError):
    """The deployment, not a document, is wrong: what is wrong and which setting fixes it."""


# The settings each provider cannot work without (the env var is DOCPIPE_ + the upper-cased name).
REQUIRED_CREDENTIALS: dict[str, tuple[str, ...]] = {
    "baidu": ("baidu_api_key", "baidu_secret_key"),
    "idp": ("idp_username", "idp_password"),
    "tuputech": ("tuputech_secret_id", "tuputech_private_key", "tuputech_public_key"),
}


def redacted_url(url: str) -> str:
    """A URL fit for a message: its password (Redis URLs carry one) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}{':' + str(parts.port) if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc))


def check_redis(client: redis.Redis, settings: Settings | None = None) -> None:
    s = settings or get_settings()
    try:
        client.ping()
    except redis.AuthenticationError:
        raise ConfigError(f"Redis at {redacted_url(s.redis_url)} refused the password (DOCPIPE_REDIS_URL)") from None
    except redis.RedisError as exc:
        raise ConfigError(f"cannot reach Redis at {redacted_url(s.redis_url)} ({type(exc).__name__}); check DOCPIPE_REDIS_URL") from None


def check_bucket(bucket: str, what: str, settings: Settings | None = None) -> None:
    s = settings or get_settings()
    where = s.s3_endpoint_url or "AWS S3"
    try:
        storage.s3_client(s).head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            hint = " (run `docpipe init` to create it)" if what != "source" else ""
            raise ConfigError(f"the {what} bucket {bucket!r} does not exist at {where}{hint}") from None
        if code in ("403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
            raise ConfigError(f"S3 at {where} refused access to bucket {bucket!r} ({code}); check DOCPIPE_AWS_* credentials") from None
        raise ConfigError(f"S3 at {where} answered {code or 'an error'} for bucket {bucket!r}") from None
    except BotoCoreError as exc:
        raise ConfigError(f"cannot reach S3 at {where} ({type(exc).__name__}); check DOCPIPE_S3_ENDPOINT_URL") from None


def check_credentials(provider: str, settings: Settings | None = None) -> None:
    s = settings or get_settings()
    missing = []
    for name in REQUIRED_CREDENTIALS.get(provider, ()):
        value = getattr(s, name)
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        if not text:
            missing.append(f"DOCPIPE_{name.upper()}")
    if missing:
        raise ConfigError(f"{provider}: missing credentials {', '.join(missing)} (environment or secrets files)")


def check_for_batch(provider: str, source_bucket: str | None = None) -> None:
    """Everything a batch needs before its first document: Redis, both buckets, the source bucket, credentials."""
    from pipeline.runtime import get_runtime

    settings = get_settings()
    check_credentials(provider, settings)
    check_redis(get_runtime().redis, settings)
    check_bucket(settings.staging_bucket, "staging", settings)
    check_bucket(settings.results_bucket, "results", settings)
    if source_bucket:
        check_bucket(source_bucket, "source", settings)
