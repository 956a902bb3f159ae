"""Response bodies in the exact shapes of the real Gemini API (docs/gemini-wire.md)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from simulator.request import ParsedRequest

RPC = "type.googleapis.com/google.rpc."
OVERLOADED_MESSAGES: tuple[str, ...] = (
    "The model is overloaded. Please try again later.",
    "This model is currently experiencing high demand. Spikes in demand are usually temporary. Please try again later.",
    "The service is currently unavailable.",
)
INTERNAL_MESSAGE = (
    "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)
DEADLINE_MESSAGE = "Deadline expired before operation could complete."
UNREGISTERED_MESSAGE = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
LEAKED_KEY_MESSAGE = "Your API key was reported as leaked. Please use another API key."
BILLING_MESSAGE = (
    "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects "
    "to manage your project and billing."
)
LEGACY_429_MESSAGE = "Resource has been exhausted (e.g. check quota)."
UNKNOWN_FIELD_MESSAGE = 'Invalid JSON payload received. Unknown name "bogusField": Cannot find field.'
PER_MINUTE_QUOTA = ("GenerateRequestsPerMinutePerProjectPerModel", "generate_requests_per_model", "1000")
PER_DAY_QUOTA = ("GenerateRequestsPerDayPerProjectPerModel", "generate_requests_per_model_per_day", "10000")
DAILY_RETRY_DELAY_S = 3600.0
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
ANSWER_PREFIX = "Simulated answer to: "


def _html_page(code: int, message: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
        f"  <title>Error {code} (Server Error)!!1</title>\n"
        f"  <p><b>{code}.</b> <ins>That's an error.</ins>\n"
        f"  <p>{message} <ins>That's all we know.</ins>\n"
    )


HTML_500 = _html_page(500, "There was an error. Please try again later.")
HTML_502 = _html_page(
    502,
    "The server encountered a temporary error and could not complete your request.<p>Please try again in 30 seconds.",
)


def error_body(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def unavailable(turn: int) -> dict[str, Any]:
    """503 UNAVAILABLE, rotating among the messages seen in the wild; never a delay detail."""
    return error_body(503, "UNAVAILABLE", OVERLOADED_MESSAGES[turn % len(OVERLOADED_MESSAGES)])


def internal() -> dict[str, Any]:
    return error_body(500, "INTERNAL", INTERNAL_MESSAGE)


def deadline_exceeded() -> dict[str, Any]:
    return error_body(504, "DEADLINE_EXCEEDED", DEADLINE_MESSAGE)


def invalid_argument(message: str, field: str | None = None) -> dict[str, Any]:
    violation: dict[str, Any] = {"description": message}
    if field is not None:
        violation = {"field": field, "description": message}
    detail = {"@type": RPC + "BadRequest", "fieldViolations": [violation]}
    return error_body(400, "INVALID_ARGUMENT", message, [detail])


def permission_denied(message: str = UNREGISTERED_MESSAGE) -> dict[str, Any]:
    return error_body(403, "PERMISSION_DENIED", message)


def not_found(model: str, version: str) -> dict[str, Any]:
    message = (
        f"models/{model} is not found for API version {version}, or is not supported for generateContent. "
        "Call ListModels to see the list of supported models and the methods they support."
    )
    return error_body(404, "NOT_FOUND", message)


def format_seconds(value_s: float) -> str:
    """37.628721472 -> '37.628721472', 3.0 -> '3' (no trailing zeros)."""
    text = f"{value_s:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def quota_exceeded(
    model: str,
    delay_s: float,
    rng: random.Random,
    *,
    retry_delay: str | None = None,
    quota: tuple[str, str, str] = PER_MINUTE_QUOTA,
) -> dict[str, Any]:
    """429 RESOURCE_EXHAUSTED with Help, QuotaFailure and RetryInfo in a shuffled order.

    `retry_delay` defaults to `delay_s` truncated to whole seconds, as the real API does.
    """
    quota_id, metric_name, quota_value = quota
    metric = f"generativelanguage.googleapis.com/{metric_name}"
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more information "
        "on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current "
        f"usage, head to: https://ai.dev/rate-limit. \n* Quota exceeded for metric: {metric}, "
        f"limit: {quota_value}, model: {model}\nPlease retry in {format_seconds(delay_s)}s."
    )
    details: list[dict[str, Any]] = [
        {
            "@type": RPC + "Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
        {
            "@type": RPC + "QuotaFailure",
            "violations": [
                {
                    "quotaMetric": metric,
                    "quotaId": quota_id,
                    "quotaDimensions": {"model": model, "location": "global"},
                    "quotaValue": quota_value,
                }
            ],
        },
        {"@type": RPC + "RetryInfo", "retryDelay": retry_delay or f"{math.floor(delay_s)}s"},
    ]
    rng.shuffle(details)
    return error_body(429, "RESOURCE_EXHAUSTED", message, details)


def daily_quota_exceeded(model: str, rng: random.Random) -> dict[str, Any]:
    return quota_exceeded(model, DAILY_RETRY_DELAY_S, rng, quota=PER_DAY_QUOTA)


def billing_depleted() -> dict[str, Any]:
    """The billing stop: a 429 with no details at all."""
    return error_body(429, "RESOURCE_EXHAUSTED", BILLING_MESSAGE)


def legacy_rate_limited(model: str) -> dict[str, Any]:
    detail = {
        "@type": RPC + "ErrorInfo",
        "reason": "RATE_LIMIT_EXCEEDED",
        "domain": "googleapis.com",
        "metadata": {
            "service": "generativelanguage.googleapis.com",
            "quota_limit": PER_MINUTE_QUOTA[0],
            "quota_location": "global",
            "model": model,
        },
    }
    return error_body(429, "RESOURCE_EXHAUSTED", LEGACY_429_MESSAGE, [detail])


def response_id(rng: random.Random) -> str:
    return "".join(rng.choice(ID_ALPHABET) for _ in range(22))


def answer_text(req: ParsedRequest) -> str:
    """The deterministic answer to a request."""
    return ANSWER_PREFIX + req.last_user_text[:60]


def tokens_of(text: str) -> int:
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class Answer:
    """What a 200 carries, before rendering to one JSON body or to SSE chunks."""

    text: str | None  # None: no answer part
    thought: str | None  # a thought part's text, if shown
    thoughts_tokens: int
    finish_reason: str
    blocked: bool = False  # promptFeedback.blockReason, no candidates
    safety_ratings: bool = False
    #: parts after the text (inlineData images, functionCall), all in the last chunk of a stream
    extra_parts: tuple[dict[str, Any], ...] = ()
    part_tokens: int = 0  # output tokens of the extra parts billed as text (function calls)
    image_tokens: int = 0  # output tokens of the extra image parts
    text_signature: str | None = None  # thoughtSignature on the (first) text part
    finish_message: str | None = None
    no_content: bool = False  # a candidate without any `content` key
    output: str = "text"  # "text" | "json" | "image" | "function_call", for the stats


def plan_answer(req: ParsedRequest, *, thinking: bool, finish_kind: str | None, text: str | None = None) -> Answer:
    """Decide text, thoughts and finishReason for a request (finish_kind from a directive).

    `text` replaces the usual answer text (a JSON answer, the text of an image answer, ...).
    """
    if finish_kind == "BLOCK":
        return Answer(text=None, thought=None, thoughts_tokens=0, finish_reason="", blocked=True)
    if finish_kind is not None and finish_kind != "MAX_TOKENS":
        return Answer(None, None, 0, finish_kind, safety_ratings=finish_kind == "SAFETY")
    budget = req.thinking_budget
    thoughts_tokens = 0
    if thinking or (budget is not None and (budget > 0 or budget == -1)):
        thoughts_tokens = 16 + 2 * req.prompt_tokens
        if budget is not None and budget > 0:
            thoughts_tokens = min(thoughts_tokens, budget)
    thought = f"Thinking about: {req.last_user_text[:40]}" if (thinking or req.include_thoughts) else None
    if not thoughts_tokens:
        thought = None
    text = answer_text(req) if text is None else text
    finish = "STOP"
    if finish_kind == "MAX_TOKENS":
        text, finish = text[: max(1, len(text) // 2)], "MAX_TOKENS"
    if req.max_output_tokens is not None and req.max_output_tokens > 0:
        thoughts_tokens = min(thoughts_tokens, req.max_output_tokens)
        room_chars = 4 * (req.max_output_tokens - thoughts_tokens)
        if len(text) > room_chars:
            text, finish = text[:room_chars], "MAX_TOKENS"
    return Answer(text=text or None, thought=thought, thoughts_tokens=thoughts_tokens, finish_reason=finish)


def usage_metadata(
    req: ParsedRequest,
    candidates_tokens: int,
    thoughts_tokens: int,
    tier: str,
    candidates_details: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    prompt = req.prompt_tokens
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if candidates_tokens:
        usage["candidatesTokenCount"] = candidates_tokens
    if candidates_details:
        usage["candidatesTokensDetails"] = candidates_details
    if thoughts_tokens:
        usage["thoughtsTokenCount"] = thoughts_tokens
    usage["totalTokenCount"] = prompt + candidates_tokens + thoughts_tokens
    usage["serviceTier"] = tier
    details = [{"modality": "TEXT", "tokenCount": max(1, req.text_tokens) if req.texts else 0}]
    if req.image_count:
        details.append({"modality": "IMAGE", "tokenCount": 258 * req.image_count})
    usage["promptTokensDetails"] = [d for d in details if d["tokenCount"]]
    return usage


def candidate(answer: Answer, text: str | None, *, final: bool, with_thought: bool = True) -> dict[str, Any]:
    """One candidate carrying `text` (a slice of answer.text when streaming; the first slice has
    the thought part and the text signature, the last the extra parts and the finishReason)."""
    parts: list[dict[str, Any]] = []
    if answer.thought is not None and with_thought:
        parts.append({"text": answer.thought, "thought": True})
    if text:
        part: dict[str, Any] = {"text": text}
        if answer.text_signature is not None and with_thought:
            part["thoughtSignature"] = answer.text_signature
        parts.append(part)
    if final:
        parts.extend(answer.extra_parts)
    cand: dict[str, Any] = {} if answer.no_content else {"content": {"parts": parts, "role": "model"} if parts else {}}
    if final:
        cand["finishReason"] = answer.finish_reason
        if answer.finish_message is not None:
            cand["finishMessage"] = answer.finish_message
    if answer.safety_ratings:
        cand["safetyRatings"] = [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
        ]
    cand["index"] = 0
    return cand


def _usage(req: ParsedRequest, answer: Answer, text_sent: str, final: bool, tier: str) -> dict[str, Any]:
    """Cumulative usage after `text_sent`; the extra parts count from the final chunk on."""
    text_tokens = tokens_of(text_sent)
    extra = answer.part_tokens + answer.image_tokens if final else 0
    details: list[dict[str, Any]] | None = None
    if answer.image_tokens and final:
        details = [{"modality": "TEXT", "tokenCount": text_tokens}] if text_tokens else []
        details.append({"modality": "IMAGE", "tokenCount": answer.image_tokens})
    return usage_metadata(req, text_tokens + extra, answer.thoughts_tokens, tier, details)


def success_body(req: ParsedRequest, answer: Answer, model: str, resp_id: str, tier: str) -> dict[str, Any]:
    """The full (non-streaming) 200 body."""
    if answer.blocked:
        prompt = req.prompt_tokens
        return {
            "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
            "usageMetadata": {"promptTokenCount": prompt, "totalTokenCount": prompt},
            "modelVersion": model,
            "responseId": resp_id,
        }
    return {
        "candidates": [candidate(answer, answer.text, final=True)],
        "usageMetadata": _usage(req, answer, answer.text or "", True, tier),
        "modelVersion": model,
        "responseId": resp_id,
    }


def stream_chunks(
    req: ParsedRequest, answer: Answer, model: str, resp_id: str, tier: str, pieces: int = 3
) -> list[dict[str, Any]]:
    """The SSE chunks of a streamed answer: cumulative usage, finishReason only on the last."""
    if answer.blocked or not answer.text:
        return [success_body(req, answer, model, resp_id, tier)]
    text = answer.text
    step = max(1, math.ceil(len(text) / pieces))
    slices = [text[i : i + step] for i in range(0, len(text), step)]
    chunks: list[dict[str, Any]] = []
    sent = 0
    for index, piece in enumerate(slices):
        final = index == len(slices) - 1
        sent += len(piece)
        # the thought part only rides on the first chunk
        cand = candidate(answer, piece, final=final, with_thought=index == 0)
        chunks.append(
            {
                "candidates": [cand],
                "usageMetadata": _usage(req, answer, text[:sent], final, tier),
                "modelVersion": model,
                "responseId": resp_id,
            }
        )
    return chunks
