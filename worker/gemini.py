"""The Gemini seam: one google-genai async client per worker process, one call per attempt.

It turns a ``GenerateRequest`` into an SDK call on the chosen tier, and the SDK's response into
plain data. It does not decide anything: exceptions propagate to the policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from google import genai
from google.genai import types

from producer.errors import ConfigError
from producer.models import Usage
from producer.request import GenerateRequest
from producer.status import Tier
from worker.config import WorkerConfig

#: The header carrying the tier the API actually served (the SDK drops usageMetadata.serviceTier).
SERVED_TIER_HEADER = "x-gemini-service-tier"
NO_RETRIES = types.HttpRetryOptions(attempts=1)


@dataclass(frozen=True)
class Answer:
    """A 200 response, reduced to what a job record keeps."""

    has_candidates: bool
    finish_reason: str | None
    block_reason: str | None
    text: str | None
    usage: Usage
    model_version: str | None
    served_tier: str | None


def require_api_key(settings: WorkerConfig) -> str:
    if settings.gemini_api_key is None or not settings.gemini_api_key.get_secret_value():
        raise ConfigError(
            "no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment, "
            "e.g. `export GEMINI_API_KEY=...`; for local runs use `flexq simulate` with GEMINI_BASE_URL"
        )
    return settings.gemini_api_key.get_secret_value()


class GeminiClient:
    """Owns the SDK client. Create at worker start-up, ``aclose`` at shutdown."""

    def __init__(self, settings: WorkerConfig) -> None:
        self._settings = settings
        http_options = types.HttpOptions(
            api_version=settings.api_version,
            # Explicit: without retry_options the SDK silently sleeps 1-10 s and retries
            # aiohttp connection errors. Retries are the queue's job.
            retry_options=NO_RETRIES,
            timeout=_ms(settings.request_timeout_s),
        )
        if settings.gemini_base_url:
            http_options.base_url = settings.gemini_base_url
        self._client = genai.Client(api_key=require_api_key(settings), http_options=http_options)

    async def aclose(self) -> None:
        await self._client.aio.aclose()

    async def generate(self, request: GenerateRequest, *, tier: Tier, timeout_s: float) -> Answer:
        config = types.GenerateContentConfig.model_validate(request.config or {})
        config.service_tier = types.ServiceTier.FLEX if tier == Tier.FLEX else types.ServiceTier.STANDARD
        config.http_options = types.HttpOptions(timeout=_ms(timeout_s), retry_options=NO_RETRIES)
        if request.system_instruction is not None:
            config.system_instruction = request.system_instruction  # type: ignore[assignment]
        contents: Any = request.prompt if request.prompt is not None else request.contents
        response = await self._client.aio.models.generate_content(
            model=request.model, contents=contents, config=config
        )
        return to_answer(response)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def to_answer(response: types.GenerateContentResponse) -> Answer:
    candidates = response.candidates or []
    first = candidates[0] if candidates else None
    finish_reason = _enum_name(first.finish_reason) if first is not None else None
    block_reason = None
    if response.prompt_feedback is not None and response.prompt_feedback.block_reason is not None:
        block_reason = _enum_name(response.prompt_feedback.block_reason)
    text = None
    if first is not None and first.content is not None and first.content.parts:
        pieces = [p.text for p in first.content.parts if p.text is not None and not p.thought]
        text = "".join(pieces) if pieces else None
    meta = response.usage_metadata
    usage = Usage(
        prompt_tokens=(meta.prompt_token_count or 0) if meta else 0,
        output_tokens=(meta.candidates_token_count or 0) if meta else 0,
        thoughts_tokens=(meta.thoughts_token_count or 0) if meta else 0,
        total_tokens=(meta.total_token_count or 0) if meta else 0,
    )
    return Answer(
        has_candidates=bool(candidates),
        finish_reason=finish_reason,
        block_reason=block_reason,
        text=text,
        usage=usage,
        model_version=response.model_version,
        served_tier=served_tier(response),
    )


def served_tier(response: types.GenerateContentResponse) -> str | None:
    http = response.sdk_http_response
    if http is None or not http.headers:
        return None
    for name, value in http.headers.items():
        if name.lower() == SERVED_TIER_HEADER:
            return str(value).lower()
    return None


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "value", value)
    return str(name)
