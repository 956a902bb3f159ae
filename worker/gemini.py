"""The Gemini seam: one google-genai async client per worker process, one call per attempt.

It turns a ``GenerateRequest`` into an SDK call on the chosen tier, and the SDK's response into
plain data. It does not decide anything: exceptions propagate to the policy.

Two APIs: the Gemini API (an API key; the tier in the body's ``serviceTier``, the served tier in the
``x-gemini-service-tier`` header) and Vertex AI (``FLEXQ_VERTEX``: flex asked for with a header,
never the body field, and the served tier read from ``usageMetadata.trafficType``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import google.auth.credentials
from google import genai
from google.genai import types

from producer.blobs import REF, Blob, image_size
from producer.errors import ConfigError
from producer.models import FunctionCall, ImageRef, JobResult, Usage
from producer.request import GenerateRequest
from producer.status import Tier
from worker.config import ChannelConfig, WorkerConfig

#: The header carrying the tier the API actually served (the SDK drops usageMetadata.serviceTier).
SERVED_TIER_HEADER = "x-gemini-service-tier"
NO_RETRIES = types.HttpRetryOptions(attempts=1)
#: How Vertex AI is asked for flex. Its body ``serviceTier`` is no way: ``"flex"`` is refused with a 400, and
#: ``"SERVICE_TIER_FLEX"`` is accepted and billed at the standard rate (docs/gemini-wire.md, "Vertex AI").
VERTEX_TIER_HEADER = "X-Vertex-AI-LLM-Shared-Request-Type"
#: The Gemini API's body ``serviceTier`` per tier (the API serves priority past its limit at standard).
SERVICE_TIERS: dict[Tier, types.ServiceTier] = {
    Tier.FLEX: types.ServiceTier.FLEX, Tier.STANDARD: types.ServiceTier.STANDARD,
    Tier.PRIORITY: types.ServiceTier.PRIORITY,
}
#: Vertex AI's ``usageMetadata.trafficType`` -> the tier an attempt records as served.
TRAFFIC_TIERS: dict[str, str] = {
    "ON_DEMAND_FLEX": "flex",
    "ON_DEMAND": "standard",
    "ON_DEMAND_PRIORITY": "priority",
    "PROVISIONED_THROUGHPUT": "provisioned",
}


@dataclass(frozen=True)
class Answer:
    """A 200 response, reduced to plain data: what a job record keeps, blobs set apart."""

    has_candidates: bool
    finish_reason: str | None
    block_reason: str | None
    text: str | None
    usage: Usage
    model_version: str | None
    served_tier: str | None
    finish_message: str | None = None
    content: dict[str, Any] | None = None  # first candidate's Content, inline bytes as blob references
    blobs: tuple[Blob, ...] = ()  # the bytes those references point at (images...)
    images: tuple[ImageRef, ...] = ()
    function_calls: tuple[FunctionCall, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)  # safety, citations, grounding, response id, ...
    candidates: tuple[dict[str, Any], ...] = ()  # the other candidates, same shape

    def result(self, tier: str, parsed: Any = None) -> JobResult:
        return JobResult(
            text=self.text, finish_reason=self.finish_reason, usage=self.usage, model_version=self.model_version,
            tier=self.served_tier or tier, finish_message=self.finish_message, content=self.content,
            function_calls=list(self.function_calls), images=list(self.images), parsed=parsed,
            candidates=list(self.candidates), **self.extras,
        )


def check_channels(settings: WorkerConfig) -> None:
    """Fail fast, naming what to set, when a channel cannot make a call (its key's variable unset; without
    ``FLEXQ_CHANNELS``: the top-level settings, as ``require_api_key``)."""
    if not settings.channels:
        require_api_key(settings)
        return
    for channel in settings.channels:
        channel.key()  # raises ConfigError naming the channel and the variable


def require_api_key(settings: WorkerConfig) -> str | None:
    """The API key the client is built with: ``GEMINI_API_KEY`` on the Gemini API, ``FLEXQ_VERTEX_API_KEY``
    in Vertex AI express mode, None on Vertex AI with a project (Application Default Credentials).
    Raises ConfigError, naming what to set, when the settings cannot make a call."""
    if settings.vertex:
        return _vertex_api_key(settings)
    if settings.vertex_project is not None or settings.vertex_api_key is not None:
        raise ConfigError(
            "FLEXQ_VERTEX_PROJECT or FLEXQ_VERTEX_API_KEY is set but FLEXQ_VERTEX is not: set FLEXQ_VERTEX=1 to "
            "call Gemini through Vertex AI, or unset them to use the Gemini API"
        )
    if settings.gemini_api_key is None or not settings.gemini_api_key.get_secret_value():
        raise ConfigError(
            "no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment, "
            "e.g. `export GEMINI_API_KEY=...`; for local runs use `flexq simulate` with GEMINI_BASE_URL"
        )
    return settings.gemini_api_key.get_secret_value()


def _vertex_api_key(settings: WorkerConfig) -> str | None:
    key = settings.vertex_api_key.get_secret_value() if settings.vertex_api_key is not None else ""
    if key and settings.vertex_project is not None:
        raise ConfigError(
            "FLEXQ_VERTEX_API_KEY and FLEXQ_VERTEX_PROJECT are both set: choose express mode (the API key) or "
            "the project with Application Default Credentials"
        )
    if not key and settings.vertex_project is None:
        raise ConfigError(
            "FLEXQ_VERTEX=1 needs FLEXQ_VERTEX_API_KEY (Vertex AI express mode) or FLEXQ_VERTEX_PROJECT (with "
            "Application Default Credentials, e.g. `gcloud auth application-default login`)"
        )
    return key or None


class GeminiClient:
    """Owns the SDK client. Create at worker start-up, ``aclose`` at shutdown.

    ``credentials`` replace Application Default Credentials in Vertex AI project mode (tests pass a
    fixed token); without them the SDK finds ADC at the first call.
    """

    def __init__(
        self, settings: WorkerConfig, credentials: google.auth.credentials.Credentials | None = None,
        channel: ChannelConfig | None = None,
    ) -> None:
        self._settings = settings
        if channel is None:  # the top-level settings' channel, checked with errors naming their variables
            api_key = require_api_key(settings)
            channel = settings.channel_list()[0]
        else:
            api_key = channel.key()
        self.channel = channel.name
        self._vertex = channel.kind == "vertex"
        version = channel.api_version or (settings.vertex_api_version if self._vertex else settings.api_version)
        http_options = types.HttpOptions(
            api_version=version,
            # Explicit: without retry_options the SDK silently sleeps 1-10 s and retries
            # aiohttp connection errors. Retries are the queue's job.
            retry_options=NO_RETRIES,
            timeout=_ms(settings.request_timeout_s),
        )
        if channel.base_url:
            http_options.base_url = channel.base_url
        if not self._vertex:
            # vertexai=False: the SDK's GOOGLE_GENAI_USE_VERTEXAI must not switch the API under flexq
            self._client = genai.Client(vertexai=False, api_key=api_key, http_options=http_options)
        elif api_key is not None:  # express mode: the project comes with the key
            self._client = genai.Client(vertexai=True, api_key=api_key, http_options=http_options)
        else:
            self._client = genai.Client(
                vertexai=True, project=channel.project, location=channel.location,
                credentials=credentials, http_options=http_options,
            )

    async def aclose(self) -> None:
        await self._client.aio.aclose()

    @property
    def sdk(self) -> genai.Client:
        """The SDK client (the Batch and Files APIs use it: worker.batch_tier)."""
        return self._client

    @property
    def vertex(self) -> bool:
        return self._vertex

    async def generate(self, request: GenerateRequest, *, tier: Tier, timeout_s: float) -> Answer:
        model, contents, config = sdk_call_args(request, vertex=self._vertex)
        headers: dict[str, str] | None = None
        if tier not in SERVICE_TIERS:
            raise ValueError(f"tier {str(tier)!r} is not called through generateContent (batch: the Batch API)")
        if self._vertex:  # the tier goes in a header; the body's serviceTier is refused or billed at standard
            config.service_tier = None
            headers = {VERTEX_TIER_HEADER: str(tier)} if tier in (Tier.FLEX, Tier.PRIORITY) else None
        else:
            config.service_tier = SERVICE_TIERS[tier]
        config.http_options = types.HttpOptions(timeout=_ms(timeout_s), retry_options=NO_RETRIES, headers=headers)
        # the queue never runs a function: a turn with function calls is an answer for the pipeline
        config.automatic_function_calling = types.AutomaticFunctionCallingConfig(disable=True)
        response = await self._client.aio.models.generate_content(model=model, contents=contents, config=config)
        return to_answer(response, vertex=self._vertex)


def sdk_call_args(request: GenerateRequest, *, vertex: bool = False) -> tuple[str, Any, types.GenerateContentConfig]:
    """The SDK's ``generate_content`` arguments for ``request`` as enqueued: model, contents, config (with the
    system instruction), and no tier, timeout or retry options (``generate`` adds those; the Batch API,
    worker.batch_tier, sends them as they are). Pure: the request's inline bytes must be filled in already."""
    config = types.GenerateContentConfig.model_validate(request.config or {})
    if request.system_instruction is not None:
        config.system_instruction = request.system_instruction  # type: ignore[assignment]
    contents: Any = request.prompt if request.prompt is not None else request.contents
    # on Vertex AI, "models/x" would be a project's own model resource, not Google's published one
    model = request.model.removeprefix("models/") if vertex else request.model
    return model, contents, config


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def to_answer(response: types.GenerateContentResponse, *, vertex: bool = False) -> Answer:
    """The response as plain data; the served tier from the header (Gemini API) or ``trafficType`` (Vertex AI)."""
    candidates = response.candidates or []
    first = candidates[0] if candidates else None
    finish_reason = _enum_name(first.finish_reason) if first is not None else None
    block_reason = None
    if response.prompt_feedback is not None and response.prompt_feedback.block_reason is not None:
        block_reason = _enum_name(response.prompt_feedback.block_reason)
    blobs: list[Blob] = []
    images: list[ImageRef] = []
    others: list[dict[str, Any]] = []
    content: dict[str, Any] | None = None
    for index, cand in enumerate(candidates):
        dumped = _content_json(cand.content, index, blobs, images)
        if index == 0:
            content = dumped
        else:
            others.append({"index": index, "content": dumped, "finish_reason": _enum_name(cand.finish_reason),
                           "finish_message": cand.finish_message, "text": _text(cand.content)})
    extras: dict[str, Any] = {"response_id": response.response_id}
    if response.prompt_feedback is not None:
        extras["prompt_feedback"] = _json(response.prompt_feedback)
    if first is not None:
        extras["safety_ratings"] = [_json(r) for r in first.safety_ratings] if first.safety_ratings else None
        for name in ("citation_metadata", "grounding_metadata", "url_context_metadata"):
            value = getattr(first, name)
            extras[name] = _json(value) if value is not None else None
    calls = [
        FunctionCall(id=p.function_call.id, name=p.function_call.name or "", args=dict(p.function_call.args or {}))
        for p in (first.content.parts or [] if first is not None and first.content is not None else [])
        if p.function_call is not None
    ]
    return Answer(
        has_candidates=bool(candidates),
        finish_reason=finish_reason,
        block_reason=block_reason,
        text=_text(first.content) if first is not None else None,
        usage=to_usage(response.usage_metadata),
        model_version=response.model_version,
        served_tier=traffic_tier(response) if vertex else served_tier(response),
        finish_message=first.finish_message if first is not None else None,
        content=content,
        blobs=tuple({b.sha256: b for b in blobs}.values()),
        images=tuple(images),
        function_calls=tuple(calls),
        extras=extras,
        candidates=tuple(others),
    )


