"""producer.request and producer.models: request validation (one table per rule), job ids, record JSON."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producer import blobs
from producer.errors import InvalidRequestError
from producer.models import Attempt, JobError, JobRecord, JobResult, Usage
from producer.request import QUEUE_OWNED_CONFIG_FIELDS, GenerateRequest, check_job_id, parse_request
from producer.status import ACTIVE, TERMINAL, Outcome, Status, Tier

MODEL = "gemini-2.5-flash"
BIG = 1_000_000
T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


# -- accepted requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"model": MODEL, "prompt": "Hi"}, id="prompt"),
        pytest.param({"model": f"models/{MODEL}", "prompt": "Hi"}, id="models-prefix"),
        pytest.param({"model": "gemini-2.5-flash-001", "prompt": "Hi"}, id="versioned-model"),
        pytest.param({"model": MODEL, "prompt": " Hi "}, id="prompt-kept-verbatim"),
        pytest.param({"model": MODEL, "contents": [user("Hi")]}, id="contents"),
        pytest.param(
            {"model": MODEL, "contents": [user("Hi"), {"role": "model", "parts": [{"text": "Hello"}]}, user("Bye")]},
            id="multi-turn",
        ),
        pytest.param(
            {"model": MODEL, "contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "aGk="}}]}]},
            id="camel-case-inline-data",
        ),
        pytest.param({"model": MODEL, "prompt": "Hi", "system_instruction": "Be brief."}, id="system-text"),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "system_instruction": {"parts": [{"text": "Be brief."}]}},
            id="system-content",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"temperature": 0.2, "max_output_tokens": 10}},
            id="config-snake",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"temperature": 0.2, "maxOutputTokens": 10}},
            id="config-camel",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"thinking_config": {"thinking_budget": 0}}},
            id="config-nested",
        ),
        pytest.param({"model": MODEL, "prompt": "Hi", "config": {}}, id="config-empty"),
        pytest.param({"model": MODEL, "prompt": "Hi", "config": None, "contents": None}, id="explicit-nulls"),
    ],
)
def test_parse_request_accepts(data: dict[str, Any]) -> None:
    request = parse_request(data, max_bytes=BIG)
    assert isinstance(request, GenerateRequest)
    assert request.model == data["model"]
    assert request.prompt == data.get("prompt")
    assert blobs.fill_with(request.contents, {b.sha256: b.data for b in request.pending_blobs}) == (
        _with_bytes(data.get("contents"))
    )
    assert request.config == data.get("config")


def _with_bytes(contents: Any) -> Any:
    """Inline data as parse_request keeps it: snake_case, bytes decoded (the record holds a reference)."""
    if contents is None:
        return None
    out = []
    for content in contents:
        parts = []
        for part in content.get("parts", []):
            inline = part.get("inlineData") or part.get("inline_data")
            if inline is None:
                parts.append(part)
                continue
            mime = inline.get("mimeType") or inline.get("mime_type")
            parts.append({"inline_data": {"mime_type": mime, "data": base64.b64decode(inline["data"])}})
        out.append({**content, "parts": parts})
    return out


def test_parse_request_passes_a_model_through() -> None:
    request = GenerateRequest(model=MODEL, prompt="Hi")
    assert parse_request(request, max_bytes=BIG) is request


def test_request_is_frozen() -> None:
    request = parse_request({"model": MODEL, "prompt": "Hi"}, max_bytes=BIG)
    with pytest.raises(ValueError, match="frozen"):
        request.prompt = "changed"  # type: ignore[misc]


# -- refused requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "contents": [user("Hi")]}, None, "exactly one of 'prompt'",
            id="both-prompt-and-contents",
        ),
        pytest.param({"model": MODEL}, None, "exactly one of 'prompt'", id="neither"),
        pytest.param({"model": MODEL, "prompt": None, "contents": None}, None, "exactly one", id="both-null"),
        pytest.param({"model": MODEL, "prompt": ""}, "prompt", "must not be empty", id="empty-prompt"),
        pytest.param({"model": MODEL, "prompt": " \n\t"}, "prompt", "must not be empty", id="blank-prompt"),
        pytest.param({"model": MODEL, "prompt": 5}, "prompt", "valid string", id="prompt-not-string"),
        pytest.param({"prompt": "Hi"}, "model", "model: is required", id="no-model"),
        pytest.param({"model": "", "prompt": "Hi"}, "model", "model name", id="empty-model"),
        pytest.param({"model": "gemini 2.5", "prompt": "Hi"}, "model", "model name", id="model-with-space"),
        pytest.param({"model": "gemini?key=x", "prompt": "Hi"}, "model", "model name", id="model-with-query"),
        pytest.param({"model": "x" * 201, "prompt": "Hi"}, "model", "model name", id="model-too-long"),
        pytest.param(
            {"model": "gemini-2.5-flash\n", "prompt": "Hi"}, "model", "model name", id="model-trailing-newline",
        ),
        pytest.param({"model": MODEL, "contents": []}, "contents", "at least one Content", id="contents-empty"),
        pytest.param({"model": MODEL, "contents": "Hi"}, "contents", "valid list", id="contents-not-list"),
        pytest.param({"model": MODEL, "contents": ["Hi"]}, "contents.0", "valid dictionary", id="content-not-object"),
        pytest.param(
            {"model": MODEL, "contents": [{"role": 5, "parts": [{"text": "Hi"}]}]}, "contents",
            "item 0 is not a Gemini Content: role", id="content-bad-role-type",
        ),
        pytest.param(
            {"model": MODEL, "contents": [user("Hi"), {"role": "user", "parts": "Hi"}]}, "contents",
            "item 1 is not a Gemini Content: parts", id="content-parts-not-list",
        ),
        pytest.param(
            {"model": MODEL, "contents": [{"role": "user", "parts": [{"text": "Hi"}], "bogus": 1}]}, "contents",
            "bogus", id="content-unknown-key",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "system_instruction": {"role": 3}}, "system_instruction",
            "is not a Gemini Content", id="system-instruction-bad-content",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"temperature": "hot"}}, "config",
            "GenerateContentConfig: temperature", id="config-temperature-hot",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"no_such_option": 1}}, "config", "no_such_option",
            id="config-unknown-option",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": "fast"}, "config", "valid dictionary", id="config-not-object",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"service_tier": "flex"}}, "config", "'service_tier'",
            id="config-service_tier",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"serviceTier": "standard"}}, "config", "'serviceTier'",
            id="config-serviceTier",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"http_options": {"timeout": 1}}}, "config", "'http_options'",
            id="config-http_options",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"httpOptions": {}}}, "config", "'httpOptions'",
            id="config-httpOptions",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "priority": "high"}, "priority", "unknown field (allowed: model",
            id="unknown-top-level-field",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "service_tier": "flex"}, "service_tier", "unknown field",
            id="top-level-service-tier",
        ),
        pytest.param(
            {"model": MODEL, "prompt": "Hi", "config": {"response_mime_type": "application/json",
                                                        "response_json_schema": {"type": "no-such-type"}}},
            "config", "response_json_schema is not a valid JSON Schema", id="bad-json-schema",
        ),
        pytest.param(
            {"model": MODEL, "contents": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": "%%%"}}]}]},
            "contents", "base64", id="inline-data-not-base64",
        ),
        pytest.param(["not", "an", "object"], None, "must be a JSON object", id="list"),
        pytest.param("Hi", None, "must be a JSON object", id="string"),
        pytest.param(None, None, "must be a JSON object", id="none"),
    ],
)
def test_parse_request_refuses(data: Any, field: str | None, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(data, max_bytes=BIG)
    assert info.value.field == field
    assert message in str(info.value)
    if field is not None:
        assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize("key", sorted(QUEUE_OWNED_CONFIG_FIELDS))
def test_queue_owned_config_message_says_why(key: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"model": MODEL, "prompt": "Hi", "config": {key: "x"}}, max_bytes=BIG)
    assert QUEUE_OWNED_CONFIG_FIELDS[key] in str(info.value)
    assert isinstance(info.value, ValueError)


# -- size limit ----------------------------------------------------------------------------------

# '{"model":"gemini-2.5-flash","prompt":""}' is 40 bytes; each ASCII prompt character adds one.
EMPTY_PROMPT_OVERHEAD = len(json.dumps({"model": MODEL, "prompt": ""}, separators=(",", ":")))


@pytest.mark.parametrize(
    ("prompt_len", "ok"),
    [
        pytest.param(1, True, id="tiny"),
        pytest.param(100 - EMPTY_PROMPT_OVERHEAD, True, id="exactly-at-limit"),
        pytest.param(101 - EMPTY_PROMPT_OVERHEAD, False, id="one-byte-over"),
        pytest.param(10_000, False, id="far-over"),
    ],
)
def test_parse_request_size_limit(prompt_len: int, ok: bool) -> None:
    data = {"model": MODEL, "prompt": "x" * prompt_len}
    if ok:
        assert parse_request(data, max_bytes=100).prompt == data["prompt"]
        return
    with pytest.raises(InvalidRequestError, match="over the 100-byte limit") as info:
        parse_request(data, max_bytes=100)
    assert info.value.field == "request"


def test_parse_request_size_limit_applies_to_a_model_instance_too() -> None:
    with pytest.raises(InvalidRequestError, match="byte limit"):
        parse_request(GenerateRequest(model=MODEL, prompt="x" * 200), max_bytes=100)


def test_parse_request_size_counts_utf8_bytes() -> None:
    prompt = "é" * 30  # 60 UTF-8 bytes; as \u00e9 escapes 180
    utf8_size = len(json.dumps({"model": MODEL, "prompt": prompt}, ensure_ascii=False, separators=(",", ":")).encode())
    assert utf8_size == EMPTY_PROMPT_OVERHEAD + 60
    assert parse_request({"model": MODEL, "prompt": prompt}, max_bytes=utf8_size).prompt == prompt


# -- text_for_estimate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param({"model": MODEL, "prompt": "Hi there"}, "Hi there", id="prompt"),
        pytest.param({"model": MODEL, "contents": [user("a"), user("b")]}, "a\nb", id="contents"),
        pytest.param(
            {"model": MODEL, "contents": [{"role": "user", "parts": [{"inline_data": {"mime_type": "image/png",
                                                                                       "data": "aGk="}},
                                                                      {"text": "caption"}]}]},
            "caption",
            id="non-text-parts-skipped",
        ),
        pytest.param({"model": MODEL, "contents": [{"role": "user"}]}, "", id="no-parts"),
    ],
)
def test_text_for_estimate(data: dict[str, Any], expected: str) -> None:
    assert parse_request(data, max_bytes=BIG).text_for_estimate() == expected


# -- check_job_id --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_id",
    [
        pytest.param("a", id="one-char"),
        pytest.param("job-1", id="dash"),
        pytest.param("A.b_c:d-9", id="all-punctuation"),
        pytest.param("0" * 128, id="128-chars"),
        pytest.param("3f2a9c0e4b5d6e7f8091a2b3c4d5e6f7", id="uuid-hex"),
    ],
)
def test_check_job_id_ok(job_id: str) -> None:
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize(
    "job_id",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 129, id="129-chars"),
        pytest.param("has space", id="space"),
        pytest.param("a/b", id="slash"),
        pytest.param("a*b", id="glob-star"),
        pytest.param("ümlaut", id="non-ascii"),
        pytest.param("tab\there", id="tab"),
        pytest.param("\nabc", id="leading-newline"),
        pytest.param(
            "abc\n", id="trailing-newline",
        ),
        pytest.param(None, id="none"),
        pytest.param(123, id="int"),
    ],
)
def test_check_job_id_refused(job_id: Any) -> None:
    with pytest.raises(InvalidRequestError, match="1-128 characters") as info:
        check_job_id(job_id)
    assert info.value.field == "job_id"


# -- JobRecord -----------------------------------------------------------------------------------


def full_record() -> JobRecord:
    usage = Usage(prompt_tokens=29, output_tokens=3, thoughts_tokens=57, total_tokens=89)
    return JobRecord(
        id="job-1",
        status=Status.SUCCEEDED,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=90),
        deadline_at=T0 + timedelta(hours=24),
        fallback="standard",
        tags={"batch": "b1"},
        request=parse_request(
            {"model": MODEL, "contents": [user("Hi")], "config": {"temperature": 0.2}}, max_bytes=BIG
        ),
        attempts=[
            Attempt(number=1, tier=Tier.FLEX, started_at=T0, finished_at=T0 + timedelta(seconds=30), latency_ms=30000,
                    outcome=Outcome.OVERLOADED, http_status=503, error="503 UNAVAILABLE: overloaded",
                    retry_in_s=2.5, worker="w1"),
            Attempt(number=2, tier=Tier.STANDARD, served_tier="standard", started_at=T0 + timedelta(seconds=60),
                    finished_at=T0 + timedelta(seconds=90), latency_ms=30000, outcome=Outcome.OK, http_status=200,
                    usage=usage, worker="w2"),
        ],
        result=JobResult(text="Hello", finish_reason="STOP", usage=usage, model_version=MODEL, tier="standard"),
        cost_usd=0.00015,
        standard_cost_usd=0.00015,
        next_tier=Tier.STANDARD,
        interrupts=1,
        enqueues=2,
    )


def test_record_json_round_trip() -> None:
    record = full_record()
    raw = record.to_json()
    again = JobRecord.from_json(raw)
    assert again == record
    assert JobRecord.from_json(raw.encode()) == record
    data = json.loads(raw)
    assert data["status"] == "succeeded"
    assert data["attempts"][0]["outcome"] == "overloaded"
    assert data["error"] is None  # exclude_none=False: every field is always present
    assert data["created_at"].startswith("2026-11-21T12:00:00")


def test_record_ignores_unknown_fields_for_forward_compatibility() -> None:
    data = json.loads(full_record().to_json())
    data["added_in_a_later_version"] = 1
    assert JobRecord.from_json(json.dumps(data)) == full_record()


def test_record_quarantined_without_request_round_trips() -> None:
    record = JobRecord(
        id="bad", status=Status.FAILED, created_at=T0, updated_at=T0, deadline_at=T0, request=None,
        error=JobError(kind="invalid_job", message="unreadable job record: x"),
    )
    assert JobRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param("[]", id="array"),
        pytest.param('{"id": "x"}', id="missing-fields"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_record_from_bad_json_raises_value_error(raw: str | bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError is a ValueError; any is fine
        JobRecord.from_json(raw)


@pytest.mark.parametrize(
    ("status", "terminal"),
    [pytest.param(s, s in TERMINAL, id=str(s)) for s in Status],
)
def test_record_terminal(status: Status, terminal: bool) -> None:
    record = full_record().model_copy(update={"status": status})
    assert record.terminal is terminal
    assert (status in ACTIVE) is not terminal


def test_open_attempt() -> None:
    record = full_record()
    assert record.open_attempt is None
    opened = record.model_copy(
        update={"attempts": [*record.attempts, Attempt(number=3, tier=Tier.FLEX, started_at=T0)]}
    )
    assert opened.open_attempt is not None
    assert opened.open_attempt.number == 3
    assert record.model_copy(update={"attempts": []}).open_attempt is None
