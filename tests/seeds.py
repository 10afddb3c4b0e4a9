"""Read the provider API documents in ../shared/seeds/ (the project's source of truth for wire shapes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

SEEDS = Path(os.environ.get("DOCPIPE_SEEDS_DIR", Path(__file__).resolve().parents[2] / "shared" / "seeds"))
BAIDU_SEED = SEEDS / "002_7802f48e2091c62b.txt"


def seed_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def between(text: str, start: str, end: str) -> str:
    """The text between two markers (exclusive)."""
    head = text.index(start) + len(start)
    return text[head : text.index(end, head)]


def json_between(text: str, start: str, end: str) -> dict:
    return json.loads(between(text, start, end).strip())
