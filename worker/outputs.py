"""Pure checks of what an answer must hold besides text: an image when one was asked for, JSON that
parses and fits its schema when JSON was asked for. No I/O; truth tables in tests/test_outputs.py.
"""

from __future__ import annotations

import json
from typing import Any

from producer.request import GenerateRequest

#: Gemini ``Schema`` keys (camelCase or snake_case) and their JSON Schema names.
_SCHEMA_KEYS = {
    "any_of": "anyOf", "min_items": "minItems", "max_items": "maxItems", "min_length": "minLength",
    "max_length": "maxLength", "min_properties": "minProperties", "max_properties": "maxProperties",
}
_DROPPED_KEYS = {"property_ordering", "propertyOrdering", "nullable", "example", "title", "format"}


def _config(request: GenerateRequest) -> dict[str, Any]:
    return request.config or {}


def _get(config: dict[str, Any], snake: str, camel: str) -> Any:
    return config[snake] if snake in config else config.get(camel)


def wants_image(request: GenerateRequest) -> bool:
    """An image was asked for: ``response_modalities`` holds IMAGE, or an image model with none set."""
    modalities = _get(_config(request), "response_modalities", "responseModalities")
    if modalities:
        return any(str(m).upper() == "IMAGE" for m in modalities)
    return "-image" in request.model


def wants_json(request: GenerateRequest) -> bool:
    return str(_get(_config(request), "response_mime_type", "responseMimeType") or "") == "application/json"


def json_schema(request: GenerateRequest) -> dict[str, Any] | None:
    """The JSON Schema the answer must fit: ``response_json_schema`` as given, or ``response_schema``
    (Gemini's OpenAPI-style ``Schema``) translated; None when neither is set."""
    config = _config(request)
    given = _get(config, "response_json_schema", "responseJsonSchema")
    if isinstance(given, dict):
        return given
    schema = _get(config, "response_schema", "responseSchema")
    return gemini_to_json_schema(schema) if isinstance(schema, dict) else None


def gemini_to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Gemini ``Schema`` (``type: OBJECT``, ``nullable``, snake_case keys) as JSON Schema."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS:
            continue
        name = _SCHEMA_KEYS.get(key, key)
        if key == "type" and isinstance(value, str):
            out["type"] = value.lower() if value.upper() != "TYPE_UNSPECIFIED" else None
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {k: gemini_to_json_schema(v) for k, v in value.items() if isinstance(v, dict)}
        elif key == "items" and isinstance(value, dict):
            out["items"] = gemini_to_json_schema(value)
        elif name == "anyOf" and isinstance(value, list):
            out["anyOf"] = [gemini_to_json_schema(v) for v in value if isinstance(v, dict)]
        elif key in ("minimum", "maximum", "enum", "required", "description") or name in _SCHEMA_KEYS.values():
            out[name] = int(value) if name in _SCHEMA_KEYS.values() and isinstance(value, str) else value
    if out.get("type") is None:
        out.pop("type", None)
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def check_json(text: str | None, schema: dict[str, Any] | None, finish_reason: str | None) -> tuple[Any, str | None]:
    """(parsed value, None), or (None, why the answer is not the JSON asked for)."""
    cut = " (the answer was cut at max_output_tokens)" if finish_reason == "MAX_TOKENS" else ""
    if text is None or not text.strip():
        return None, f"JSON was asked for and the answer has no text{cut}"
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"the answer is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}{cut}"
    if schema is not None:
        error = schema_error(parsed, schema)
        if error is not None:
            return None, f"the answer does not fit the schema: {error}{cut}"
    return parsed, None


def schema_error(value: Any, schema: dict[str, Any]) -> str | None:
    """The first way ``value`` breaks ``schema`` (JSON Schema, checked by the jsonschema library)."""
    import jsonschema  # imported on first use: only JSON jobs need it

    try:
        validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator_cls.check_schema(schema)
        error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(value))
    except jsonschema.exceptions.SchemaError as err:
        return f"the schema itself is invalid: {err.message}"
    except jsonschema.exceptions.UnknownType as err:
        return f"the schema itself is invalid: unknown type {err.type!r}"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"[:500]
