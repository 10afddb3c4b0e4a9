"""The one shared description of each provider API: the seeds' own examples, verbatim.

``tests/contracts/<provider>/`` holds every request and response example of the provider's
seed (``../shared/seeds/``), copied as the seed shows it with only its placeholders filled,
plus ``*_from_table.json`` fixtures where the seed has a field table but no example.
``manifest.json`` says where each fixture comes from (seed, lines, placeholders) and what it
is. ``tests/test_contracts_verbatim.py`` proves the fixtures match the seeds.

The clients and the emulators share no code (DESIGN.md): both are tested against these
fixtures, so a misreading of a seed has to be made twice, independently, to go unnoticed.
Tests should compare *shapes* (``shape_mismatches``) rather than values: the values are the
seed's examples, not what a particular run returns.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any, Iterable

CONTRACTS = Path(__file__).resolve().parent
SEEDS = Path(os.environ.get("DOCPIPE_SEEDS_DIR", CONTRACTS.parents[2] / "shared" / "seeds"))

Shape = dict[str, "Shape"] | list["Shape"] | str


@cache
def _manifest() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads((CONTRACTS / "manifest.json").read_text(encoding="utf-8")))


def load(provider: str, file: str) -> Any:
    """A fixture: parsed JSON for ``.json`` (a fresh copy each call, so tests may mutate it), text for ``.txt``."""
    path = CONTRACTS / provider / file
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else text


def entries(provider: str | None = None, kind: str | None = None, endpoint: str | None = None) -> list[dict[str, Any]]:
    """Manifest entries, filtered: each names a fixture (``provider``, ``file``) and its seed origin.

    ``kind`` is request | response | callback | callback_reply; ``source`` tells an example copied
    verbatim ("example"), a transcription of pseudo-JSON ("example_transcribed") or a fixture built
    from a field table because the seed shows no example ("table") — weaker evidence of the wire shape.
    """
    return [
        dict(entry)
        for entry in _manifest()
        if (provider is None or entry["provider"] == provider)
        and (kind is None or entry["kind"] == kind)
        and (endpoint is None or entry["endpoint"] == endpoint)
    ]


def seed_lines(entry: dict[str, Any]) -> list[str]:
    """The seed lines an entry was copied from (``lines`` is 1-based and inclusive, as ``cat -n`` shows)."""
    first, last = entry["lines"]
    return (SEEDS / entry["seed"]).read_text(encoding="utf-8").splitlines()[first - 1 : last]


def _scalar(value: Any) -> str:
    # bool before int: True is an int in Python, never in JSON.
    if value is None:
        return "null"
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if isinstance(value, kind):
            return name
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def shape(value: Any) -> Shape:
    """The structure of a JSON value: dict -> {key: shape}, list -> its distinct element shapes, scalar -> type name.

    Two payloads with the same shape differ only in data, which is what a client or an emulator
    is allowed to vary; a different shape is a different reading of the seed.
    """
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        distinct: list[Shape] = []
        for item in value:
            if (item_shape := shape(item)) not in distinct:
                distinct.append(item_shape)
        return distinct
    return _scalar(value)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list):
        return "list"
    return _scalar(value)


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def shape_mismatches(actual: Any, expected: Any, *, maps: Iterable[str] = (), ignore_null: bool = True) -> list[str]:
    """Every structural difference of ``actual`` from the fixture ``expected``, one line per path.

    Paths are dotted keys with ``[]`` for list elements, e.g. ``words_result[].kv_result``. A path in
    ``maps`` names an object whose keys are data (baidu's ``single_key`` field names, tuputech's
    task ids in ``details``): there keys are not compared, every value is compared with the fixture's
    values, and the values' path is the map's path + ``.*`` (so a nested map is ``...combo_key.*[]``).
    A list element must match one of the fixture's element shapes; an empty fixture list or object
    in a map says nothing about its contents. ``null`` matches anything when ``ignore_null``, since
    the seeds show null for absent data (baidu's boxes); int and float match each other, because JSON
    has one number type (the idp example's ``confidence: 1`` is a confidence like any other).
    """
    return _compare(actual, expected, "", frozenset(maps), ignore_null)


def _compare(actual: Any, expected: Any, path: str, maps: frozenset[str], ignore_null: bool) -> list[str]:
    where = path or "$"
    got, want = _kind(actual), _kind(expected)
    if ignore_null and "null" in (got, want):
        return []
    if got != want and {got, want} != {"int", "float"}:
        return [f"{where}: expected {want}, got {got}"]
    if want == "list":
        return _best(actual, expected, f"{path}[]", maps, ignore_null)
    if want != "dict":
        return []
    if path in maps:
        return _best(list(actual.values()), list(expected.values()), _child(path, "*"), maps, ignore_null)
    problems = [f"{_child(path, key)}: missing" for key in expected if key not in actual]
    problems += [f"{_child(path, key)}: unexpected key" for key in actual if key not in expected]
    for key in expected:
        if key in actual:
            problems += _compare(actual[key], expected[key], _child(path, key), maps, ignore_null)
    return problems


def _best(actual: list[Any], expected: list[Any], path: str, maps: frozenset[str], ignore_null: bool) -> list[str]:
    """Compare each actual element with the closest fixture element (a list may mix shapes)."""
    if not expected:
        return []
    problems: list[str] = []
    for item in actual:
        candidates = [_compare(item, option, path, maps, ignore_null) for option in expected]
        best = min(candidates, key=len)
        problems += [p for p in best if p not in problems]
    return problems
