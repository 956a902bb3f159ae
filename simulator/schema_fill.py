"""A small valid instance of a schema: Gemini's Schema (type names like "OBJECT") or JSON Schema.

Strings are "example", integers 1, numbers 1.5, booleans true, enums their first value; an array has
one item (or minItems); bounds (minimum, maximum, minLength, maxLength) are respected; `$ref` into
`$defs` and `anyOf` / `oneOf` (the first option that is not null) are followed. Objects hold their
required properties, or every property with ``all_properties=True``.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 12
MAX_ITEMS = 50
STRING = "example"
STRING_FORMATS: dict[str, str] = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _get(schema: dict[str, Any], camel: str) -> Any:
    """schema[camel], else its snake_case spelling (the SDK may send either)."""
    if camel in schema:
        return schema[camel]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return schema.get(snake)


def _number(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None  # draft-4 style `exclusiveMinimum: true` is not a bound
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _type_of(schema: dict[str, Any]) -> str:
    raw = schema.get("type")
    if isinstance(raw, list):
        named = [str(t) for t in raw if str(t).lower() != "null"]
        raw = named[0] if named else "null"
    if isinstance(raw, str) and raw:
        return raw.lower()
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


class _Filler:
    def __init__(self, root: Any, all_properties: bool) -> None:
        self.root = root if isinstance(root, dict) else {}
        self.all_properties = all_properties

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Follow `$ref` and take the first non-null option of anyOf / oneOf / allOf."""
        for _ in range(MAX_DEPTH):
            ref = schema.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/"):
                target: Any = self.root
                for key in ref[2:].split("/"):
                    target = target.get(key) if isinstance(target, dict) else None
                schema = target if isinstance(target, dict) else {}
                continue
            options = _get(schema, "anyOf") or _get(schema, "oneOf") or _get(schema, "allOf")
            if isinstance(options, list) and options and "type" not in schema:
                typed = [o for o in options if isinstance(o, dict) and _type_of(o) != "null"]
                schema = typed[0] if typed else {"type": "null"}
                continue
            break
        return schema

    def fill(self, raw: Any, depth: int = 0) -> Any:
        if not isinstance(raw, dict) or depth > MAX_DEPTH:
            return STRING if depth <= MAX_DEPTH else None
        schema = self.resolve(raw)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        kind = _type_of(schema)
        if kind == "object":
            return self.fill_object(schema, depth)
        if kind == "array":
            return self.fill_array(schema, depth)
        if kind in ("integer", "number"):
            return _fill_number(schema, kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return _fill_string(schema)

    def fill_object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = list(properties) if self.all_properties else [n for n in properties if n in (required or [])]
        ordering = _get(schema, "propertyOrdering")
        if isinstance(ordering, list):
            names.sort(key=lambda n: ordering.index(n) if n in ordering else len(ordering))
        out = {name: self.fill(properties[name], depth + 1) for name in names}
        for name in required if isinstance(required, list) else []:
            if isinstance(name, str) and name not in out:
                out[name] = self.fill(properties.get(name, {}), depth + 1)
        return out

    def fill_array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        low = _number(_get(schema, "minItems"))
        high = _number(_get(schema, "maxItems"))
        count = max(1, math.ceil(low)) if low is not None else 1
        if high is not None:
            count = min(count, max(0, math.floor(high)))
        items = schema.get("items")
        prefix = _get(schema, "prefixItems")
        if isinstance(prefix, list) and prefix:
            return [self.fill(item, depth + 1) for item in prefix]
        return [self.fill(items, depth + 1) for _ in range(min(count, MAX_ITEMS))]


def _fill_number(schema: dict[str, Any], integer: bool) -> int | float:
    value: float = 1.0 if integer else 1.5
    low = _number(schema.get("minimum"))
    low_excl = _number(_get(schema, "exclusiveMinimum"))
    high = _number(schema.get("maximum"))
    high_excl = _number(_get(schema, "exclusiveMaximum"))
    step = 1.0 if integer else 0.5
    if low is not None and value < low:
        value = low
    if low_excl is not None and value <= low_excl:
        value = low_excl + step
    if high is not None and value > high:
        value = high
    if high_excl is not None and value >= high_excl:
        value = high_excl - step
    if integer:
        return math.ceil(value) if low is not None or low_excl is not None else math.floor(value)
    return value


def _fill_string(schema: dict[str, Any]) -> str:
    fmt = schema.get("format")
    text = STRING_FORMATS.get(fmt, STRING) if isinstance(fmt, str) else STRING
    low = _number(_get(schema, "minLength"))
    high = _number(_get(schema, "maxLength"))
    if low is not None and len(text) < low:
        text = (text * math.ceil(low / len(text)))[: math.ceil(low)]
    if high is not None and len(text) > high:
        text = text[: max(0, math.floor(high))]
    return text


def instance(schema: Any, *, all_properties: bool = False) -> Any:
    """A value that fits `schema` (see the module docstring)."""
    return _Filler(schema, all_properties).fill(schema)
