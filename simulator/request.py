"""Reading a generateContent request body the way the real API does (camelCase or snake_case)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FLEX = "flex"
STANDARD = "standard"
PRIORITY = "priority"  # the body's serviceTier on the Gemini API, the shared-request-type header on Vertex AI
IMAGE_TOKENS = 258  # what the real API bills for one inline image


class BadRequest(Exception):
    """The body cannot be served; `field` names the offending field for a BadRequest detail."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class ParsedRequest:
    tier: str  # "flex" | "standard" | "priority"
    texts: list[str]  # every text part, system instruction first
    last_user_text: str
    image_count: int
    max_output_tokens: int | None
    thinking_budget: int | None
    include_thoughts: bool
    #: the decoded request body, for what the fields above do not cover (tools, schemas, imageConfig)
    body: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def full_text(self) -> str:
        return "\n".join(self.texts)

    @property
    def text_tokens(self) -> int:
        return math.ceil(sum(len(t) for t in self.texts) / 4)

    @property
    def prompt_tokens(self) -> int:
        return max(1, self.text_tokens + IMAGE_TOKENS * self.image_count)


def field_of(obj: dict[str, Any], camel: str, snake: str) -> Any:
    """obj[camel] if present, else obj[snake], else None."""
    return obj[camel] if camel in obj else obj.get(snake)


def parse_tier(raw: Any) -> str:
    """Map a serviceTier value to "flex", "standard" or "priority"; raise BadRequest for anything else."""
    if raw is None:
        return STANDARD
    value = str(raw).strip().lower() if isinstance(raw, str) else None
    if value is not None and value.startswith("service_tier_"):
        value = value.removeprefix("service_tier_")
    if value == FLEX:
        return FLEX
    if value == PRIORITY:
        return PRIORITY
    if value in ("", STANDARD, "unspecified"):
        return STANDARD
    message = (
        "Invalid value at 'service_tier' "
        f"(type.googleapis.com/google.ai.generativelanguage.v1beta.ServiceTier), {_json_repr(raw)}"
    )
    raise BadRequest(message, field="service_tier")


def _json_repr(raw: Any) -> str:
    return f'"{raw}"' if isinstance(raw, str) else repr(raw)


def _content_texts(content: Any) -> tuple[list[str], int]:
    """(text parts, inline image count) of one Content (or a bare string)."""
    if isinstance(content, str):
        return [content], 0
    if not isinstance(content, dict):
        return [], 0
    parts = content.get("parts")
    if not isinstance(parts, list):
        return [], 0
    texts: list[str] = []
    images = 0
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
            if field_of(part, "inlineData", "inline_data") is not None:
                images += 1
    return texts, images


def _int_or_none(raw: Any) -> int | None:
    if raw is None or isinstance(raw, bool):
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def parse_request(body: Any) -> ParsedRequest:
    """Validate and read a decoded JSON body; raise BadRequest like the real API would."""
    if not isinstance(body, dict):
        raise BadRequest("Invalid JSON payload received. Expected an object at the top level.")
    tier = parse_tier(field_of(body, "serviceTier", "service_tier"))
    contents = body.get("contents")
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list) or not contents:
        raise BadRequest("Request has empty input.")

    texts: list[str] = []
    images = 0
    system = field_of(body, "systemInstruction", "system_instruction")
    if system is not None:
        texts, images = _content_texts(system)
    last_user_text = ""
    for content in contents:
        content_texts, content_images = _content_texts(content)
        texts.extend(content_texts)
        images += content_images
        role = content.get("role", "user") if isinstance(content, dict) else "user"
        if role == "user" and content_texts:
            last_user_text = "\n".join(content_texts)
    if not texts and images == 0:
        raise BadRequest("Request has empty input.")

    gen = field_of(body, "generationConfig", "generation_config")
    gen = gen if isinstance(gen, dict) else {}
    thinking = field_of(gen, "thinkingConfig", "thinking_config")
    thinking = thinking if isinstance(thinking, dict) else {}
    return ParsedRequest(
        tier=tier,
        texts=texts,
        last_user_text=last_user_text,
        image_count=images,
        max_output_tokens=_int_or_none(field_of(gen, "maxOutputTokens", "max_output_tokens")),
        thinking_budget=_int_or_none(field_of(thinking, "thinkingBudget", "thinking_budget")),
        include_thoughts=bool(field_of(thinking, "includeThoughts", "include_thoughts")),
        body=body,
    )
