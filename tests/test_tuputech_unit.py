"""Unit tests of the tuputech client's pure parts: reading the raw answer, the seed's retry rule, page numbering."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import Permanent, Transient
from pipeline.providers import tuputech
from pipeline.providers.tuputech_wire import CallbackResult


def _envelope(payload: dict, signature: str = "c2lnbmF0dXJl") -> str:
    return json.dumps({"json": json.dumps(payload, ensure_ascii=False, separators=(",", ":")), "signature": signature})


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (_envelope({"code": 0, "message": "success", "result": {"requestId": "a" * 32, "url": "u"}}), "a" * 32),
        (_envelope({"code": 0, "result": {"requestId": "b" * 24, "url": "https://example.com/a.pdf"}})[:-45], "b" * 24),  # cut short
        (_envelope({"code": 0, "result": {"requestId": "c" * 24}})[:-45], None),  # cut inside the id: no id to keep
        (_envelope({"code": 12, "message": "time parameter error"}), None),
        (_envelope({"code": 0}), None),
        ("<html>502</html>", None),
    ],
)
def test_the_request_id_is_read_from_the_raw_answer_before_any_check(text, found):
    assert tuputech.accepted_request_id(text) == found


@pytest.mark.parametrize(("code", "kind"), [(1, Transient), (6, Transient), (11, Transient), (12, Transient), (100, Transient), (77, Transient), (14, Permanent)])
def test_the_seeds_retry_rule_every_code_but_14_is_retried(code, kind):
    error = tuputech.error_for(code, "", "submit")
    assert type(error) is kind and error.provider_code == code and str(code) in error.message


def _callback(pages: list[int], doc_pages: int) -> CallbackResult:
    page = lambda n: {"page": n, "summary": {"suggestion": 1, "riskType": 1}}  # noqa: E731
    return CallbackResult.model_validate(
        {"code": 0, "requestId": "r" * 32, "docInfo": {"pages": doc_pages, "images": 0, "textLength": 1}, "pages": [page(n) for n in pages]}
    )


@pytest.mark.parametrize(
    ("pages", "doc_pages", "configured", "base"),
    [
        ([0], 3, None, 0),  # the example's reading shows itself by a page 0
        ([1, 3], 3, None, 1),  # the table's reading shows itself by a page equal to the count
        ([1], 3, None, 0),  # cannot tell: the example is followed
        ([1], 3, 1, 1),  # configured
    ],
)
def test_page_indexes_are_numbered_from_one_whichever_reading_the_provider_uses(pages, doc_pages, configured, base):
    parsed = _callback(pages, doc_pages)
    assert tuputech.page_index_base(parsed, configured) == base
    assert tuputech.moderation(parsed, base).pages == [n - base + 1 for n in pages]


def test_the_seeds_callback_example_parses_without_message():
    parsed = CallbackResult.model_validate({"code": 0, "requestId": "r" * 32, "docInfo": {"images": 20, "pages": 18, "textLength": 20}})
    assert parsed.message is None and parsed.doc_info.pages == 18
