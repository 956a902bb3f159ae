"""The request contract: what a producer submits, validated at enqueue with an error naming the field.

Field names here are stable and documented in docs/producer-api.md; workers, the CLI and scripts read them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from producer.blobs import Blob, strip_inline
from producer.errors import InvalidRequestError, first_error, one_line
from producer.status import Tier

JOB_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MODEL_RE = re.compile(r"(?:models/|tunedModels/)?[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
#: A channel's name (``FLEXQ_CHANNELS``; a job's ``channels`` preference).
CHANNEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
#: The channel a worker without ``FLEXQ_CHANNELS`` calls through (its top-level key and endpoint).
DEFAULT_CHANNEL = "default"
#: Deepest nesting of lists and objects accepted in a request (the SDK and JSON parsers recurse).
MAX_DEPTH = 64
#: Config fields the queue owns: a request may not set them.
QUEUE_OWNED_CONFIG_FIELDS = {
    "service_tier": "the queue chooses the tier (flex, or standard on fallback)",
    "serviceTier": "the queue chooses the tier (flex, or standard on fallback)",
    "http_options": "the worker owns timeouts, retries and the endpoint",
    "httpOptions": "the worker owns timeouts, retries and the endpoint",
}


class GenerateRequest(BaseModel):
    """One generation request as submitted: ``prompt`` or ``contents``, never both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="model name, e.g. `gemini-2.5-flash` (a `models/` prefix is accepted)")
    prompt: str | None = Field(
        default=None, description="a text prompt; a request has exactly one of `prompt` and `contents`"
    )
    contents: list[dict[str, Any]] | None = Field(
        default=None, description="a list of Gemini `Content` objects (checked with the SDK's own types at enqueue)"
    )
    system_instruction: str | dict[str, Any] | None = Field(default=None, description="a string or a Gemini `Content`")
    config: dict[str, Any] | None = Field(
        default=None,
        description="a `GenerateContentConfig` as a dict; `service_tier` and `http_options` are refused "
        "(the queue sets the tier, timeouts and retries)",
    )

    #: Inline bytes taken out of ``contents`` at enqueue, not yet in the blob store (never serialised).
    _pending_blobs: list[Blob] = PrivateAttr(default_factory=list)

    @property
    def pending_blobs(self) -> list[Blob]:
        return self._pending_blobs

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not MODEL_RE.fullmatch(value):
            raise ValueError("must be a model name such as 'gemini-2.5-flash'")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    # The SDK's own models check contents and config at enqueue. A stored record was checked when it
    # was enqueued: reading it back (``JobRecord.from_json``) skips them, and so never imports the SDK.

    @field_validator("contents")
    @classmethod
    def _contents(cls, value: list[dict[str, Any]] | None, info: ValidationInfo) -> list[dict[str, Any]] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must hold at least one Content")
        if not _stored(info):
            sdk = sdk_types()
            for index, item in enumerate(value):
                try:
                    sdk.Content.model_validate(item)
                except ValidationError as err:
                    raise ValueError(f"item {index} is not a Gemini Content: {one_line(err)}") from None
        return value

    @field_validator("system_instruction")
    @classmethod
    def _system_instruction(
        cls, value: str | dict[str, Any] | None, info: ValidationInfo
    ) -> str | dict[str, Any] | None:
        if isinstance(value, dict) and not _stored(info):
            try:
                sdk_types().Content.model_validate(value)
            except ValidationError as err:
                raise ValueError(f"is not a Gemini Content: {one_line(err)}") from None
        return value

    @field_validator("config")
    @classmethod
    def _config(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return None
        for key, why in QUEUE_OWNED_CONFIG_FIELDS.items():
            if key in value:
                raise ValueError(f"{key!r} may not be set: {why}")
        if not _stored(info):
            try:
                sdk_types().GenerateContentConfig.model_validate(value)
            except ValidationError as err:
                raise ValueError(f"is not a GenerateContentConfig: {one_line(err)}") from None
            _check_json_schema(value.get("response_json_schema", value.get("responseJsonSchema")))
        return value

    @model_validator(mode="after")
    def _prompt_xor_contents(self) -> GenerateRequest:
        if (self.prompt is None) == (self.contents is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'contents' (a Gemini Content list)")
        return self

    def text_for_estimate(self) -> str:
        """All text in the request, for token estimates and simulator directives."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(
            part["text"]
            for content in self.contents or []
            for part in content.get("parts", []) or []
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )


def _check_json_schema(schema: Any) -> None:
    """A ``response_json_schema`` the worker could not check answers against is refused at enqueue."""
    if schema is None:
        return
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.exceptions.SchemaError as err:
        raise ValueError(f"response_json_schema is not a valid JSON Schema: {err.message}") from None


#: Validation context of a record read back from the store: its request was checked at enqueue.
STORED = {"stored": True}


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("stored"))


def sdk_types() -> Any:
    """google.genai.types, imported on first use (about 0.7 s): only enqueue and the worker need it."""
    from google.genai import types

    return types


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep lists and dicts nest in ``value`` (iterative; stops counting past ``limit``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


#: The tiers a job may ask for, as written in a request.
TIERS = tuple(str(t) for t in Tier)


def check_tier(value: object) -> Tier:
    """A job's tier: ``flex``, ``standard``, ``priority`` or ``batch``; else an error naming the field."""
    if isinstance(value, str) and value in TIERS:
        return Tier(value)
    raise InvalidRequestError(f"tier: must be one of {', '.join(map(repr, TIERS))}, not {value!r}", field="tier")


def check_channels(value: Sequence[str] | None) -> list[str] | None:
    """A job's channel preference: distinct channel names, at least one; None: every channel."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidRequestError("channels: must be a list of channel names", field="channels")
    names = list(value)
    if not names:
        raise InvalidRequestError("channels: must name at least one channel (or be left out: all)", field="channels")
    for name in names:
        if not isinstance(name, str) or not CHANNEL_RE.fullmatch(name):
            raise InvalidRequestError(
                f"channels: {name!r} is not a channel name (letters, digits, '_' and '-', up to 40)", field="channels"
            )
    if len(set(names)) != len(names):
        raise InvalidRequestError("channels: a channel is named twice", field="channels")
    return names


def check_tags(tags: Any) -> dict[str, str]:
    """Tags are an object of strings; ``InvalidRequestError`` naming the first that is not."""
    if not isinstance(tags, dict):
        raise InvalidRequestError("tags: must be an object of strings", field="tags")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequestError(f"tags: {str(key)[:40]!r} must map a string to a string", field="tags")
    return dict(tags)


def parse_request(
    data: Any, *, max_bytes: int, max_blob_bytes: int | None = None, max_job_blob_bytes: int | None = None
) -> GenerateRequest:
    """Validate a request (a dict or a ``GenerateRequest``); raise ``InvalidRequestError`` naming the field.

    Inline data in ``contents`` comes back as blob references, the bytes in ``request.pending_blobs``
    (the store writes them with the record); ``max_bytes`` applies to the request without them.
    """
    if isinstance(data, GenerateRequest):
        request = data
    else:
        if not isinstance(data, dict):
            raise InvalidRequestError("a request must be a JSON object", field=None)
        if nesting_depth(data) > MAX_DEPTH:
            raise InvalidRequestError(f"request: nested deeper than {MAX_DEPTH} levels", field="request")
        try:
            request = GenerateRequest.model_validate(data)
        except ValidationError as err:
            loc, message, kind = first_error(err)
            field = loc or None
            if kind == "extra_forbidden":
                message = "unknown field (allowed: model, prompt, contents, system_instruction, config)"
            if kind == "missing":
                message = "is required"
            raise InvalidRequestError(f"{field}: {message}" if field else message, field=field) from None
    if request.contents is not None:
        contents, blobs = strip_inline(
            request.contents, max_part_bytes=max_blob_bytes, max_total_bytes=max_job_blob_bytes
        )
        if blobs:
            request = request.model_copy(update={"contents": contents})
            request._pending_blobs = blobs
    size = len(request.model_dump_json(exclude_none=True).encode())
    if size > max_bytes:
        raise InvalidRequestError(
            f"request: {size} bytes is over the {max_bytes}-byte limit (FLEXQ_MAX_REQUEST_BYTES)",
            field="request",
        )
    return request


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise InvalidRequestError(
            "job_id: must be 1-128 characters of letters, digits, '.', '_', ':' or '-'", field="job_id"
        )
    return job_id
