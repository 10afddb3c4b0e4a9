"""Celery app and thin tasks; the logic they call lives in ``pipeline``."""

from workers.app import app

__all__ = ["app"]
