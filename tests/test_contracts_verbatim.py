"""The contract fixtures in tests/contracts/ are the seeds' own examples, not our reading of them.

Each check re-derives a fixture from the seed lines the manifest names, independently of how the
fixture was written: examples are re-parsed after substituting the manifest's placeholders and must
equal the fixture including key order; transcriptions are checked key by key against the verbatim
text; table-derived fixtures must carry exactly the fields of the seed's table rows, in table order,
with values of the table's types. Nothing here imports pipeline/ or emulators/.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from tests.contracts import CONTRACTS, SEEDS, entries, load, seed_lines, shape, shape_mismatches

SEED_OF = {"idp": "000_042f2eb730337316.txt", "tuputech": "001_54c61bc8ed8bafae.txt", "baidu": "002_7802f48e2091c62b.txt"}
KINDS = {"request", "response", "callback", "callback_reply"}
SOURCES = {"example", "table", "example_transcribed"}
SYNTAXES = {"json", "python", "python_assign", "curl_data", "curl_query", "curl_form", "text", "pseudo_json", "table"}
FIELDS = {"provider", "file", "seed", "lines", "kind", "endpoint", "case", "source", "placeholders", "note", "syntax"}

ALL = entries()


def by_source(*sources: str) -> list[Any]:
    return [pytest.param(e, id=f"{e['provider']}/{e['file']}") for e in ALL if e["source"] in sources]


def ordered(value: Any) -> Any:
    """A comparable form that keeps key order and JSON types (True is not 1, 1 is not 1.0); tuples are lists."""
    if isinstance(value, dict):
        return ("object", [(key, ordered(item)) for key, item in value.items()])
    if isinstance(value, (list, tuple)):
        return ("array", [ordered(item) for item in value])
    return (type(value).__name__, value)


def strict_json(text: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
        return dict(pairs)

    return json.loads(text, object_pairs_hook=no_duplicates)


def fill_text(text: str, placeholders: dict[str, Any]) -> str:
    """Substitute placeholders that sit inside string literals: raw text, which must not need escaping."""
    for key, value in placeholders.items():
        assert isinstance(value, str) and not set(value) & {'"', "'", "\\", "\n"}, f"{key!r} -> {value!r} cannot go into a string raw"
        text = text.replace(key, value)
    return text


# -- re-deriving each syntax from the seed -------------------------------------------------------


def _literal_or_placeholder(node: ast.expr, source: str, found: dict[str, ast.expr]) -> None:
    """Walk a python literal; every non-literal expression is recorded by its source text (it must be a placeholder)."""
    if isinstance(node, ast.Constant):
        return
    if isinstance(node, ast.Dict):
        for part in [*node.keys, *node.values]:
            assert part is not None, "dict unpacking is not a literal"
            _literal_or_placeholder(part, source, found)
    elif isinstance(node, (ast.List, ast.Tuple)):
        for part in node.elts:
            _literal_or_placeholder(part, source, found)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        for keyword in node.keywords:
            _literal_or_placeholder(keyword.value, source, found)
    else:
        segment = ast.get_source_segment(source, node)
        assert segment is not None
        found[segment] = node


def python_value(lines: list[str], placeholders: dict[str, Any], *, keep_name: bool) -> Any:
    """``name = <literal>`` from a python example, placeholders substituted, then ``ast.literal_eval``.

    A placeholder that is a python expression (``file_base64``, ``os.path.basename(file_path)``) is
    replaced by the literal of its value; one inside a string (``{jwt token}``) is replaced as text.
    ``dict(k=v, ...)`` is read as the dict literal it builds.
    """
    source = textwrap.dedent("\n".join(lines)).strip()
    (statement,) = ast.parse(source).body
    assert isinstance(statement, ast.Assign) and len(statement.targets) == 1
    target = statement.targets[0]
    assert isinstance(target, ast.Name)
    expressions: dict[str, ast.expr] = {}
    _literal_or_placeholder(statement.value, source, expressions)
    unknown = set(expressions) - set(placeholders)
    assert not unknown, f"expressions with no placeholder value in the manifest: {unknown}"
    in_strings = {key: value for key, value in placeholders.items() if key not in expressions}
    for key in expressions:
        source = source.replace(key, repr(placeholders[key]))
    source = fill_text(source, in_strings)
    value_node = ast.parse(source).body[0].value  # type: ignore[attr-defined]
    if isinstance(value_node, ast.Call):  # dict(k=v, ...)
        value: Any = {keyword.arg: ast.literal_eval(keyword.value) for keyword in value_node.keywords}
    else:
        value = ast.literal_eval(value_node)
    return {target.id: value} if keep_name else value


def curl_data(lines: list[str], placeholders: dict[str, Any]) -> Any:
    """The JSON after ``-d '...'`` (the copy may wrap it over lines)."""
    match = re.search(r"-d '([^']*)'", "\n".join(lines))
    assert match, "no -d '...' in the lines"
    return strict_json(fill_text(match.group(1), placeholders))


def curl_query(lines: list[str], placeholders: dict[str, Any]) -> Any:
    """The query string of a quoted curl URL, as wire strings; the copy wrapped it mid-word, so lines are joined stripped."""
    joined = fill_text("".join(line.strip() for line in lines), placeholders)
    match = re.search(r'"[^"?]*\?([^"]*)"', joined)
    assert match, "no quoted URL with a query string in the lines"
    pairs = parse_qsl(match.group(1), keep_blank_values=True, strict_parsing=True)
    assert len({key for key, _ in pairs}) == len(pairs), "a repeated query parameter would not fit a JSON object"
    return dict(pairs)


def curl_form(lines: list[str], placeholders: dict[str, Any]) -> Any:
    """``-F "field=@file"`` parts as [field, file name] pairs."""
    parts = re.findall(r'-F "([^"=]+)=@([^"]+)"', fill_text("\n".join(lines), placeholders))
    assert parts, "no -F part in the lines"
    return [list(part) for part in parts]


def derive(entry: dict[str, Any]) -> Any:
    lines, placeholders, syntax = seed_lines(entry), entry["placeholders"], entry["syntax"]
    if syntax == "json":
        return strict_json(fill_text("\n".join(lines), placeholders))
    if syntax in ("python", "python_assign"):
        return python_value(lines, placeholders, keep_name=syntax == "python_assign")
    if syntax == "curl_data":
        return curl_data(lines, placeholders)
    if syntax == "curl_query":
        return curl_query(lines, placeholders)
    if syntax == "curl_form":
        return curl_form(lines, placeholders)
    if syntax == "text":
        return fill_text("\n".join(lines), placeholders)
    raise AssertionError(f"no verbatim reading for syntax {syntax!r}")


def same_text(actual: str, expected: str) -> bool:
    """Equal line by line, ignoring trailing whitespace (the copy left some) and a final newline."""
    return [line.rstrip() for line in actual.rstrip("\n").split("\n")] == [line.rstrip() for line in expected.rstrip("\n").split("\n")]


# -- the manifest ---------------------------------------------------------------------------------


def test_every_fixture_has_one_manifest_entry_and_every_entry_a_fixture():
    on_disk = {
        f"{path.parent.name}/{path.name}"
        for path in CONTRACTS.glob("*/*")
        if path.is_file() and path.parent.name != "__pycache__"
    }
    listed = [f"{e['provider']}/{e['file']}" for e in ALL]
    assert len(listed) == len(set(listed)), "a fixture is listed twice"
    assert on_disk == set(listed)


@pytest.mark.parametrize("entry", by_source(*SOURCES))
def test_manifest_entry_is_well_formed(entry):
    assert set(entry) == FIELDS
    assert entry["seed"] == SEED_OF[entry["provider"]]
    assert entry["kind"] in KINDS and entry["source"] in SOURCES and entry["syntax"] in SYNTAXES
    assert (entry["source"] == "table") == (entry["syntax"] == "table") == entry["file"].endswith("_from_table.json")
    assert isinstance(entry["placeholders"], dict) and isinstance(entry["endpoint"], str) and isinstance(entry["case"], str)
    assert isinstance(entry["note"], str) and entry["note"].strip() and "\n" not in entry["note"]
    first, last = entry["lines"]
    total = len((SEEDS / entry["seed"]).read_text(encoding="utf-8").splitlines())
    assert 1 <= first <= last <= total
    assert seed_lines(entry)[0].strip() and seed_lines(entry)[-1].strip(), "the range starts or ends on a blank line"


def test_manifest_covers_every_provider_and_each_table_fixture_says_so():
    assert {e["provider"] for e in ALL} == set(SEED_OF)
    for entry in ALL:
        if entry["source"] == "table":
            assert entry["note"].startswith("TABLE-DERIVED"), entry["file"]


@pytest.mark.parametrize("entry", by_source(*SOURCES))
def test_each_placeholder_occurs_in_the_seed_lines(entry):
    text = "\n".join(seed_lines(entry))
    for placeholder in entry["placeholders"]:
        assert placeholder in text, f"{placeholder!r} is not in {entry['seed']} lines {entry['lines']}"


# -- examples: verbatim ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", by_source("example"))
def test_example_fixture_equals_the_seed_example(entry):
    fixture = load(entry["provider"], entry["file"])
    derived = derive(entry)
    if entry["syntax"] == "text":
        assert same_text(fixture, derived)
    else:
        assert ordered(fixture) == ordered(derived)
        for value in entry["placeholders"].values():  # a placeholder value the fixture does not use is a stale manifest
            assert value in json.dumps(fixture, ensure_ascii=False)


# -- transcriptions ------------------------------------------------------------------------------

QUOTED_KEY = re.compile(r'"([A-Za-z_][A-Za-z0-9_]*)"\s*:')
BARE_KEY = re.compile(r"^\s*\[?([A-Za-z_][A-Za-z0-9_]*):\s")
KEY_AND_REST = re.compile(r'^\s*\[?"?([A-Za-z_][A-Za-z0-9_]*)"?\s*:\s*(.*)$')
CONTAINER = object()


def text_keys(text: str) -> list[str]:
    keys: list[str] = []
    for line in text.splitlines():
        bare = BARE_KEY.match(line)
        keys += [bare.group(1)] if bare else QUOTED_KEY.findall(line)
    return keys


def key_value_preorder(value: Any) -> list[tuple[str, Any]]:
    """Every (key, value) of a JSON value in document order, parents before children."""
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((key, item))
            out += key_value_preorder(item)
    elif isinstance(value, list):
        for item in value:
            out += key_value_preorder(item)
    return out


def text_key_values(text: str, placeholders: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, what the line says of its value) for each key line of the pseudo-JSON: a literal, a filled placeholder, or CONTAINER."""
    out: list[tuple[str, Any]] = []
    for line in text.splitlines():
        match = KEY_AND_REST.match(line)
        if not match:
            continue
        key, rest = match.groups()
        rest = rest.strip()
        if rest.startswith('"#'):  # a placeholder, or a comment saying what the next lines hold
            out.append((key, placeholders[rest] if rest in placeholders else CONTAINER))
            continue
        literal = rest.split("#", 1)[0].strip().rstrip(",").strip()
        if literal in ("", "[", "{", "[{"):
            out.append((key, CONTAINER))
        else:
            out.append((key, json.loads(literal)))
    return out