def _json(value: Any) -> Any:
    return value.model_dump(mode="json", exclude_none=True)


def _text(content: types.Content | None) -> str | None:
    if content is None or not content.parts:
        return None
    pieces = [p.text for p in content.parts if p.text is not None and not p.thought]
    return "".join(pieces) if pieces else None


def _content_json(
    content: types.Content | None, candidate: int, blobs: list[Blob], images: list[ImageRef]
) -> dict[str, Any] | None:
    """The Content as the SDK dumps it (base64 for bytes), each inline blob replaced by its reference."""
    if content is None:
        return None
    dumped: dict[str, Any] = _json(content)
    for index, part in enumerate(content.parts or []):
        inline = part.inline_data
        if inline is None or inline.data is None:
            continue
        mime = inline.mime_type or "application/octet-stream"
        blob = Blob.of(inline.data, mime)
        blobs.append(blob)
        ref = {k: v for k, v in dumped["parts"][index]["inline_data"].items() if k != "data"}
        dumped["parts"][index]["inline_data"] = {**ref, "mime_type": mime, REF: blob.sha256}
        if mime.startswith("image/"):
            size = image_size(inline.data)
            images.append(ImageRef(
                index=len(images), candidate=candidate, part_index=index, mime_type=mime, bytes=len(inline.data),
                sha256=blob.sha256, width=size[0] if size else None, height=size[1] if size else None,
            ))
    return dumped


