"""What a worker needs beyond a producer: the Gemini endpoint, retries, leases, flow control.

``WorkerConfig`` extends ``producer.settings.ProducerSettings`` (a worker reads and writes the same
queue); a web app never sees these fields. Environment variables are the field names behind
``FLEXQ_`` (``FLEXQ_CONCURRENCY``), except the key and endpoint, which keep the names the Gemini
tooling uses (``GEMINI_API_KEY`` or ``GOOGLE_API_KEY``, ``GEMINI_BASE_URL``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)

from producer.errors import ConfigError
from producer.request import CHANNEL_RE, DEFAULT_CHANNEL, MODEL_RE
from producer.settings import ProducerSettings


class Limits(BaseModel):
    """RPM/TPM quotas of one model (tokens are estimated at admission and corrected with usage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None


class BudgetLimits(BaseModel):
    """Spending limits of one budget scope in USD, per UTC calendar day and month (either optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    day: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    month: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class ChannelConfig(BaseModel):
    """One way to reach Gemini (``FLEXQ_CHANNELS``): an AI Studio key, a Vertex AI project, or a
    Gemini-compatible relay. Each has its own flow-control scope, breaker and 429 pause."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the channel's name, recorded on each attempt")
    kind: Literal["gemini", "vertex", "relay"] = Field(
        default="gemini", description="`gemini` (AI Studio key), `vertex` (Vertex AI), `relay` (Gemini API wire at "
        "`base_url`)"
    )
    api_key: SecretStr | None = Field(default=None, description="the key itself (prefer `api_key_env`)")
    api_key_env: str | None = Field(
        default=None, pattern=r"[A-Za-z_][A-Za-z0-9_]*", description="the environment variable holding the key"
    )
    base_url: str | None = Field(default=None, min_length=1, description="another endpoint (needed by `relay`)")
    api_version: str | None = Field(default=None, min_length=1, description="the API version in the request path")
    project: str | None = Field(default=None, min_length=1, description="`vertex`: the project (ADC)")
    location: str = Field(default="global", min_length=1, description="`vertex`: the location")
    price_factor: float = Field(
        default=1.0, gt=0, allow_inf_nan=False,
        description="what this channel charges relative to Google's list price (a relay's markup, a discount)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not CHANNEL_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a channel name (letters, digits, '_' and '-', up to 40)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ChannelConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError(f"channel {self.name!r}: give api_key or api_key_env, not both")
        if self.kind == "relay" and self.base_url is None:
            raise ValueError(f"channel {self.name!r}: a relay needs base_url")
        if self.kind == "vertex" and self.project is not None and self.has_key:
            raise ValueError(f"channel {self.name!r}: Vertex AI takes an API key (express mode) or a project, not both")
        if self.kind == "vertex" and self.project is None and not self.has_key:
            raise ValueError(f"channel {self.name!r}: Vertex AI needs project (ADC) or an API key (express mode)")
        if self.kind != "vertex" and self.project is not None:
            raise ValueError(f"channel {self.name!r}: project is for kind 'vertex'")
        if self.kind != "vertex" and not self.has_key:
            raise ValueError(f"channel {self.name!r}: needs api_key_env (or api_key)")
        return self

    @property
    def has_key(self) -> bool:
        return self.api_key is not None or self.api_key_env is not None

    def key(self) -> str | None:
        """The API key (read from ``api_key_env`` now); None when the channel has none."""
        import os

        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env, "")
            if not value:
                raise ConfigError(f"channel {self.name!r}: the environment variable {self.api_key_env} is not set")
            return value
        return None


#: A budget scope: the whole queue, or the jobs with one tag (``tenant=acme``).
BUDGET_SCOPE_RE = re.compile(r"queue|[^=\s]+=\S+")


def flow_model(model: str, channel: str | None = None) -> str:
    """The name flow state is kept under: ``models/gemini-2.5-flash`` is ``gemini-2.5-flash``; on a channel
    other than ``default``, ``gemini-2.5-flash@vx`` (each channel its own limit, breaker and pause)."""
    name = model.removeprefix("models/")
    return name if channel is None or channel == DEFAULT_CHANNEL else f"{name}@{channel}"


def limits_model(scope: str) -> str:
    """The model a flow scope (``gemini-2.5-flash@vx``) counts against in ``FLEXQ_LIMITS``."""
    return scope.partition("@")[0]


