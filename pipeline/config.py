"""Settings, read once per process from ``DOCPIPE_*`` environment variables.

Every provider base URL is a setting so the same code talks to the real service or to
its emulator. Secrets are ``SecretStr`` so that a settings object printed in a log or
an exception shows ``**********`` instead of the key.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DOCPIPE_", extra="ignore")

    # Infrastructure
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    staging_bucket: str = "docpipe-staging"
    results_bucket: str = "docpipe-results"
    multipart_threshold_mb: int = 8

    # Flow control shared by every provider
    limit_safety: float = Field(
        0.97,
        description="Fraction of each documented rate the limiter spends: the margin absorbs "
        "network jitter between our clock and the provider's window.",
    )
    max_inline_wait: float = Field(
        2.0, description="Longest wait for a rate token spent sleeping in the worker; longer waits re-schedule the task."
    )
    transient_retries: int = 5
    visibility_timeout: int = Field(
        300,
        description="Seconds Redis waits for an ack before handing a message to another worker (a killed "
        "worker's tasks come back after this). Every countdown is kept under a third of it.",
    )
    http_timeout: float = 30.0

    # Poll policy (await stage); a provider may override the first delay.
    poll_first_delay: float | None = Field(
        None, description="Seconds before the first poll; None uses the provider's own advice."
    )
    poll_base_delay: float = 2.0
    poll_max_delay: float = 60.0
    poll_multiplier: float = 1.6
    job_deadline: float = Field(3600.0, description="Seconds after submit before a document is failed as stuck.")

    # baidu
    baidu_base_url: str = "https://aip.baidubce.com"
    baidu_api_key: SecretStr = SecretStr("")
    baidu_secret_key: SecretStr = SecretStr("")
    baidu_classifier_id: str | None = None
    baidu_template_sign: str | None = "multiple_invoice"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests that change the environment call ``get_settings.cache_clear()``."""
    return Settings()