def _modalities(details: list[types.ModalityTokenCount] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in details or []:
        name = _enum_name(item.modality) or "UNSPECIFIED"
        out[name] = out.get(name, 0) + (item.token_count or 0)
    return out


def to_usage(meta: types.GenerateContentResponseUsageMetadata | None) -> Usage:
    if meta is None:
        return Usage()
    return Usage(
        prompt_tokens=meta.prompt_token_count or 0,
        output_tokens=meta.candidates_token_count or 0,
        thoughts_tokens=meta.thoughts_token_count or 0,
        total_tokens=meta.total_token_count or 0,
        cached_tokens=meta.cached_content_token_count or 0,
        tool_use_prompt_tokens=meta.tool_use_prompt_token_count or 0,
        prompt_details=_modalities(meta.prompt_tokens_details),
        output_details=_modalities(meta.candidates_tokens_details),
        traffic_type=_enum_name(meta.traffic_type),
    )


def served_tier(response: types.GenerateContentResponse) -> str | None:
    http = response.sdk_http_response
    if http is None or not http.headers:
        return None
    for name, value in http.headers.items():
        if name.lower() == SERVED_TIER_HEADER:
            return str(value).lower()
    return None


def traffic_tier(response: types.GenerateContentResponse) -> str | None:
    """Vertex AI's served tier: ``usageMetadata.trafficType`` as a tier (an unknown type in lower case)."""
    meta = response.usage_metadata
    traffic = _enum_name(meta.traffic_type) if meta is not None else None
    if not traffic or traffic == "TRAFFIC_TYPE_UNSPECIFIED":
        return None
    return TRAFFIC_TIERS.get(traffic, traffic.lower())


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "value", value)
    return str(name)
