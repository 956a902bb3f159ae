"""What a successful call answers: a function call, an image, JSON or text (see docs/simulator.md).

In order: a request with unanswered function declarations gets a functionCall part; an image model
an image (after a short text part unless `responseModalities` is IMAGE only); a JSON-mode request
JSON that fits its schema; anything else the usual text. Directives may change the shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from simulator import images, schema_fill, signatures, tools, wire
from simulator.request import ParsedRequest, field_of

# pseudo finish kinds of the directives that shape a 200 rather than stop it
TEXT_ONLY = "TEXT_ONLY"
BAD_JSON = "BAD_JSON"
TRUNCATED_JSON = "TRUNCATED_JSON"
SHAPES = frozenset({TEXT_ONLY, BAD_JSON, TRUNCATED_JSON})
FINISH_MESSAGES: dict[str, str] = {
    "IMAGE_SAFETY": "You will not be charged for blocked images.",
    "MALFORMED_FUNCTION_CALL": "Malformed function call: the call the model wrote could not be parsed.",
}
TEXT_ONLY_PREFIX = "I can't create that image, but here is a description: "
IMAGE_TEXT_PREFIX = "Here is the image you asked for: "
PROMPT_CHARS = 60


def validate(model: str, req: ParsedRequest) -> None:
    """Raise request.BadRequest for what an image model would refuse (size, aspect ratio, too many images)."""
    if images.is_image_model(model):
        images.image_spec(model, req)


async def prepare(model: str, req: ParsedRequest) -> None:
    """Build (and cache) the PNG of an image request off the event loop: a 4K one takes ~0.3 s."""
    if images.is_image_model(model) and not tools.next_call(req.body):
        spec = images.image_spec(model, req)
        if spec.wants_image:
            await asyncio.to_thread(images.png_bytes, spec.width, spec.height)


def is_json_mode(req: ParsedRequest) -> bool:
    gen = field_of(req.body, "generationConfig", "generation_config")
    mime = field_of(gen, "responseMimeType", "response_mime_type") if isinstance(gen, dict) else None
    return isinstance(mime, str) and mime.strip().lower() == "application/json"


def json_value(req: ParsedRequest) -> Any:
    """A value fitting the request's responseSchema / responseJsonSchema, else {"answer": ...}."""
    gen = field_of(req.body, "generationConfig", "generation_config")
    gen = gen if isinstance(gen, dict) else {}
    schema = field_of(gen, "responseJsonSchema", "response_json_schema")
    if schema is None:
        schema = field_of(gen, "responseSchema", "response_schema")
    if isinstance(schema, dict):
        return schema_fill.instance(schema, all_properties=True)
    return {"answer": wire.answer_text(req)}


def break_json(text: str) -> str:
    """Malformed JSON: a trailing comma inside the outer brackets, or after a bare value."""
    if text[-1:] in ("}", "]"):
        return text[:-1] + "," + text[-1]
    return text + ","


def truncate_json(text: str) -> str:
    """The first half (or less) of `text`, cut so that it no longer parses."""
    for end in range(max(1, len(text) // 2), 0, -1):
        try:
            json.loads(text[:end])
        except ValueError:
            return text[:end]
    return "{"


def _json_answer(req: ParsedRequest, thinking: bool, shape: str | None) -> wire.Answer:
    text = json.dumps(json_value(req), ensure_ascii=False)
    if shape == BAD_JSON:
        text = break_json(text)
    elif shape == TRUNCATED_JSON:
        text = truncate_json(text)
    answer = wire.plan_answer(req, thinking=thinking, finish_kind=None, text=text)
    finish = "MAX_TOKENS" if shape == TRUNCATED_JSON else answer.finish_reason
    return replace(answer, finish_reason=finish, output="json")


def _function_call(
    req: ParsedRequest, model: str, decl: dict[str, Any], thinking: bool, new_id: Callable[[], str]
) -> wire.Answer:
    call = {"id": new_id(), "name": decl["name"], "args": tools.call_args(decl)}
    part: dict[str, Any] = {"functionCall": call}
    if images.is_gemini3(model):
        part["thoughtSignature"] = signatures.sign_function_call(call["name"], call["args"], call["id"])
    answer = wire.plan_answer(req, thinking=thinking, finish_kind=None, text="")
    tokens = wire.tokens_of(json.dumps(call))
    return replace(answer, text=None, extra_parts=(part,), part_tokens=tokens, output="function_call")


def _image(req: ParsedRequest, model: str, spec: images.ImageSpec, thinking: bool) -> wire.Answer:
    data = images.png_bytes(spec.width, spec.height)
    blob = {"mimeType": images.MIME_TYPE, "data": base64.b64encode(data).decode("ascii")}
    part: dict[str, Any] = {"inlineData": blob}
    gemini3 = images.is_gemini3(model)
    if gemini3:
        part["thoughtSignature"] = signatures.sign_image(data)
    text = IMAGE_TEXT_PREFIX + req.last_user_text[:PROMPT_CHARS] if spec.wants_text else ""
    answer = wire.plan_answer(req, thinking=thinking, finish_kind=None, text=text)
    if answer.finish_reason != "STOP":
        return answer  # maxOutputTokens left no room for the image
    signature = signatures.sign_text(answer.text) if gemini3 and answer.text else None
    return replace(answer, extra_parts=(part,), image_tokens=spec.tokens, text_signature=signature, output="image")


def _text(req: ParsedRequest, model: str, thinking: bool, text: str | None) -> wire.Answer:
    answer = wire.plan_answer(req, thinking=thinking, finish_kind=None, text=text)
    if answer.text and images.is_gemini3(model) and images.is_image_model(model):
        return replace(answer, text_signature=signatures.sign_text(answer.text))
    return answer


def _stopped(req: ParsedRequest, thinking: bool, finish_kind: str) -> wire.Answer:
    answer = wire.plan_answer(req, thinking=thinking, finish_kind=finish_kind)
    return replace(
        answer,
        finish_message=FINISH_MESSAGES.get(finish_kind),
        no_content=finish_kind == "MALFORMED_FUNCTION_CALL",
    )


def plan(
    req: ParsedRequest, model: str, *, thinking: bool, finish_kind: str | None, new_id: Callable[[], str]
) -> wire.Answer:
    """The answer to a request that is served (finish_kind: from a directive, or None)."""
    if finish_kind is not None and finish_kind not in SHAPES:
        return _stopped(req, thinking, finish_kind)
    if finish_kind == TEXT_ONLY:
        return _text(req, model, thinking, TEXT_ONLY_PREFIX + req.last_user_text[:PROMPT_CHARS])
    if finish_kind is not None:
        return _json_answer(req, thinking, finish_kind)
    decl = tools.next_call(req.body)
    if decl is not None:
        return _function_call(req, model, decl, thinking, new_id)
    if tools.declarations(req.body) and tools.function_responses(req.body):
        results = tools.results_text(req.body)
        return _text(req, model, thinking, f"{wire.answer_text(req)} (using the function results: {results})")
    if images.is_image_model(model):
        spec = images.image_spec(model, req)
        if spec.wants_image:
            return _image(req, model, spec, thinking)
    if is_json_mode(req):
        return _json_answer(req, thinking, None)
    return _text(req, model, thinking, None)
