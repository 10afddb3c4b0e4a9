"""The emulators referee the client, so they must read the seeds on their own.

When the emulators imported the client's wire models, a tuputech callback shaped exactly
like the seed's own example failed every document while every test passed: both sides
shared one misreading. This test keeps ``emulators/`` from importing ``pipeline``,
``workers`` or ``tests`` again, however the import is spelled.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EMULATORS = Path(__file__).resolve().parents[1] / "emulators"
FORBIDDEN = frozenset({"pipeline", "workers", "tests"})


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    """``line: module`` for each import in ``source`` whose top-level package is forbidden.

    ``import_module("pipeline...")`` and ``__import__`` with a literal name count too:
    a dynamic import is still an import.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # A relative import (level > 0) stays inside the emulators package: it cannot reach them.
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            names = [first.value] if isinstance(first, ast.Constant) and isinstance(first.value, str) else []
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def emulator_sources() -> list[Path]:
    return sorted(EMULATORS.rglob("*.py"))


def test_the_emulator_package_is_where_the_test_looks() -> None:
    names = {path.name for path in emulator_sources()}
    assert {"__main__.py", "common.py", "baidu.py", "idp.py", "tuputech.py"} <= names


@pytest.mark.parametrize("path", emulator_sources(), ids=lambda path: str(path.relative_to(EMULATORS)))
def test_emulator_module_imports_nothing_of_the_client(path: Path) -> None:
    offending = forbidden_imports(path.read_text(encoding="utf-8"), str(path))
    assert not offending, f"{path.name} imports the client side: {offending}"


@pytest.mark.parametrize(
    "source",
    [
        "import pipeline",
        "import pipeline.providers.baidu as b",
        "import json, workers.app",
        "from pipeline.sniff import sniff_format",
        "from tests import seeds",
        "from pipeline import sniff",
        "def f():\n    from workers import app\n",
        "from importlib import import_module\nimport_module('pipeline.providers.tuputech_wire')",
        "__import__('pipeline')",
    ],
)
def test_the_check_catches_every_spelling(source: str) -> None:
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import pipelines",
        "from emulators.common import Emulator",
        "from . import common",
        "from .pipeline import x",  # relative: inside emulators/, whatever its name
        "import_module(f'emulators.{name}')",
        "text = 'pipeline'",
    ],
)
def test_the_check_leaves_the_emulators_own_imports_alone(source: str) -> None:
    assert forbidden_imports(source) == []