@pytest.mark.parametrize("entry", by_source("example_transcribed"))
def test_transcription_keeps_the_verbatim_text_and_every_key(entry):
    verbatim = load(entry["provider"], str(Path(entry["file"]).with_suffix(".txt")))
    assert same_text(verbatim, "\n".join(seed_lines(entry)))

    transcription = load(entry["provider"], entry["file"])
    pairs = key_value_preorder(transcription)
    assert set(text_keys(verbatim)) <= {key for key, _ in pairs}
    # Same keys in the same order and nesting: the text's key sequence is the JSON's pre-order.
    assert text_keys(verbatim) == [key for key, _ in pairs]

    said = text_key_values(verbatim, entry["placeholders"])
    assert [key for key, _ in said] == [key for key, _ in pairs]
    for (key, expected), (_, actual) in zip(said, pairs):
        if expected is CONTAINER:
            assert isinstance(actual, (list, dict)), key
        else:
            assert ordered(actual) == ordered(expected), key
    used = {rest for line in verbatim.splitlines() if (m := KEY_AND_REST.match(line)) and (rest := m.group(2).strip()) in entry["placeholders"]}
    assert used == set(entry["placeholders"])


# -- table-derived fixtures ----------------------------------------------------------------------

HEADING = re.compile(r"^(\S+) 字段详情$")
TYPES: dict[str, tuple[type, ...]] = {
    "Integer": (int,), "Int": (int,), "Number": (int, float), "String": (str,), "Boolean": (bool,), "Object": (dict,),
}