class WorkerConfig(ProducerSettings):
    """Settings of a worker (``flexq worker``, ``flexq batch``), read from the environment."""

    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY", "gemini_api_key"),
        description="the Gemini API key, needed by workers (never shown in logs, records or errors)",
    )
    gemini_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_BASE_URL", "gemini_base_url"),
        description="another Gemini-compatible endpoint, e.g. the simulator at `http://127.0.0.1:8089`; "
        "unset: the real API",
    )
    api_version: str = Field(default="v1beta", description="the API version in the request path")
    vertex: bool = Field(
        default=False,
        description="call Gemini through Vertex AI instead of the Gemini API: flex is asked for with the "
        "`X-Vertex-AI-LLM-Shared-Request-Type: flex` header and the served tier read from `trafficType`. Needs "
        "`FLEXQ_VERTEX_API_KEY` (express mode) or `FLEXQ_VERTEX_PROJECT` (Application Default Credentials), "
        "not both; `GEMINI_API_KEY` is not used",
    )
    vertex_project: str | None = Field(
        default=None, min_length=1,
        description="with `FLEXQ_VERTEX`: the Google Cloud project, authenticated with Application Default "
        "Credentials (`gcloud auth application-default login`, a service account, the metadata server)",
    )
    vertex_location: str = Field(
        default="global", min_length=1,
        description="with `FLEXQ_VERTEX_PROJECT`: the Vertex AI location; flex is served on `global` only",
    )
    vertex_api_key: SecretStr | None = Field(
        default=None,
        description="with `FLEXQ_VERTEX`: a Vertex AI API key (express mode; a Gemini API key does not work "
        "there); never shown in logs, records or errors",
    )
    vertex_api_version: str = Field(
        default="v1beta1", min_length=1,
        description="with `FLEXQ_VERTEX`: the Vertex AI API version in the request path (`FLEXQ_API_VERSION` is "
        "the Gemini API's)",
    )
    channels: list[ChannelConfig] = Field(
        default_factory=list,
        description='ways to reach Gemini, tried in this order (cheapest first), as JSON, e.g. `[{"name": "studio", '
        '"api_key_env": "STUDIO_KEY"}, {"name": "vx", "kind": "vertex", "project": "my-proj"}, {"name": "relay", '
        '"kind": "relay", "base_url": "https://relay.example", "api_key_env": "RELAY_KEY", "price_factor": 1.1}]`. '
        "Each has its own flow control, breaker and 429 pause; an attempt skips a channel whose breaker is open or "
        "that is paused. Unset: one channel, `default`, from `GEMINI_API_KEY`/`GEMINI_BASE_URL`/`FLEXQ_VERTEX*`",
    )
    request_timeout_s: float = Field(
        default=900.0, gt=0, allow_inf_nan=False,
        description="timeout of one call in seconds, capped at the time left before the deadline; arq's job "
        "timeout is this plus 60 s",
    )
    retry_base_s: float = Field(
        default=5.0, ge=0, allow_inf_nan=False, description="backoff base in seconds (exponential, full jitter)"
    )
    retry_max_s: float = Field(
        default=600.0, ge=0, allow_inf_nan=False,
        description="backoff cap in seconds; also the least wait after a billing 429",
    )
    max_flex_attempts: int | None = Field(
        default=None, ge=1,
        description="with fallback `standard`: flex attempts after which a job moves to the standard tier (unset: "
        "only once the next flex retry would pass the deadline)",
    )
    lease_s: float = Field(
        default=60.0, ge=1, allow_inf_nan=False,
        description="lease on a running job in seconds, renewed every third of it: a dead worker's job is taken "
        "over within this; also the TTL of flow-control permits",
    )
    concurrency: int = Field(default=100, ge=1, description="jobs one worker process runs at once (arq's `max_jobs`)")
    max_interrupts: int = Field(
        default=5, ge=1, description="a job whose attempts were cut short this many times fails with `interrupted`"
    )
    max_output_retries: int = Field(
        default=2, ge=0,
        description="re-asks after an answer that is unusable as asked (`no_image`: an image request answered "
        "without one; `invalid_output`: JSON that does not parse or fit the schema); then the job fails",
    )
    cache_ttl_s: int = Field(
        default=24 * 3600, ge=0,
        description="how long a fresh answer to a job that opted in to the response cache is kept for identical "
        "requests (0: answers are not cached)",
    )
    batch_pack_s: float = Field(
        default=60.0, gt=0, allow_inf_nan=False,
        description="`batch`-tier jobs wait at most this long to be packed together into one Gemini Batch API job",
    )
    batch_max_jobs: int = Field(
        default=1000, ge=1, description="most jobs packed into one Batch API job (a full pack is sent at once)"
    )
    batch_poll_s: float = Field(
        default=60.0, gt=0, allow_inf_nan=False,
        description="how often a Batch API job's state is polled (one poll per batch, whatever its size)",
    )
    unreachable_fail_s: float = Field(
        default=900.0, ge=0, allow_inf_nan=False,
        description="a job whose every attempt so far was a connection error (DNS, refused, reset), for at least "
        "this long since its first, fails with `unreachable` and that error instead of retrying to its deadline "
        "(0: never; 503s and timeouts never count)",
    )
    redis_outage_s: float = Field(
        default=600.0, gt=0, allow_inf_nan=False,
        description="how long a worker keeps trying to record an ended attempt (a paid answer, maybe) while "
        "Redis is unreachable, before it gives up on that write",
    )
    allow_eviction: bool = Field(
        default=False,
        description="start even if Redis's `maxmemory-policy` is not `noeviction` (records and schedules may "
        "then be evicted: jobs lost)",
    )
    flow: bool = Field(default=True, description="shared flow control on, or off with `0` or `false`")
    flow_initial: float = Field(
        default=32.0, ge=1,
        description="concurrency limit of a (model, tier), all workers together, before anything is learned",
    )
    flow_min: float = Field(default=1.0, ge=1, description="lowest the concurrency limit goes")
    flow_max: float = Field(default=1000.0, ge=1, description="highest the concurrency limit goes")
    flow_decrease: float = Field(
        default=0.9, gt=0, lt=1,
        description="factor on the limit when 503s jump while hardly anything is answered (cold start, outage)",
    )
    breaker_min_failures: int = Field(default=20, ge=1, description="fewest failures in 10 s that open the breaker")
    breaker_failure_ratio: float = Field(
        default=0.75, gt=0, le=1,
        description="least share of recent outcomes the failures must be (calls in flight count as not failed)",
    )
    breaker_cool_down_s: float = Field(
        default=10.0, gt=0, allow_inf_nan=False,
        description="seconds the breaker stays open, doubled on each re-open (at most 300 s)",
    )
    limits: dict[str, Limits] = Field(
        default_factory=dict,
        description='per-model RPM/TPM quotas as JSON, e.g. `{"gemini-2.5-flash": {"rpm": 1000, "tpm": 1000000}}`',
    )
    budgets: dict[str, BudgetLimits] = Field(
        default_factory=dict,
        description='spending limits in USD per UTC day and month, for the whole queue (`queue`) or the jobs with '
        'a tag (`key=value`), as JSON, e.g. `{"queue": {"day": 20, "month": 400}, "tenant=acme": {"day": 5}}`; '
        "a job over one waits for the next window, or fails with `budget_exceeded` if that passes its deadline",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="worker logs: `auto` is JSON lines off a terminal and readable lines on one"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="worker log level: `info` is one `attempt` line per attempt; `debug` adds arq's own line per "
        "job run (start, deferral, end)",
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="serve this process's Prometheus metrics (attempts, latency histogram, calls in flight, "
        "tokens, cost) at `/metrics` on this port; unset: none. One port per process (two workers on one host "
        "need two); 0 is refused, as Prometheus could not find the port",
    )
    metrics_host: str = Field(
        default="127.0.0.1", min_length=1,
        description="address the worker's metrics port listens on; `0.0.0.0` in a container, for a Prometheus "
        "outside it (no TLS, no auth)",
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

    @field_validator("channels")
    @classmethod
    def _channel_names(cls, value: list[ChannelConfig]) -> list[ChannelConfig]:
        names = [channel.name for channel in value]
        if len(set(names)) != len(names):
            raise ValueError("a channel name is given twice")
        return value

    def channel_list(self) -> list[ChannelConfig]:
        """The configured channels, or the one ``default`` channel the top-level settings describe."""
        if self.channels:
            return list(self.channels)
        if self.vertex:
            return [ChannelConfig.model_construct(
                name=DEFAULT_CHANNEL, kind="vertex", api_key=self.vertex_api_key, api_key_env=None,
                base_url=self.gemini_base_url, api_version=self.vertex_api_version, project=self.vertex_project,
                location=self.vertex_location, price_factor=1.0,
            )]
        return [ChannelConfig.model_construct(
            name=DEFAULT_CHANNEL, kind="gemini", api_key=self.gemini_api_key, api_key_env=None,
            base_url=self.gemini_base_url, api_version=self.api_version, project=None, location="global",
            price_factor=1.0,
        )]

    @field_validator("budgets")
    @classmethod
    def _budget_scopes(cls, value: dict[str, BudgetLimits]) -> dict[str, BudgetLimits]:
        for scope, limits in value.items():
            if not BUDGET_SCOPE_RE.fullmatch(scope):
                raise ValueError(f"{scope!r} is not a budget scope: 'queue' or a tag such as 'tenant=acme'")
            if limits.day is None and limits.month is None:
                raise ValueError(f"budget {scope!r} has no limit: give 'day', 'month' or both")
        return value

    @property
    def job_timeout_s(self) -> float:
        """arq's job timeout: the request timeout plus room to record the attempt."""
        return self.request_timeout_s + 60.0

    @property
    def secrets(self) -> list[str]:
        """Values that must never be printed: the API keys and the Redis password."""
        from urllib.parse import urlsplit

        values = [self.gemini_api_key.get_secret_value() if self.gemini_api_key else None,
                  self.vertex_api_key.get_secret_value() if self.vertex_api_key else None,
                  urlsplit(self.redis_url.get_secret_value()).password]
        for channel in self.channels:
            with contextlib.suppress(ConfigError):  # an unset variable: nothing to hide
                values.append(channel.key())
        return [value for value in values if value]
