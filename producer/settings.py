"""One settings class: every tunable named once, with its unit and default.

Precedence: explicit argument > environment variable > default. Secrets are ``SecretStr`` so
that a repr, a log line or an exception never shows them.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


class FlexqSettings(BaseSettings):
    """Configuration of producers, workers and the admin CLI, read from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="", extra="ignore", populate_by_name=True, hide_input_in_errors=True, env_ignore_empty=True
    )

    redis_url: SecretStr = Field(
        default=SecretStr(DEFAULT_REDIS_URL), validation_alias=AliasChoices("REDIS_URL", "redis_url")
    )
    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY", "gemini_api_key")
    )
    gemini_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_BASE_URL", "gemini_base_url")
    )
    gemini_api_version: str = Field(
        default="v1beta", validation_alias=AliasChoices("FLEXQ_API_VERSION", "gemini_api_version")
    )
    queue: str = Field(
        default="flexq", validation_alias=AliasChoices("FLEXQ_QUEUE", "queue"), pattern=r"^[A-Za-z0-9._-]{1,64}$"
    )

    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, validation_alias=AliasChoices("FLEXQ_MAX_REQUEST_BYTES", "max_request_bytes")
    )
    retention_s: int = Field(
        default=7 * 24 * 3600, gt=0, validation_alias=AliasChoices("FLEXQ_RETENTION_S", "retention_s")
    )
    default_deadline_s: float = Field(
        default=24 * 3600.0, gt=0, validation_alias=AliasChoices("FLEXQ_DEADLINE_S", "default_deadline_s")
    )
    request_timeout_s: float = Field(
        default=900.0, gt=0, validation_alias=AliasChoices("FLEXQ_REQUEST_TIMEOUT_S", "request_timeout_s")
    )
    retry_base_s: float = Field(
        default=5.0, ge=0, validation_alias=AliasChoices("FLEXQ_RETRY_BASE_S", "retry_base_s")
    )
    retry_max_s: float = Field(
        default=600.0, ge=0, validation_alias=AliasChoices("FLEXQ_RETRY_MAX_S", "retry_max_s")
    )
    max_flex_attempts: int | None = Field(
        default=None, ge=1, validation_alias=AliasChoices("FLEXQ_MAX_FLEX_ATTEMPTS", "max_flex_attempts")
    )
    lease_s: float = Field(default=60.0, ge=1, validation_alias=AliasChoices("FLEXQ_LEASE_S", "lease_s"))
    concurrency: int = Field(
        default=100, ge=1, validation_alias=AliasChoices("FLEXQ_CONCURRENCY", "concurrency")
    )
    max_interrupts: int = Field(
        default=5, ge=1, validation_alias=AliasChoices("FLEXQ_MAX_INTERRUPTS", "max_interrupts")
    )
    # Flow control shared by all workers (worker/flow.py): shed-aware concurrency, breaker, 429 pauses, limits.
    flow: bool = Field(default=True, validation_alias=AliasChoices("FLEXQ_FLOW", "flow"))
    flow_initial: float = Field(default=32.0, ge=1, validation_alias=AliasChoices("FLEXQ_FLOW_INITIAL", "flow_initial"))
    flow_min: float = Field(default=1.0, ge=1, validation_alias=AliasChoices("FLEXQ_FLOW_MIN", "flow_min"))
    flow_max: float = Field(default=1000.0, ge=1, validation_alias=AliasChoices("FLEXQ_FLOW_MAX", "flow_max"))
    flow_decrease: float = Field(
        default=0.9, gt=0, lt=1, validation_alias=AliasChoices("FLEXQ_FLOW_DECREASE", "flow_decrease")
    )
    breaker_min_failures: int = Field(
        default=20, ge=1, validation_alias=AliasChoices("FLEXQ_BREAKER_MIN_FAILURES", "breaker_min_failures")
    )
    breaker_failure_ratio: float = Field(
        default=0.75, gt=0, le=1, validation_alias=AliasChoices("FLEXQ_BREAKER_FAILURE_RATIO", "breaker_failure_ratio")
    )
    breaker_cool_down_s: float = Field(
        default=10.0, gt=0, validation_alias=AliasChoices("FLEXQ_BREAKER_COOL_DOWN_S", "breaker_cool_down_s")
    )
    limits: str = Field(default="", validation_alias=AliasChoices("FLEXQ_LIMITS", "limits"))
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", validation_alias=AliasChoices("FLEXQ_LOG_FORMAT", "log_format")
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"REDIS_URL must start with redis://, rediss:// or unix:// (got {scheme!r}://)")
        return value

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL with any password replaced, safe for logs and error messages."""
        return redact_url(self.redis_url.get_secret_value())

    @property
    def job_timeout_s(self) -> float:
        """arq's job timeout: the request timeout plus room to record the attempt."""
        return self.request_timeout_s + 60.0


def redact_url(url: str) -> str:
    """Replace the user and password (in the authority or a ``password=`` query) with ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    base, qmark, query = rest.partition("?")
    authority, slash, path = base.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    if query:
        query = "&".join(
            f"{key}=***" if key.lower() in {"password", "username", "user"} else f"{key}{eq}{value}"
            for key, eq, value in (item.partition("=") for item in query.split("&"))
        )
    return f"{scheme}://{authority}{slash}{path}{qmark}{query}"