def table_rows(lines: list[str]) -> list[tuple[str, str, str]]:
    """(object path, field name, type) for each field row between the lines: idp's tab tables, tuputech's pipe tables.

    A "<path> 字段详情" heading moves the rows that follow to that object (``items[*]``, ``item.shortcut[*]``);
    tables whose header is not ``name``/``参数名称`` (the status tables) list values, not fields.
    """
    rows: list[tuple[str, str, str]] = []
    path, columns = "", None
    for line in lines:
        if heading := HEADING.match(line.strip()):
            path, columns = heading.group(1), None
        elif "\t" in line:
            cells = [re.sub(r"</?code>", "", cell).strip() for cell in line.split("\t")]
            if cells[:2] == ["name", "required"]:  # a header; a row may be a field called "name"
                columns = cells
            elif cells[0] == "message参数说明":
                columns = None
            elif columns:
                rows.append((path, cells[0], cells[columns.index("type")] if "type" in columns else ""))
        elif " | " in line:
            cells = [cell.strip() for cell in line.split("|")]
            if cells[0] == "参数名称":
                columns = cells
            elif columns and not cells[0].startswith("---"):
                rows.append((path, cells[0], cells[columns.index("类型")]))
        elif not line.strip():
            columns = None
    return rows


def objects_at(value: Any, path: str) -> list[Any]:
    found = [value]
    for part in filter(None, path.split(".")):
        name, each = (part[:-3], True) if part.endswith("[*]") else (part, False)
        found = [obj[name] for obj in found]
        if each:
            found = [item for items in found for item in items]
    return found


