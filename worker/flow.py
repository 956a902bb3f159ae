"""Flow control: its knobs and the pure pieces around the Lua scripts that implement it.

The rules that decide admission and learn the limit are the Lua scripts in ``worker/lua/`` (one
call per attempt start, one per end, run atomically in Redis and shared by every worker); they are
the only implementation. ``tests/flow_oracle.py`` models them in Python, and the tests check the
scripts against it. This module holds what the runner computes before and after a call: the token
estimate, the pause a 429 asks for, the deferral of a refused job, and the knobs (``FlowConfig``).

Per (model, tier), shared by every worker (docs/flow-control.md explains the why and the figures):
- a concurrency limit that tells **capacity shedding** (503s become more frequent above some
  in-flight level) from **load-independent shedding** (a steady share of calls shed whatever the
  load, as when the shared pool is busy with other customers). Only the first shrinks the limit;
  the second costs the shed call and nothing else: its permit goes to the next job in line.
- a circuit breaker: open when failures (5xx, timeouts, connection errors, load-independent 503s)
  are many and most of what happened lately; half-open after a cool-down, with one probe.
Per model (quotas are per project and model): a pause after a 429 (RetryInfo, or long for per-day
and billing quotas, which also raise a quota alert), and optional RPM/TPM limits (``FLEXQ_LIMITS``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from producer.request import GenerateRequest
from producer.status import Outcome
from worker.classify import QuotaKind
from worker.config import Limits, WorkerConfig
from worker.policy import DAILY_QUOTA_MIN_DELAY_S, RETRY_INFO_MARGIN_S

#: RPM/TPM quotas are per minute.
RATE_WINDOW_S = 60.0

BreakerEvent = Literal["success", "failure", "neutral"]
#: The outcomes the limit learns from: answers and 503s. Others leave it alone.
LIMIT_OUTCOMES = frozenset({Outcome.OK, Outcome.OVERLOADED})
#: The service answered: it is up (a 4xx or a safety block proves that too).
BREAKER_SUCCESS = frozenset(
    {Outcome.OK, Outcome.CLIENT_ERROR, Outcome.BLOCKED, Outcome.NO_IMAGE, Outcome.INVALID_OUTPUT}
)
BREAKER_FAILURE = frozenset({Outcome.OVERLOADED, Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR})
#: Admission refusals whose wait is unknown: retry soon, with jitter.
POLL_REASONS = frozenset({"probe_busy"})


@dataclass(frozen=True)
class FlowConfig:
    """Every knob, with its unit (``FLEXQ_FLOW_*`` settings map onto these one to one)."""

    initial_limit: float = 32.0  # permits per (model, tier) before anything is learned; slow start from here
    min_limit: float = 1.0  # never starve: one request always goes
    max_limit: float = 1000.0  # global cap per (model, tier), all workers together
    decrease_factor: float = 0.9  # decrease when the 503 rate jumps with nothing below to locate the step
    permit_ttl_s: float = 60.0  # a dead worker's permit frees itself after this; renew() every third
    permit_max_hold_s: float = 960.0  # renew() gives up on a permit this old (a release that never came)
    poll_min_s: float = 0.2  # deferral when the half-open probe slot is busy: uniform in [min, max]
    poll_max_s: float = 1.0
    wake_hold_s: float = 10.0  # a woken job's permit is held for it this long (no stale wake takes it: FIFO)
    waiter_timeout_s: float = 30.0  # no permit: wait in line; a release wakes the job, or this passes (a fallback)
    binds_memory_s: float = 10.0  # the limit binds this long after an acquire saw jobs in line, or a 503
    # was taken for capacity or excess: meanwhile a worker claims jobs one at a time (worker.runtime)
    breaker_window_s: float = 10.0  # sliding window of outcomes the breaker looks at
    breaker_min_failures: int = 20  # ...needs at least this many failures in it (a few errors never trip it)
    breaker_failure_ratio: float = 0.75  # ...making up at least this share (peak flex sheds ~45% at random)
    breaker_cool_down_s: float = 10.0  # open this long, doubled on each re-open without a close
    breaker_cool_down_max_s: float = 300.0
    pause_default_s: float = 10.0  # a 429 without RetryInfo
    daily_quota_pause_s: float = DAILY_QUOTA_MIN_DELAY_S  # a per-day quota 429 (at least)
    billing_pause_s: float = 600.0  # a 429 without details (credits depleted): FLEXQ_RETRY_MAX_S
    output_tokens_default: int = 1024  # TPM estimate when the request sets no max_output_tokens
    limits: Mapping[str, Limits] = field(default_factory=dict)  # FLEXQ_LIMITS, by model
    # How a 503 is told apart (worker/lua/release.lua; docs/flow-control.md)
    level_half_life_s: float = 3.0  # per in-flight level counts of calls and 503s halve this often
    step_min_gap: float = 0.25  # a capacity step: the 503 rate above it exceeds the rate below by this...
    step_min_llr: float = 14.0  # ...with a log-likelihood ratio (step vs one rate) of at least this
    step_min_n: float = 2.0  # ...and at least this many (decayed) calls on each side
    baseline_window: int = 200  # the load-independent 503 rate: a running mean over this many outcomes
    baseline_prior_n: int = 50  # ...starting from 0% worth this many outcomes (a cold start's 503s are suspect)
    excess_window: int = 16  # the recent 503 rate: a running mean over this many outcomes
    excess_z: float = 3.0  # a jump of the recent rate is this many standard deviations (and the gap)
    blind_n: float = 5.0  # ...and counts only while fewer calls than this were answered lately (at any level)
    raise_min_n: float = 5.0  # answers above the believed capacity (at about the usual 503 rate) that raise it
    probe_gain: float = 0.5  # at a known step the limit grows by this / limit per answer (a probe a level up)
    replace_ratio: float = 1.5  # a load-independent 503's permit goes to the next job: each answer
    replace_burst: float = 10.0  # ...pays for this many such hand-overs, up to this many in store
    shed_backoff_base_s: float = 0.5  # a shed job's own jittered backoff before it asks again: full jitter
    shed_backoff_max_s: float = 2.0  # ...from this base, doubling per 503 in a row, up to this
    state_ttl_s: int = 7 * 24 * 3600  # learned state outlives a quiet week, not forever
    quota_ttl_s: int = 2 * 24 * 3600

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("flow limits need 1 <= min_limit <= initial_limit <= max_limit")
        if not 0 < self.decrease_factor < 1 or not 0 < self.breaker_failure_ratio <= 1:
            raise ValueError("decrease_factor must be in (0, 1) and breaker_failure_ratio in (0, 1]")
        if min(self.permit_ttl_s, self.permit_max_hold_s, self.breaker_window_s, self.breaker_cool_down_s) <= 0:
            raise ValueError("permit_ttl_s, permit_max_hold_s, breaker_window_s and breaker_cool_down_s must be > 0")
        if not 0 <= self.poll_min_s <= self.poll_max_s:
            raise ValueError("poll_min_s must be in [0, poll_max_s]")

    def clamp(self, limit: float) -> float:
        return max(self.min_limit, min(self.max_limit, limit))


def estimate_tokens(request: GenerateRequest, *, output_tokens_default: int) -> int:
    """Admission estimate for TPM: prompt characters / 4 plus max_output_tokens (or the default)."""
    chars = len(request.text_for_estimate())
    if isinstance(request.system_instruction, str):
        chars += len(request.system_instruction)
    config = request.config or {}
    out = config.get("max_output_tokens", config.get("maxOutputTokens"))
    out_tokens = out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else output_tokens_default
    return math.ceil(chars / 4) + out_tokens


# -- circuit breaker -------------------------------------------------------------------------------


def breaker_event(outcome: str | None) -> BreakerEvent:
    """What an outcome tells the breaker. For a 503 this is only the default: release.lua makes one
    the limit handles (a capacity 503, above the floor) neutral."""
    if outcome in BREAKER_SUCCESS:
        return "success"
    return "failure" if outcome in BREAKER_FAILURE else "neutral"


# -- 429 pauses ------------------------------------------------------------------------------------


def pause_after_429(
    retry_after_s: float | None, quota: QuotaKind | str | None, cfg: FlowConfig
) -> tuple[float, QuotaKind | None]:
    """How long a 429 pauses its model for every worker, and the quota alert it raises (if any)."""
    wait_s = retry_after_s + RETRY_INFO_MARGIN_S if retry_after_s is not None else None
    if quota == QuotaKind.BILLING:
        return max(cfg.billing_pause_s, wait_s or 0.0), QuotaKind.BILLING
    if quota == QuotaKind.PER_DAY:
        return max(cfg.daily_quota_pause_s, wait_s or 0.0), QuotaKind.PER_DAY
    return (wait_s if wait_s is not None else cfg.pause_default_s), None


# -- admission -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Permit:
    """What ``FlowControl.release`` needs back: the ticket of one admitted attempt."""

    job_id: str
    model: str
    tier: str
    est_tokens: int
    started_s: float  # admission time on the store's clock
    level: int = 1  # permits held once this one was taken: the in-flight level the call ran at
    held_since_s: float = field(default_factory=time.time)  # admission time on this process's clock


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str  # "ok" | "paused" | "circuit_open" | "probe_busy" | "rpm" | "tpm" | "no_permit"
    wait_s: float = 0.0  # known wait (pause, cool-down, rate window); 0 when unknown
    probe: bool = False  # admitted as the half-open breaker's single probe
    limit: float = 0.0  # the concurrency limit and permits held, after this decision (for logs)
    in_flight: int = 0
    permit: Permit | None = None
    line: bool = False  # jobs may wait in the scope's line for a permit (the limit binds)
    #: a record write carried by the acquire (``FlowControl.acquire(write=...)``): 1 applied, 0 the record
    #: changed meanwhile or the job was not admitted, -1 the record is gone; None: no write was carried
    written: int | None = None


#: A 503's verdicts (``Release.verdict``) that say the limit binds: above the pool's capacity, or a jump of
#: its shed rate (``FlowControl.limit_binds``).
BINDING_VERDICTS = frozenset({"capacity", "excess"})


@dataclass(frozen=True)
class Release:
    """What ``FlowControl.release`` learned: the limit after the outcome and, for a 503, its verdict
    ('capacity' | 'excess' | 'random'; see worker/lua/release.lua)."""

    limit: float
    verdict: str = ""
    #: a record write carried by the release: 1 applied, 0 the record changed meanwhile, -1 it is gone
    written: int | None = None


def defer_s(admission: Admission, cfg: FlowConfig, rand: Callable[[], float]) -> float:
    """How long the runner defers a refused job: the known wait plus jitter (+ up to 10% of it),
    so deferred jobs do not all come back at the same instant."""
    r = rand()
    poll_s = cfg.poll_min_s + r * (cfg.poll_max_s - cfg.poll_min_s)
    if admission.reason == "no_permit":  # in line: woken by a release; this is only the fallback
        return round(cfg.waiter_timeout_s * (1 + 0.1 * r), 3)
    if admission.reason in POLL_REASONS:
        return round(poll_s, 3)
    return round(admission.wait_s * (1 + 0.1 * r) + poll_s, 3)


def config_from_settings(settings: WorkerConfig) -> FlowConfig:
    """The one mapping from ``FLEXQ_*`` settings to flow-control knobs."""
    return FlowConfig(
        initial_limit=max(settings.flow_min, min(settings.flow_initial, settings.flow_max)),
        min_limit=settings.flow_min,
        max_limit=settings.flow_max,
        decrease_factor=settings.flow_decrease,
        permit_ttl_s=settings.lease_s,
        permit_max_hold_s=settings.job_timeout_s,
        breaker_min_failures=settings.breaker_min_failures,
        breaker_failure_ratio=settings.breaker_failure_ratio,
        breaker_cool_down_s=settings.breaker_cool_down_s,
        billing_pause_s=max(settings.retry_max_s, 60.0),
        limits=settings.limits,
    )
