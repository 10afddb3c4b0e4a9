"""The models every provider shares: the job that travels down the chain, the
normalized result that lands in ``result.json``, and the error that lands in ``error.json``.

The job is what Celery carries between tasks (JSON, visible in Flower), so it holds
identifiers and facts about the document, never a secret and never a presigned URL.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class DocumentInfo(BaseModel):
    """What ``stage`` learned about the bytes, without trusting the file name."""

    bucket: str
    key: str
    filename: str
    size: int
    format: str  # pdf, png, jpeg, bmp, ofd, ...
    etag: str | None = None
    pages: int | None = None
    width: int | None = None
    height: int | None = None
    # Its size as the provider's request carries it, where ``check`` measured it (baidu: base64,
    # then url-encoded): the streamed submit sends it with a Content-Length.
    encoded_size: int | None = None


class Job(BaseModel):
    """One document's journey; each task returns an updated copy for the next one."""

    job_id: str
    provider: str
    source: str  # what the user gave: a local path or an s3:// URI
    location: str  # s3:// URI of the bytes the workers read (the staging copy of a local file)
    source_etag: str | None = None  # the version of an s3:// source the job was made from: no other is read
    # Whether enqueue saw that the archive does not hold the document yet: a document enqueued
    # from a listing was not looked up one by one, and its stage step asks the archive first.
    archive_checked: bool = True
    options: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    document: DocumentInfo | None = None
    provider_task_id: str | None = None
    submitted_at: float | None = None
    provider_status: str | None = None  # the provider's last word on the task, as it said it
    polls: int = 0
    last_polled_at: float | None = None  # when a poll last found the task not done (bounds its processing time)
    poll_asked_for: float | None = None  # when the next poll was scheduled to run (how late polls run is learnt from it)
    rate_turn: float | None = None  # its place in the queue for a submit's send time, once refused one (``RateLimiter.acquire``)
    answer_kept: bool = False  # the poll's answer waits as the archive's raw.json: fetch reads it there, not from the provider
    parked: bool = False  # the poll that found it done carried the result, and it is in the work area already
    attempts: int = 0  # transient failures of the current stage so far

    def label(self) -> str:
        """How log lines and errors name the document."""
        return document_label(self.provider, self.job_id, self.source)


def document_label(provider: str, job_id: str, source: str) -> str:
    """How docpipe names a document everywhere (logs, errors, Flower): ``provider/job_id (source)``."""
    return f"{provider}/{job_id} ({source})"


class ExtractedField(BaseModel):
    """One extracted field. ``group``/``row`` place combo/table fields (baidu combo_key, idp relation groups)."""

    name: str
    value: str
    confidence: float | None = None
    page: int | None = None
    box: list[list[float]] | None = None
    group: str | None = None
    row: int | None = None


class PageText(BaseModel):
    number: int
    text: str


class Moderation(BaseModel):
    suggestion: Literal["pass", "reject", "review"]
    risk_types: list[str] = Field(default_factory=list)
    pages: list[int] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list)


class NormalizedResult(BaseModel):
    """The one result shape every provider fills: fields, page texts, moderation verdict."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    provider: str
    source: str
    document: DocumentInfo
    provider_task_id: str | None = None
    status: Literal["succeeded"] = "succeeded"
    doc_type: str | None = None
    fields: list[ExtractedField] = Field(default_factory=list)
    pages: list[PageText] = Field(default_factory=list)
    moderation: Moderation | None = None
    artifacts: list[str] = Field(default_factory=list)
    submitted_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)

    def field(self, name: str) -> str | None:
        """First value of a field by name, for the common case of one value per key."""
        return next((f.value for f in self.fields if f.name == name), None)


class JobError(BaseModel):
    """What ``error.json`` says: which stage, which code, and whether retrying could help."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    provider: str
    source: str
    stage: Literal["stage", "submit", "await", "fetch", "archive"]
    code: str
    message: str
    retryable: bool
    provider_code: str | None = None
    provider_message: str | None = None
    provider_task_id: str | None = None
    failed_at: datetime = Field(default_factory=utcnow)

    def reason(self) -> str:
        """How failures are grouped in a batch's status and the metrics: ``stage:code[:provider code]``."""
        return failure_reason(self.stage, self.code, self.provider_code)


def failure_reason(stage: str, code: str, provider_code: str | None = None) -> str:
    return f"{stage}:{code}" + (f":{provider_code}" if provider_code else "")
