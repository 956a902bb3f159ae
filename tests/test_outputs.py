"""worker.outputs: what an answer must hold besides text, as truth tables (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from producer.request import GenerateRequest
from worker.outputs import check_json, gemini_to_json_schema, json_schema, wants_image, wants_json

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "required": ["n"]}


def request(model: str = "gemini-2.5-flash", **config: Any) -> GenerateRequest:
    return GenerateRequest.model_validate({"model": model, "prompt": "x", "config": config or None},
                                          context={"stored": True})


@pytest.mark.parametrize(
    ("model", "config", "expected"),
    [
        pytest.param("gemini-3-pro-image-preview", {}, True, id="image-model-default"),
        pytest.param("gemini-2.5-flash-image", {"response_modalities": ["TEXT", "IMAGE"]}, True, id="text-and-image"),
        pytest.param("gemini-2.5-flash-image", {"responseModalities": ["TEXT"]}, False, id="image-model-text-only"),
        pytest.param("gemini-2.5-flash", {}, False, id="text-model"),
        pytest.param("gemini-2.5-flash", {"response_modalities": ["image"]}, True, id="lower-case-modality"),
    ],
)
def test_wants_image(model: str, config: dict[str, Any], expected: bool) -> None:
    assert wants_image(request(model, **config)) is expected


def test_json_schema_sources() -> None:
    assert not wants_json(request())
    assert wants_json(request(response_mime_type="application/json"))
    assert json_schema(request(response_mime_type="application/json", response_json_schema=SCHEMA)) == SCHEMA
    gemini = {"type": "OBJECT", "properties": {"tags": {"type": "ARRAY", "items": {"type": "STRING"}, "minItems": "1",
                                                        "nullable": True}},
              "required": ["tags"], "propertyOrdering": ["tags"]}
    assert json_schema(request(responseMimeType="application/json", responseSchema=gemini)) == {
        "type": "object", "required": ["tags"],
        "properties": {"tags": {"type": ["array", "null"], "items": {"type": "string"}, "minItems": 1}},
    }
    assert gemini_to_json_schema({"type": "TYPE_UNSPECIFIED", "any_of": [{"type": "STRING"}]}) == {
        "anyOf": [{"type": "string"}]
    }


@pytest.mark.parametrize(
    ("text", "finish", "parsed", "error"),
    [
        pytest.param('{"n": 2}', "STOP", {"n": 2}, None, id="fits"),
        pytest.param('{"n": 0}', "STOP", None, "n: 0 is less than the minimum of 1", id="out-of-range"),
        pytest.param('{"m": 2}', "STOP", None, "'n' is a required property", id="missing-field"),
        pytest.param('{"n": 2,}', "STOP", None, "not valid JSON", id="malformed"),
        pytest.param('{"n": ', "MAX_TOKENS", None, "cut at max_output_tokens", id="truncated"),
        pytest.param(None, "STOP", None, "has no text", id="no-text"),
    ],
)
def test_check_json(text: str | None, finish: str, parsed: Any, error: str | None) -> None:
    got, why = check_json(text, SCHEMA, finish)
    assert got == parsed
    if error is None:
        assert why is None
    else:
        assert why is not None and error in why


def test_an_invalid_schema_is_named() -> None:
    _, why = check_json('{"n": 1}', {"type": "no-such-type"}, "STOP")
    assert why is not None and "schema itself is invalid" in why
