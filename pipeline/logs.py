"""Log lines that name their document: job id, provider and stage on every line a step writes.

``DOCPIPE_LOG_FORMAT=json`` gives one JSON object per line (python-json-logger), for log
pipelines that index fields; the default stays human. The job's fields come from a context
variable that ``pipeline.driver`` sets around each step, so a line logged deep in a provider
module carries them without being passed down.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter

_step: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("docpipe_step", default=None)
FIELDS = ("job_id", "provider", "stage")


@contextmanager
def step_context(job_id: str, provider: str, stage: str) -> Iterator[None]:
    token = _step.set({"job_id": job_id, "provider": provider, "stage": stage})
    try:
        yield
    finally:
        _step.reset(token)


class StepFilter(logging.Filter):
    """Adds the current step's job id, provider and stage to every record (empty outside a step)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _step.get() or {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, current.get(name, ""))
        return True


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(
            "{asctime}{levelname}{name}{message}{job_id}{provider}{stage}",
            style="{",
            rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
        )
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def configure(fmt: str, logger: logging.Logger | None = None, level: int | None = None) -> None:
    """Put docpipe's formatter and filter on ``logger``'s handlers (the root logger by default),
    adding a stderr handler when it has none."""
    target = logger or logging.getLogger()
    if not target.handlers:
        target.addHandler(logging.StreamHandler())
    if level is not None:
        target.setLevel(level)
    for handler in target.handlers:
        handler.setFormatter(formatter(fmt))
        if not any(isinstance(f, StepFilter) for f in handler.filters):
            handler.addFilter(StepFilter())
