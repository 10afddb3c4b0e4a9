"""Settings, read once per process from ``DOCPIPE_*`` environment variables.

Every provider base URL is a setting so the same code talks to the real service or to
its emulator. Secrets are ``SecretStr`` so that a settings object printed in a log or
an exception shows ``**********`` instead of the key.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DOCPIPE_", extra="ignore")

    # Infrastructure
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_socket_timeout: float = Field(
        10.0, description="Seconds a Redis command may take: a Redis that vanished without closing the socket fails, not hangs."
    )
    redis_connect_timeout: float = 5.0
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
    global_limits: bool = Field(
        True, description="Off only for the benchmark's baseline, which measures Celery's per-worker rate_limit instead."
    )
    celery_rate_limits: dict[str, str] = Field(
        default_factory=dict, description='Per-worker Celery rate limits by task name, e.g. {"docpipe.baidu.submit": "2/s"} (baseline only).'
    )
    max_inline_wait: float = Field(
        2.0, description="Longest wait for a rate token spent sleeping in the worker; longer waits re-schedule the task."
    )
    poll_inline_wait: float = Field(
        0.25,
        description="Longest wait for a poll's rate token in the worker thread, by one thread per process at a time; "
        "the other refused polls re-schedule themselves to just after the token they were told of. The one waiter "
        "takes each freed slot at once; the rest of the threads stay free for submits.",
    )
    lease_max_wait: float = Field(
        10.0,
        description="Longest wait for a concurrency slot in the worker thread (blocked on Redis, not the CPU); "
        "a waiter already in line takes a freed slot within milliseconds.",
    )
    lease_grace: float = Field(
        15.0, description="Seconds a concurrency lease lives until the provider confirms the submit (a dead worker's lease frees this fast)."
    )
    transient_retries: int = 5
    step_grace: float = Field(
        30.0,
        description="Seconds a step's message may be overdue, unclaimed with its queue empty, before the reconciler "
        "sends it again (it was lost).",
    )
    step_stall: float = Field(600.0, description="Seconds a step may run under a live worker before it counts as stuck and is re-driven.")
    backlog_grace: float = Field(
        600.0, description="Seconds an unclaimed step may wait behind a queue backlog before it is taken for lost anyway."
    )
    reconcile_every: float = Field(5.0, description="Seconds between two passes of the reconciler (each worker runs it, one at a time).")
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

    # idp (document-extraction platform)
    idp_base_url: str = "http://127.0.0.1:8002"
    idp_username: SecretStr = SecretStr("")
    idp_password: SecretStr = SecretStr("")
    idp_feature_type_id: int = 1
    idp_language: str | None = None
    idp_login_cooldown: float = Field(60.0, description="Seconds every worker waits after a failed or locked-out login.")
    idp_api_prefix: str = Field(
        "/api",
        description="Path prefix of the extraction API. The seed's URL table has /api, its examples do not: "
        "a 404 on the prefixed path is tried once without it, and the answer is remembered.",
    )
    idp_login_encoding: Literal["auto", "base64", "plain"] = Field(
        "auto",
        description="How login values travel: the seed's python example sends base64, its curl example plain text; "
        "auto tries base64, then plain once when refused as a wrong password.",
    )

    # tuputech (document moderation, results by signed callback)
    tuputech_base_url: str = "https://api.open.tuputech.com"
    tuputech_secret_id: SecretStr = SecretStr("")
    tuputech_private_key: SecretStr = SecretStr("")  # PEM of our RSA key: signs each submit
    tuputech_public_key: str = ""  # PEM of Tuputech's key: verifies answers and callbacks
    tuputech_max_in_flight: int = 30
    tuputech_callback_rule: str | None = None
    tuputech_callback_window: float = Field(
        60.0,
        description="Seconds over which tuputech retries a callback we did not take: 5 s timeout, 3 retries, "
        "and pauses the seed does not give.",
    )
    tuputech_expected_processing: float = Field(
        120.0, description="The longest processing assumed until one is seen (the seed gives no figure)."
    )
    tuputech_page_index_base: Literal[0, 1] | None = Field(
        None,
        description="Where the callback's page indexes start. The seed's table says 1, its example shows 0; "
        "None tells them apart from the callback itself where it can, and follows the example where it cannot.",
    )
    callback_base_url: str = Field(
        "http://127.0.0.1:8090",
        description="The receiver (docpipe callbacks) as the providers reach it: callbacks arrive there, and "
        "tuputech downloads documents from its signed links.",
    )
    callback_max_bytes: int = Field(16 * 1024 * 1024, description="Largest callback body the receiver reads.")
    callback_replay_window: float = Field(
        900.0, description="A callback signed longer ago (or further ahead) than this is refused as a replay."
    )
    link_secret: SecretStr = Field(
        SecretStr(""),
        description="Key of the document links' signatures; empty: one random key per deployment, kept in Redis.",
    )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests that change the environment call ``get_settings.cache_clear()``."""
    return Settings()
