"""A scripted stand-in for the Gemini seam (``worker.gemini.GeminiClient``), and SDK errors to script.

``ScriptedGemini`` answers each ``generate`` call with the next step of a script: an ``Answer``,
an exception to raise, or an async callable (to block on an event, or to act mid-call). A call
past the end of the script fails the test. ``by_prompt`` scripts per prompt, for batch runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.genai import errors as genai_errors

from producer.models import Usage
from producer.request import GenerateRequest
from producer.status import Tier
from worker.gemini import Answer

USAGE = Usage(prompt_tokens=100, output_tokens=20, thoughts_tokens=30, total_tokens=150)

Step = Answer | BaseException | Callable[[GenerateRequest, Tier], Awaitable[Answer]]


def answer(
    text: str | None = "Hello",
    *,
    finish_reason: str | None = "STOP",
    block_reason: str | None = None,
    has_candidates: bool = True,
    usage: Usage = USAGE,
    model_version: str | None = "gemini-2.5-flash-001",
    served_tier: str | None = "flex",
) -> Answer:
    return Answer(
        has_candidates=has_candidates, finish_reason=finish_reason, block_reason=block_reason, text=text,
        usage=usage, model_version=model_version, served_tier=served_tier,
    )


def error_body(code: int, status: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def overloaded() -> genai_errors.ServerError:
    return genai_errors.ServerError(503, error_body(503, "UNAVAILABLE", "The model is overloaded."))


def server_error(code: int = 500) -> genai_errors.ServerError:
    return genai_errors.ServerError(code, error_body(code, "INTERNAL", "An internal error has occurred."))


def client_error(code: int, status: str = "INVALID_ARGUMENT", message: str = "bad request") -> genai_errors.ClientError:
    return genai_errors.ClientError(code, error_body(code, status, message))


def rate_limited(
    retry_delay: str | None = "7s", quota_id: str = "GenerateRequestsPerMinutePerProjectPerModel"
) -> genai_errors.ClientError:
    """A 429 as the API sends it: RetryInfo (when ``retry_delay``) and a QuotaFailure naming ``quota_id``."""
    details: list[Any] = [{
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaMetric": "generativelanguage.googleapis.com/requests", "quotaId": quota_id}],
    }]
    if retry_delay is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    return genai_errors.ClientError(429, error_body(429, "RESOURCE_EXHAUSTED", "You exceeded your quota.", details))


@dataclass(frozen=True)
class Call:
    request: GenerateRequest
    tier: Tier
    timeout_s: float


@dataclass
class ScriptedGemini:
    """Plays a script of answers and errors, one step per call; records every call."""

    steps: deque[Step] = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    closed: bool = False

    @classmethod
    def of(cls, *steps: Step) -> ScriptedGemini:
        return cls(deque(steps))

    async def generate(self, request: GenerateRequest, *, tier: Tier, timeout_s: float) -> Answer:
        self.calls.append(Call(request, tier, timeout_s))
        assert self.steps, f"unexpected Gemini call #{len(self.calls)} (the script has ended)"
        step = self.steps.popleft()
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, Answer):
            return step
        return await step(request, tier)

    async def aclose(self) -> None:
        self.closed = True

    @property
    def tiers(self) -> list[Tier]:
        return [call.tier for call in self.calls]


@dataclass
class PromptGemini:
    """Scripts per prompt text: each prompt plays its own list of steps, then answers ``answer for: …``."""

    scripts: dict[str, deque[Step]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    @classmethod
    def of(cls, scripts: Mapping[str, Iterable[Step]]) -> PromptGemini:
        return cls({prompt: deque(steps) for prompt, steps in scripts.items()})

    async def generate(self, request: GenerateRequest, *, tier: Tier, timeout_s: float) -> Answer:
        self.calls.append(Call(request, tier, timeout_s))
        prompt = request.text_for_estimate()
        script = self.scripts.get(prompt)
        if script:
            step = script.popleft()
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, Answer):
                return step
            return await step(request, tier)
        return answer(f"answer for: {prompt}", served_tier=str(tier))

    def prompts(self) -> list[str]:
        return [call.request.text_for_estimate() for call in self.calls]
