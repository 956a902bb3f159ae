"""What a worker needs beyond a producer: the Gemini endpoint, retries, leases, flow control.

``WorkerConfig`` extends ``producer.settings.ProducerSettings`` (a worker reads and writes the same
queue); a web app never sees these fields. Environment variables are the field names behind
``FLEXQ_`` (``FLEXQ_CONCURRENCY``), except the key and endpoint, which keep the names the Gemini
tooling uses (``GEMINI_API_KEY`` or ``GOOGLE_API_KEY``, ``GEMINI_BASE_URL``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveInt, SecretStr, field_validator

from producer.models import MODEL_RE
from producer.settings import ProducerSettings


class Limits(BaseModel):
    """RPM/TPM quotas of one model (tokens are estimated at admission and corrected with usage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None


def flow_model(model: str) -> str:
    """The name flow state is kept under: ``models/gemini-2.5-flash`` is ``gemini-2.5-flash``."""
    return model.removeprefix("models/")


class WorkerConfig(ProducerSettings):
    """Settings of a worker (``flexq worker``, ``flexq batch``), read from the environment."""

    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY", "gemini_api_key"),
        description="the Gemini API key (never shown in logs, records or errors)",
    )
    gemini_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_BASE_URL", "gemini_base_url"),
        description="another Gemini-compatible endpoint, e.g. the bundled simulator",
    )
    api_version: str = Field(default="v1beta", description="the Gemini API version in the request path")
    request_timeout_s: float = Field(
        default=900.0, gt=0, allow_inf_nan=False, description="longest one call may take (flex queues for minutes)"
    )
    retry_base_s: float = Field(default=5.0, ge=0, allow_inf_nan=False, description="first retry delay (full jitter)")
    retry_max_s: float = Field(default=600.0, ge=0, allow_inf_nan=False, description="longest retry delay")
    max_flex_attempts: int | None = Field(
        default=None, ge=1, description="flex attempts before a fallback job escalates to standard (unset: none)"
    )
    lease_s: float = Field(
        default=60.0, ge=1, allow_inf_nan=False, description="a dead worker's jobs are taken over after this"
    )
    concurrency: int = Field(default=100, ge=1, description="jobs one worker process runs at once")
    max_interrupts: int = Field(
        default=5, ge=1, description="a job whose worker died this many times mid-attempt fails"
    )
    flow: bool = Field(default=True, description="shared flow control (docs/flow-control.md)")
    flow_initial: float = Field(default=32.0, ge=1, description="concurrency limit per model and tier at first")
    flow_min: float = Field(default=1.0, ge=1, description="...never below")
    flow_max: float = Field(default=1000.0, ge=1, description="...never above (all workers together)")
    flow_decrease: float = Field(
        default=0.9, gt=0, lt=1, description="factor when 503s jump with hardly an answer (cold start, outage)"
    )
    breaker_min_failures: int = Field(default=20, ge=1, description="the breaker opens on at least this many...")
    breaker_failure_ratio: float = Field(
        default=0.75, gt=0, le=1, description="...making up this share of recent outcomes and calls in flight"
    )
    breaker_cool_down_s: float = Field(
        default=10.0, gt=0, allow_inf_nan=False, description="open this long (doubling while it re-opens)"
    )
    limits: dict[str, Limits] = Field(
        default_factory=dict,
        description='per-model quotas as JSON, e.g. {"gemini-2.5-flash": {"rpm": 1000, "tpm": 1000000}}',
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="worker logs: JSON lines off a terminal, readable lines on one"
    )

    @field_validator("limits")
    @classmethod
    def _limit_models(cls, value: dict[str, Limits]) -> dict[str, Limits]:
        out: dict[str, Limits] = {}
        for model, limits in value.items():
            if not MODEL_RE.fullmatch(model):
                raise ValueError(f"{model!r} is not a model name such as 'gemini-2.5-flash'")
            if flow_model(model) in out:
                raise ValueError(f"model {flow_model(model)!r} is given twice")
            out[flow_model(model)] = limits
        return out

    @property
    def job_timeout_s(self) -> float:
        """arq's job timeout: the request timeout plus room to record the attempt."""
        return self.request_timeout_s + 60.0

    @property
    def secrets(self) -> list[str]:
        """Values that must never be printed: the API key and the Redis password."""
        from urllib.parse import urlsplit

        values = [self.gemini_api_key.get_secret_value() if self.gemini_api_key else None,
                  urlsplit(self.redis_url.get_secret_value()).password]
        return [value for value in values if value]
