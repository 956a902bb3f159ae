"""Function calling: which declared function the simulated model calls next, and with what args.

The model calls the first declared function that has no `functionResponse` anywhere in `contents`
(matched by name), with the smallest args its parameter schema allows; once every declared function
has a response, it answers text that mentions the results.
"""

from __future__ import annotations

import json
from typing import Any

from simulator import schema_fill
from simulator.request import field_of

RESULT_CHARS = 60


def _list(raw: Any) -> list[Any]:
    return raw if isinstance(raw, list) else [raw] if isinstance(raw, dict) else []


def declarations(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every function declaration of every tool, in order."""
    out: list[dict[str, Any]] = []
    for tool in _list(body.get("tools")):
        if not isinstance(tool, dict):
            continue
        for decl in _list(field_of(tool, "functionDeclarations", "function_declarations")):
            if isinstance(decl, dict) and isinstance(decl.get("name"), str):
                out.append(decl)
    return out


def _calling_config(body: dict[str, Any]) -> dict[str, Any]:
    tool_config = field_of(body, "toolConfig", "tool_config")
    config = (
        field_of(tool_config, "functionCallingConfig", "function_calling_config")
        if isinstance(tool_config, dict)
        else None
    )
    return config if isinstance(config, dict) else {}


def callable_declarations(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The declarations the model may call: none with mode NONE, only allowedFunctionNames if given."""
    config = _calling_config(body)
    if str(config.get("mode", "")).upper() == "NONE":
        return []
    decls = declarations(body)
    allowed = field_of(config, "allowedFunctionNames", "allowed_function_names")
    if isinstance(allowed, list) and allowed:
        decls = [d for d in decls if d["name"] in allowed]
    return decls


def function_responses(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, response) of every functionResponse part in `contents`, in order."""
    out: list[tuple[str, Any]] = []
    for content in _list(body.get("contents")):
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else []:
            response = field_of(part, "functionResponse", "function_response") if isinstance(part, dict) else None
            if isinstance(response, dict) and isinstance(response.get("name"), str):
                out.append((response["name"], response.get("response")))
    return out


def next_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first callable declaration not yet answered by a functionResponse, or None."""
    answered = {name for name, _ in function_responses(body)}
    for decl in callable_declarations(body):
        if decl["name"] not in answered:
            return decl
    return None


def call_args(decl: dict[str, Any]) -> dict[str, Any]:
    """The smallest args that fit the declaration's parameters (a Gemini Schema or a JSON Schema)."""
    schema = decl.get("parameters")
    if schema is None:
        schema = field_of(decl, "parametersJsonSchema", "parameters_json_schema")
    if not isinstance(schema, dict):
        return {}
    args = schema_fill.instance(schema)
    return args if isinstance(args, dict) else {}


def results_text(body: dict[str, Any]) -> str:
    """A short mention of each function result, for the text answer that closes a tool thread."""
    pieces = []
    for name, response in function_responses(body):
        shown = json.dumps(response, sort_keys=True, default=str)
        if len(shown) > RESULT_CHARS:
            shown = shown[: RESULT_CHARS - 3] + "..."
        pieces.append(f"{name} returned {shown}")
    return "; ".join(pieces)
