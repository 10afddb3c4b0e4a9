"""Settings, read once per process from ``DOCPIPE_*`` environment variables.

Every provider base URL is a setting so the same code talks to the real service or to
its emulator. Secrets are ``SecretStr`` so that a settings object printed in a log or
an exception shows ``**********`` instead of the key.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DOCPIPE_", extra="ignore")

    # Infrastructure
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for the broker, job records, limits and leases, e.g. redis://:password@host:6379/0 (a secret when it holds a password).",
    )
    redis_socket_timeout: float = Field(
        10.0, description="Seconds a Redis command may take: a Redis that vanished without closing the socket fails, not hangs."
    )
    redis_connect_timeout: float = Field(5.0, description="Seconds to open a Redis connection before the attempt counts as failed.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); none: AWS S3.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    aws_access_key_id: SecretStr | None = Field(None, description="S3 access key; none: boto3's own chain (instance role, ~/.aws).")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3 secret key.")
    staging_bucket: str = Field(
        "docpipe-staging", description="Work area: uploaded documents and fetched results before archival (`docpipe init` creates it)."
    )
    results_bucket: str = Field(
        "docpipe-results", description="The archive: <provider>/<job_id>/result.json (+ raw.json, ...) or error.json."
    )
    multipart_threshold_mb: int = Field(8, description="Uploads above this size go up in parts.")

    # Flow control shared by every provider
    limit_safety: float = Field(
        0.97,
        description="Fraction of each documented rate the limiter spends: the margin absorbs "
        "network jitter between our clock and the provider's window.",
    )
    rate_scale: float = Field(
        1.0,
        gt=0,
        description="Multiplies every request rate the limiter keeps (not in-flight limits, set on their own): for benchmarks "
        "against emulators whose limits are raised as much (time compressed). Leave it at 1 against real providers.",
    )
    global_limits: bool = Field(
        True, description="Off only for the benchmark's baseline, which measures Celery's per-worker rate_limit instead."
    )
    celery_rate_limits: dict[str, str] = Field(
        default_factory=dict,
        description='Per-worker Celery rate limits by task name, e.g. {"docpipe.baidu.submit": "2/s"} (baseline only).',
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
        "a waiter already in line takes a freed slot within milliseconds, and one that waited this long gives its "
        "thread back and is due again at once.",
    )
    lease_grace: float = Field(
        15.0,
        description="Seconds a concurrency lease lives until the provider confirms the submit (a dead worker's lease frees this fast).",
    )
    transient_retries: int = Field(
        5, description="Retries of a step after a transient provider failure (5xx, internal error) before the document fails."
    )
    retry_max_delay: float = Field(
        60.0, description="Longest wait before a step is tried again after a transient failure (the waits double from 1 s up to it)."
    )
    step_grace: float = Field(
        30.0,
        description="Seconds a step's message may be overdue, unclaimed, before the reconciler sends it again if its "
        "queue is empty or was read past it (it was lost).",
    )
    step_stall: float = Field(600.0, description="Seconds a step may run under a live worker before it counts as stuck and is re-driven.")
    backlog_grace: float = Field(
        600.0,
        description="Longest time between two looks at an unclaimed step waiting its turn behind a queue backlog (never "
        "taken for lost for waiting).",
    )
    heartbeat_every: float = Field(3.0, description="Seconds between two heartbeats of a worker process.")
    heartbeat_ttl: float = Field(
        15.0, description="Seconds of silence after which a worker counts as dead and the reconciler hands its jobs to others."
    )
    reconcile_every: float = Field(5.0, description="Seconds between two passes of the reconciler (each worker runs it, one at a time).")
    visibility_timeout: int = Field(
        300,
        description="Seconds Redis waits for an ack before handing a message to another worker (a killed "
        "worker's tasks come back after this). Every countdown is kept under a third of it.",
    )
    http_timeout: float = Field(30.0, description="Seconds a provider request may take.")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line, with job_id, provider and stage.")
    metrics_port: int = Field(
        0, description="First port a worker serves its Prometheus metrics on (each worker on a machine takes the next free one); 0: off."
    )

    # Poll policy (await stage); a provider may override the first delay.
    poll_policy: Literal["adaptive", "backoff"] = Field(
        "adaptive",
        description="adaptive: poll at multiples of each document's predicted processing time, learnt from the times seen "
        "(per provider, by size or pages where they predict it), backoff until enough are seen; backoff: the fixed ladder below.",
    )
    poll_call_budget: float = Field(1.45, description="Result calls per document the adaptive policy plans for (it then minimises the delay).")
    poll_learn_after: int = Field(10, description="Processing times seen before the adaptive policy replaces the backoff ladder.")
    poll_first_delay: float | None = Field(None, description="Seconds before the first poll; None uses the provider's own advice.")
    poll_base_delay: float = Field(2.0, description="Seconds between the first polls of a running task.")
    poll_max_delay: float = Field(60.0, description="Longest pause between two polls.")
    poll_multiplier: float = Field(1.6, description="Growth of the pause between polls.")
    job_deadline: float = Field(3600.0, description="Seconds after submit before a document is failed as stuck.")

    # baidu
    baidu_base_url: str = Field("https://aip.baidubce.com", description="Baidu AI platform (or its emulator).")
    baidu_api_key: SecretStr = Field(SecretStr(""), description="Baidu API key (client_id of the OAuth token request).")
    baidu_secret_key: SecretStr = Field(SecretStr(""), description="Baidu secret key (client_secret).")
    baidu_classifier_id: str | None = Field(None, description="iOCR classifier id (submit sends it, or the template sign).")
    baidu_template_sign: str | None = Field("multiple_invoice", description="iOCR template sign.")

    # idp (document-extraction platform)
    idp_base_url: str = Field("http://127.0.0.1:8002", description="The document-extraction platform (or its emulator).")
    idp_username: SecretStr = Field(SecretStr(""), description="idp login.")
    idp_password: SecretStr = Field(SecretStr(""), description="idp password.")
    idp_feature_type_id: int = Field(1, description="idp extraction feature sent with each task.")
    idp_language: str | None = Field(None, description="idp document language hint; none: the platform decides.")
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
    tuputech_base_url: str = Field("https://api.open.tuputech.com", description="Tuputech's API (or its emulator).")
    tuputech_secret_id: SecretStr = Field(SecretStr(""), description="Tuputech secret id (the account in the URL).")
    tuputech_private_key: SecretStr = Field(SecretStr(""), description="PEM of our RSA key: signs each submit.")
    tuputech_public_key: str = Field("", description="PEM of Tuputech's RSA key: verifies answers and callbacks.")
    tuputech_max_in_flight: int = Field(30, description="Tasks the account may have at Tuputech at once (the seed says 30).")
    tuputech_callback_rule: str | None = Field(
        None, description="Tuputech callbackRule (which results are called back); none: the service default."
    )
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
    callback_spool_dir: str = Field(
        "~/.docpipe/callback-spool",
        description="Where the receiver keeps verified callbacks while Redis refuses writes (drained when it accepts).",
    )
    callback_max_bytes: int = Field(16 * 1024 * 1024, description="Largest callback body the receiver reads.")
    link_outage_wait: float = Field(
        40.0,
        description="How long a provider's download of a document link waits out S3 being away before it is refused "
        "(tuputech fails a task whose download fails; the emulator gives a download 60 s).",
    )
    callback_replay_window: float = Field(
        900.0, description="A callback signed longer ago (or further ahead) than this is refused as a replay."
    )
    link_secret: SecretStr = Field(
        SecretStr(""),
        description="Key of the document links' signatures; empty: one random key per deployment, kept in Redis.",
    )


def secrets_dir() -> str | None:
    """Where keys and passwords may come from as files (compose secrets): ``DOCPIPE_SECRETS_DIR``, else
    ``/run/secrets`` when it exists. A file is named as the variable, e.g. ``docpipe_baidu_api_key``;
    a variable set in the environment wins over a file."""
    chosen = os.environ.get("DOCPIPE_SECRETS_DIR") or ("/run/secrets" if os.path.isdir("/run/secrets") else None)
    return chosen if chosen and os.path.isdir(chosen) else None


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests that change the environment call ``get_settings.cache_clear()``."""
    return Settings(_secrets_dir=secrets_dir())


def settings_table() -> str:
    """The README's table of every setting, made from the model so that it cannot drift from it
    (``python -m pipeline.config`` prints it; a test compares it with the README)."""
    rows = ["| variable | default | what it is |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            shown = "(secret)" if default.get_secret_value() else "(secret, empty)"
        elif default is None:
            shown = "(none)"
        else:
            shown = f"`{default}`" if default not in ("", {}) else "(empty)"
        about = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `DOCPIPE_{name.upper()}` | {shown} | {about} |")
    return "\n".join(rows) + "\n"