def type_ok(value: Any, declared: str) -> bool:
    if not declared:
        return True
    if declared.startswith("Array"):
        return isinstance(value, list)
    kinds = TYPES[declared]
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


@pytest.mark.parametrize("entry", by_source("table"))
def test_table_fixture_has_every_field_of_the_table_rows(entry):
    rows = table_rows(seed_lines(entry))
    assert rows, "no field rows in the lines"
    fixture = load(entry["provider"], entry["file"])
    for path in dict.fromkeys(p for p, _, _ in rows):
        fields = [name for p, name, _ in rows if p == path]
        objects = objects_at(fixture, path)
        assert objects, f"no object at {path!r}"
        for obj in objects:
            assert list(obj) == fields, f"{path or '$'}: keys are not the table's fields in table order"
    for path, name, declared in rows:
        for obj in objects_at(fixture, path):
            assert type_ok(obj[name], declared), f"{path}.{name}: {obj[name]!r} is not {declared}"


def test_table_fixtures_embed_the_examples_unchanged():
    assert load("idp", "result_response_from_table.json")["item"]["result"] == load("idp", "result_example.json")
    for envelope, example in (("submit_response_envelope_from_table.json", "submit_response.json"), ("callback_envelope_from_table.json", "callback.json")):
        assert ordered(strict_json(load("tuputech", envelope)["json"])) == ordered(load("tuputech", example))


# -- the shape helpers ----------------------------------------------------------------------------


def test_shape_describes_structure_not_data():
    assert shape({"a": [1, 2, {"b": None}], "c": True, "d": 1.5, "e": "x"}) == {"a": ["int", {"b": "null"}], "c": "bool", "d": "float", "e": "str"}
    running = load("baidu", "get_result_response_running.json")
    assert shape(running)["task_result"]["duration"] == "int" and shape(running)["words_result"] == "null"


def test_every_json_fixture_matches_its_own_shape():
    for entry in ALL:
        if entry["file"].endswith(".json"):
            value = load(entry["provider"], entry["file"])
            assert shape_mismatches(value, value) == [], entry["file"]


def test_shape_mismatches_reports_by_path():
    success = load("baidu", "get_result_response_success.json")
    maps = ("words_result[].kv_result.single_key", "words_result[].kv_result.combo_key", "words_result[].kv_result.combo_key.*[]")
    other = load("baidu", "get_result_response_success.json")
    kv = other["words_result"][0]["kv_result"]
    kv["single_key"] = {"姓名": [{"words": "张三", "location": {"box": [[1, 2], [3, 4], [5, 6], [7, 8]], "cbox": [1, 2, 3, 4]}}]}
    kv["combo_key"] = {"明细": [{"金额": {"words": "1", "location": {"box": None, "cbox": None}}}]}
    assert shape_mismatches(other, success, maps=maps) == []
    assert shape_mismatches(other, success) != []  # without maps the field names are schema, and differ

    other["task_result"]["duration"] = "7"
    other["log_id"] = 2761737701
    del other["words_result_num"]
    other["extra"] = 1
    assert shape_mismatches(other, success, maps=maps) == [
        "words_result_num: missing",
        "extra: unexpected key",
        "log_id: expected str, got int",
        "task_result.duration: expected int, got str",
    ]
    assert shape_mismatches({"rate": 1}, {"rate": 0.99}) == []
    assert shape_mismatches({"rate": 0.5}, {"rate": 1}) == []  # JSON has one number type
    assert shape_mismatches({"rate": "0.5"}, {"rate": 1}) == ["rate: expected int, got str"]
    assert shape_mismatches({"box": None}, {"box": [1]}) == []
    assert shape_mismatches({"box": None}, {"box": [1]}, ignore_null=False) == ["box: expected list, got null"]
