"""The client reads every answer the seeds document, into its own models, without losing a field.

The fixtures are the seeds' examples verbatim (``tests/contracts``), not the emulators' answers,
so a reading of a seed the client and an emulator happen to share cannot pass here by agreement.
"Without loss" is checked by dumping the parsed model back: it must give the fixture again.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.models import DocumentInfo, Job
from pipeline.providers import baidu, idp, tuputech
from pipeline.providers import idp_wire
from pipeline.providers import tuputech_wire
from tests import contracts

# fixture -> the client model that reads it
MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("baidu", "submit_response_success.json"): baidu.SubmitResponse,
    ("baidu", "submit_response_error.json"): baidu.ErrorResponse,
    ("baidu", "get_result_response_success.json"): baidu.GetResultResponse,
    ("baidu", "get_result_response_running.json"): baidu.GetResultResponse,
    ("tuputech", "submit_response.json"): tuputech_wire.SubmitResponse,
    ("tuputech", "submit_response_envelope_from_table.json"): tuputech_wire.Signed,
    ("tuputech", "callback.json"): tuputech_wire.CallbackResult,
    ("tuputech", "callback_envelope_from_table.json"): tuputech_wire.Signed,
    ("idp", "login_response_from_table.json"): idp_wire.LoginResponse,
    ("idp", "login_error_from_table.json"): idp_wire.ErrorResponse,
    ("idp", "task_response_from_table.json"): idp_wire.CreateTaskResponse,
    ("idp", "task_error_from_table.json"): idp_wire.ErrorResponse,
    ("idp", "result_example.json"): idp_wire.ExtractResult,
    ("idp", "result_response_from_table.json"): idp_wire.GetResultResponse,
    ("idp", "highlight_response_from_table.json"): idp_wire.HighlightResponse,
}
ANSWERS = [e for e in contracts.entries() if e["kind"] in ("response", "callback") and e["file"].endswith(".json")]


def test_every_documented_answer_has_a_client_model():
    assert {(e["provider"], e["file"]) for e in ANSWERS} == set(MODELS)


@pytest.mark.parametrize("entry", ANSWERS, ids=lambda e: f"{e['provider']}/{e['file']}")
def test_the_client_reads_each_documented_answer_without_loss(entry: dict[str, Any]):
    fixture = contracts.load(entry["provider"], entry["file"])
    model = MODELS[(entry["provider"], entry["file"])].model_validate(fixture)
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == fixture


def _job(provider: str, task_id: str, fmt: str = "pdf") -> Job:
    document = DocumentInfo(bucket="b", key=f"k.{fmt}", filename=f"k.{fmt}", size=1, format=fmt)
    return Job(job_id="0" * 32, provider=provider, source="s3://b/k", location="s3://b/k", provider_task_id=task_id, document=document)


def test_baidu_examples_give_their_task_id_status_and_fields():
    submitted = contracts.load("baidu", "submit_response_success.json")
    assert baidu.accepted_task_id(json.dumps(submitted, ensure_ascii=False)) == "task-2m8g3dhqmrv9cxfe"
    assert baidu.accepted_task_id(json.dumps(contracts.load("baidu", "submit_response_error.json"))) is None
    running = baidu.GetResultResponse.model_validate(contracts.load("baidu", "get_result_response_running.json"))
    assert running.task_result.status == "Running"
    success = baidu.GetResultResponse.model_validate(contracts.load("baidu", "get_result_response_success.json"))
    result = baidu.normalize(_job("baidu", "task-2m8g3dhqmrv9cxfe"), success)
    assert result.field("开票日期") == "2019年08月28日"
    goods = [f for f in result.fields if f.group == "货物或应税劳务、服务信息"]
    assert len(goods) == 8 and next(f.value for f in goods if f.name == "税额") == "20. 38"


def test_the_tuputech_callback_example_gives_a_verdict_with_pages_from_one():
    parsed = tuputech_wire.CallbackResult.model_validate(contracts.load("tuputech", "callback.json"))
    base = tuputech.page_index_base(parsed, None)
    assert base == 0  # the example counts from 0 (its table says from 1)
    verdict = tuputech.moderation(parsed, base)
    assert verdict.suggestion == "pass" and parsed.message is None
    submitted = contracts.load("tuputech", "submit_response.json")
    envelope = json.dumps({"json": json.dumps(submitted, ensure_ascii=False), "signature": "AAAA"})
    assert tuputech.accepted_request_id(envelope) == submitted["result"]["requestId"]


def test_the_idp_examples_give_the_extract_id_and_fields():
    created = contracts.load("idp", "task_response_from_table.json")
    extract_id = idp.accepted_extract_id(json.dumps(created, ensure_ascii=False))
    assert extract_id == str(created["items"][0]["id"])
    answer = idp_wire.GetResultResponse.model_validate(contracts.load("idp", "result_response_from_table.json"))
    assert answer.item is not None
    result = idp.normalize(_job("idp", extract_id), answer.item)
    example = contracts.load("idp", "result_example.json")
    assert result.field(example["tag_list"][0]["tag_name"]) == example["tag_list"][0]["value"]
    group = example["relation_extract"][0]
    assert all(f.group == group["name"] for f in result.fields if f.group)
