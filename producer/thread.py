"""Threads: a job that continues a succeeded one (``continue_from``), checked at enqueue.

The request sent is the parent's contents, the parent's answer exactly as returned (thought
signatures and function-call ids untouched), then the new turn; ``FlexQueue`` assembles it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from producer.errors import InvalidRequestError, first_error, one_line
from producer.request import JOB_ID_RE, GenerateRequest, sdk_types


class ContinueRequest(BaseModel):
    """A new turn of a thread: ``continue_from`` a succeeded job, with ``prompt`` or ``parts``.

    The request sent is the parent's contents, the parent's answer exactly as returned (thought
    signatures and function-call ids untouched), then this turn. Model, system instruction and config
    are the parent's unless given here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    continue_from: str = Field(description="the id of the succeeded job this turn follows")
    prompt: str | None = Field(default=None, description="the new user turn as text")
    parts: list[dict[str, Any]] | None = Field(
        default=None, description="the new user turn as Gemini `Part`s, e.g. `function_response` parts"
    )
    model: str | None = Field(default=None, description="another model than the parent's")
    system_instruction: str | dict[str, Any] | None = Field(default=None, description="replaces the parent's")
    config: dict[str, Any] | None = Field(default=None, description="replaces the parent's config")

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        return None if value is None else GenerateRequest._model_name(value)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return GenerateRequest._prompt(value)

    @field_validator("continue_from")
    @classmethod
    def _parent_id(cls, value: str) -> str:
        if not JOB_ID_RE.fullmatch(value):
            raise ValueError("must be a job id: 1-128 letters, digits, '.', '_', ':' or '-'")
        return value

    @field_validator("parts")
    @classmethod
    def _parts(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must hold at least one Part")
        try:
            sdk_types().Content.model_validate({"role": "user", "parts": value})
        except ValidationError as err:
            raise ValueError(f"are not Gemini Parts: {one_line(err)}") from None
        return value

    @field_validator("system_instruction")
    @classmethod
    def _system(cls, value: str | dict[str, Any] | None, info: ValidationInfo) -> str | dict[str, Any] | None:
        return GenerateRequest._system_instruction(value, info)

    @field_validator("config")
    @classmethod
    def _config(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return GenerateRequest._config(value, info)

    @model_validator(mode="after")
    def _prompt_xor_parts(self) -> ContinueRequest:
        if (self.prompt is None) == (self.parts is None):
            raise ValueError("a continuation gives exactly one of 'prompt' (text) or 'parts' (Gemini Parts)")
        return self

    def turn(self) -> dict[str, Any]:
        """The new user turn as a Content."""
        parts = self.parts if self.parts is not None else [{"text": self.prompt}]
        return {"role": "user", "parts": parts}


def parse_continue(data: Any) -> ContinueRequest:
    """Validate a continuation; ``InvalidRequestError`` naming the field."""
    try:
        return ContinueRequest.model_validate(data)
    except ValidationError as err:
        loc, message, kind = first_error(err)
        if kind == "extra_forbidden":
            message = "unknown field (a continuation allows: continue_from, prompt, parts, model, " \
                      "system_instruction, config)"
        raise InvalidRequestError(f"{loc}: {message}" if loc else message, field=loc or None) from None


def thread_contents(parent: GenerateRequest, answer: dict[str, Any], turn: dict[str, Any]) -> list[dict[str, Any]]:
    """The contents of the request that continues ``parent`` whose answer was ``answer`` (a Content)."""
    earlier = parent.contents if parent.contents is not None else [{"role": "user", "parts": [{"text": parent.prompt}]}]
    return [*earlier, {**answer, "role": answer.get("role") or "model"}, turn]
