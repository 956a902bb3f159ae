"""Pure flow control: how many flex calls may be in flight, and whether this one may start now.

No I/O, no clock, no global randomness (the style of ``worker.policy``): every function is a
truth table in tests/test_flow.py. ``worker.flow_store`` keeps the state in Redis and re-implements
``admit``, ``aimd_next`` and ``breaker_next`` in Lua (one script per attempt start, one per end);
these functions are the documented reference, and tests/test_flow_store.py checks that both agree.

Per (model, tier), shared by every worker:
- AIMD concurrency limit (TCP Reno): slow start (+1 per success) until the first 503, then +1/limit
  per success (+1 per window of successes), x``decrease_factor`` on a 503; at most one decrease per
  ``decrease_interval_s``, and never for a request admitted before the last decrease (it was sent
  under the old limit: one overload event shrinks the window once). No growth while the window is
  not the bottleneck (``in_flight < limit/2``, as Netflix concurrency-limits' AIMDLimit), so an idle
  queue does not wander up to ``max_limit`` and then burst.
- Circuit breaker: closed -> open when, over a sliding ``breaker_window_s`` (two fixed windows,
  the older weighted by how much of it still overlaps), failures >= ``breaker_min_failures`` and
  >= ``breaker_failure_ratio`` of outcomes. Open for ``breaker_cool_down_s`` x 2^(opens-1) (capped),
  then half-open: one probe at a time; its success closes, its failure re-opens for longer.
Per model (quotas are per project and model, whatever the tier): a pause after a 429 (RetryInfo, or
long for per-day and billing quotas, which also raise a quota alert), and optional RPM/TPM limits
(``FLEXQ_LIMITS``) over a sliding 60 s window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

from producer.errors import ConfigError
from producer.models import MODEL_RE, GenerateRequest, Outcome
from producer.settings import FlexqSettings
from worker.policy import DAILY_QUOTA_MIN_DELAY_S, RETRY_INFO_MARGIN_S, QuotaKind

#: RPM/TPM quotas are per minute.
RATE_WINDOW_S = 60.0
#: Grow only while in_flight >= limit * this (the window is the bottleneck).
APP_LIMITED_RATIO = 0.5

AimdEvent = Literal["ok", "overloaded"]
BreakerEvent = Literal["success", "failure", "neutral"]
#: Only a 503 shrinks the window; only an answer grows it. Others leave it alone.
AIMD_EVENTS: Mapping[str, AimdEvent] = {Outcome.OK: "ok", Outcome.OVERLOADED: "overloaded"}
#: The service answered: it is up (a 4xx or a safety block proves that too).
BREAKER_SUCCESS = frozenset({Outcome.OK, Outcome.CLIENT_ERROR, Outcome.BLOCKED})
BREAKER_FAILURE = frozenset({Outcome.OVERLOADED, Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR})
#: Admission refusals whose wait is unknown: retry soon, with jitter.
POLL_REASONS = frozenset({"probe_busy"})


class LimitsError(ConfigError, ValueError):
    """``FLEXQ_LIMITS`` cannot be parsed; the message names the bad part (a ValueError for pydantic)."""


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute (estimated at admission, corrected with usage)


@dataclass(frozen=True)
class FlowConfig:
    """Every knob, with its unit (``FLEXQ_FLOW_*`` settings map onto these one to one)."""

    initial_limit: float = 32.0  # permits per (model, tier) before anything is learned; slow start from here
    min_limit: float = 1.0  # never starve: one request always goes
    max_limit: float = 1000.0  # global cap per (model, tier), all workers together
    decrease_factor: float = 0.9  # multiplicative decrease on a 503 (gentle: a shed 503 costs a call, idle costs time)
    decrease_interval_s: float = 0.5  # at most one decrease per interval (and one per overload event)
    permit_ttl_s: float = 60.0  # a dead worker's permit frees itself after this; renew() every third
    permit_max_hold_s: float = 960.0  # renew() gives up on a permit this old (a release that never came)
    poll_min_s: float = 0.2  # deferral when the half-open probe slot is busy: uniform in [min, max]
    poll_max_s: float = 1.0
    waiter_timeout_s: float = 10.0  # no permit: wait in line; a release wakes the job, or this passes
    breaker_window_s: float = 10.0  # sliding window of outcomes the breaker looks at
    breaker_min_failures: int = 20  # ...needs at least this many failures in it (a few errors never trip it)
    breaker_failure_ratio: float = 0.5  # ...making up at least this share (AIMD's edge 503s stay far below)
    breaker_cool_down_s: float = 10.0  # open this long, doubled on each re-open without a close
    breaker_cool_down_max_s: float = 300.0
    pause_default_s: float = 10.0  # a 429 without RetryInfo
    daily_quota_pause_s: float = DAILY_QUOTA_MIN_DELAY_S  # a per-day quota 429 (at least)
    billing_pause_s: float = 600.0  # a 429 without details (credits depleted): FLEXQ_RETRY_MAX_S
    output_tokens_default: int = 1024  # TPM estimate when the request sets no max_output_tokens
    limits: Mapping[str, Limits] = field(default_factory=dict)  # FLEXQ_LIMITS, by model

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


# -- FLEXQ_LIMITS ----------------------------------------------------------------------------------


def parse_limits(text: str) -> dict[str, Limits]:
    """``"gemini-2.5-flash=rpm:1000,tpm:1000000;gemini-2.5-pro=rpm:150"`` -> {model: Limits}."""
    out: dict[str, Limits] = {}
    for entry in (part.strip() for part in text.split(";")):
        if not entry:
            continue
        model, sep, spec = (s.strip() for s in entry.partition("="))
        if not sep or not MODEL_RE.fullmatch(model):
            raise LimitsError(f"FLEXQ_LIMITS: {entry!r}: expected MODEL=rpm:N,tpm:N")
        if flow_model(model) in out:
            raise LimitsError(f"FLEXQ_LIMITS: model {model!r} is given twice")
        values: dict[str, int] = {}
        for item in (s.strip() for s in spec.split(",")):
            name, _, number = (s.strip() for s in item.partition(":"))
            if name.lower() not in ("rpm", "tpm"):
                raise LimitsError(f"FLEXQ_LIMITS: {model}: {item!r}: unknown limit (use rpm:N or tpm:N)")
            if name.lower() in values:
                raise LimitsError(f"FLEXQ_LIMITS: {model}: {name} is given twice")
            if not re.fullmatch(r"[0-9]{1,12}", number) or int(number) < 1:
                raise LimitsError(f"FLEXQ_LIMITS: {model}: {item!r}: the value must be a positive integer")
            values[name.lower()] = int(number)
        out[flow_model(model)] = Limits(**values)
    return out


def flow_model(model: str) -> str:
    """The name flow state is kept under: ``models/gemini-2.5-flash`` is ``gemini-2.5-flash``."""
    return model.removeprefix("models/")


def estimate_tokens(request: GenerateRequest, *, output_tokens_default: int) -> int:
    """Admission estimate for TPM: prompt characters / 4 plus max_output_tokens (or the default)."""
    chars = len(request.text_for_estimate())
    if isinstance(request.system_instruction, str):
        chars += len(request.system_instruction)
    config = request.config or {}
    out = config.get("max_output_tokens", config.get("maxOutputTokens"))
    out_tokens = out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else output_tokens_default
    return math.ceil(chars / 4) + out_tokens


# -- AIMD ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AimdState:
    limit: float
    ssthresh: float = math.inf  # slow start below it; set by the first decrease
    last_decrease_s: float = 0.0


def aimd_next(
    state: AimdState, event: AimdEvent, *, now_s: float, started_s: float, in_flight: int, cfg: FlowConfig,
    waiting: int = 0,
) -> AimdState:
    """The limit after one outcome; ``in_flight`` counts permits held, this request's included, and
    ``waiting`` the jobs in line for a permit (demand: the limit is the bottleneck, grow it)."""
    limit = cfg.clamp(state.limit)
    if event == "ok":
        if in_flight < limit * APP_LIMITED_RATIO and waiting == 0:
            return replace(state, limit=limit)
        step = 1.0 if limit < state.ssthresh else 1.0 / limit
        return replace(state, limit=min(cfg.max_limit, limit + step))
    if started_s < state.last_decrease_s or now_s - state.last_decrease_s < cfg.decrease_interval_s:
        return replace(state, limit=limit)  # the same overload event: already decreased for it
    # From what was really in flight (TCP: cwnd = min(cwnd, flight) x beta): a slow start that
    # doubled past the capacity lands just under it in one step, not after many.
    limit = max(cfg.min_limit, min(limit, in_flight) * cfg.decrease_factor)
    return AimdState(limit=limit, ssthresh=limit, last_decrease_s=now_s)


# -- sliding windows -------------------------------------------------------------------------------


def slide(
    index: int, cur: tuple[float, float], prev: tuple[float, float], now_s: float, window_s: float
) -> tuple[int, tuple[float, float], tuple[float, float], float]:
    """Move two-window counters to ``now_s``: (window index, current, previous, previous's weight)."""
    idx = max(index, math.floor(now_s / window_s))
    if idx == index + 1:
        cur, prev = (0.0, 0.0), cur
    elif idx > index + 1:
        cur, prev = (0.0, 0.0), (0.0, 0.0)
    weight = min(1.0, max(0.0, 1 - (now_s - idx * window_s) / window_s))
    return idx, cur, prev, weight


def window_wait_s(cur: float, prev: float, weight: float, *, limit: float, cost: float, window_s: float) -> float:
    """0 if ``cost`` fits under ``limit`` now, else how long until it does (counters already slid)."""
    cost = min(cost, limit)  # one request above the whole limit still runs, alone
    if prev * weight + cur + cost <= limit:
        return 0.0
    if cur + cost <= limit:  # the previous window's share slides out during this one
        return max(0.0, (weight - (limit - cur - cost) / prev) * window_s)
    return weight * window_s + (1 - (limit - cost) / cur) * window_s  # into the next window


# -- circuit breaker -------------------------------------------------------------------------------


class Breaker(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerState:
    state: Breaker = Breaker.CLOSED
    since_s: float = 0.0  # time of the last transition
    open_until_s: float = 0.0
    opens: int = 0  # consecutive opens without a close: the cool-down doubles with each
    window: int = 0  # index of the current window: floor(now_s / breaker_window_s)
    ok: float = 0.0
    failed: float = 0.0
    prev_ok: float = 0.0
    prev_failed: float = 0.0
    probe_until_s: float = 0.0  # half-open: the probe's lease; 0 = no probe out


def breaker_event(outcome: str | None, *, limit: float | None = None, min_limit: float = 1.0) -> BreakerEvent:
    """What an outcome tells the breaker. A 503 is first a capacity signal for AIMD: while the limit
    (after this outcome) can still shrink it is neutral here, and it counts as a failure only once
    the limit is at its floor: the pool refuses even that much. (Without ``limit``: a failure.)"""
    if outcome in BREAKER_SUCCESS:
        return "success"
    if outcome == Outcome.OVERLOADED and limit is not None and limit > min_limit:
        return "neutral"
    return "failure" if outcome in BREAKER_FAILURE else "neutral"


def breaker_gate(state: BreakerState, now_s: float) -> tuple[BreakerState, str, float]:
    """At admission: ("pass" | "probe" | "circuit_open" | "probe_busy", wait_s). Open ends lazily."""
    if state.state == Breaker.OPEN:
        if now_s < state.open_until_s:
            return state, "circuit_open", state.open_until_s - now_s
        state = replace(state, state=Breaker.HALF_OPEN, since_s=now_s, probe_until_s=0.0)
    if state.state == Breaker.HALF_OPEN:
        return state, ("probe_busy" if state.probe_until_s > now_s else "probe"), 0.0
    return state, "pass", 0.0


def breaker_next(
    state: BreakerState, event: BreakerEvent, *, probe: bool, now_s: float, cfg: FlowConfig
) -> BreakerState:
    """The breaker after one outcome. While open, and in half-open except for the probe, outcomes
    of requests sent earlier are ignored."""
    if state.state == Breaker.CLOSED and event != "neutral":
        idx, (ok, failed), (prev_ok, prev_failed), weight = slide(
            state.window, (state.ok, state.failed), (state.prev_ok, state.prev_failed), now_s, cfg.breaker_window_s
        )
        ok, failed = (ok + 1, failed) if event == "success" else (ok, failed + 1)
        recent_failed, recent_ok = failed + prev_failed * weight, ok + prev_ok * weight
        if (
            event == "failure"
            and recent_failed >= cfg.breaker_min_failures
            and recent_failed >= cfg.breaker_failure_ratio * (recent_failed + recent_ok)
        ):
            return _open(state, now_s, cfg)
        return replace(state, window=idx, ok=ok, failed=failed, prev_ok=prev_ok, prev_failed=prev_failed)
    if state.state == Breaker.HALF_OPEN and probe:
        if event == "success":
            return BreakerState(Breaker.CLOSED, since_s=now_s)
        if event == "failure":
            return _open(state, now_s, cfg)
        return replace(state, probe_until_s=0.0)  # no verdict: let another request probe
    return state


def _open(state: BreakerState, now_s: float, cfg: FlowConfig) -> BreakerState:
    opens = state.opens + 1
    cool_down_s = min(cfg.breaker_cool_down_max_s, cfg.breaker_cool_down_s * 2.0 ** (opens - 1))
    return BreakerState(Breaker.OPEN, since_s=now_s, open_until_s=now_s + cool_down_s, opens=opens)


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


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str  # "ok" | "paused" | "circuit_open" | "probe_busy" | "rpm" | "tpm" | "no_permit"
    wait_s: float = 0.0  # known wait (pause, cool-down, rate window); 0 when unknown
    probe: bool = False  # admitted as the half-open breaker's single probe
    limit: float = 0.0  # the concurrency limit and permits held, after this decision (for logs)
    in_flight: int = 0
    permit: Permit | None = None


def admit(
    *, now_s: float, paused_until_s: float, breaker: BreakerState, rpm_wait_s: float, tpm_wait_s: float,
    in_flight: int, limit: float, cfg: FlowConfig,
) -> tuple[Admission, BreakerState]:
    """The admission decision, checks in order: pause, breaker, RPM, TPM, concurrency permit."""
    limit = cfg.clamp(limit)
    if paused_until_s > now_s:
        return Admission(False, "paused", paused_until_s - now_s, limit=limit, in_flight=in_flight), breaker
    breaker, gate, wait_s = breaker_gate(breaker, now_s)
    refusal = (
        (gate, wait_s) if gate in ("circuit_open", "probe_busy")
        else ("rpm", rpm_wait_s) if rpm_wait_s > 0
        else ("tpm", tpm_wait_s) if tpm_wait_s > 0
        else ("no_permit", 0.0) if in_flight >= math.floor(limit)
        else None
    )
    if refusal is not None:
        return Admission(False, refusal[0], refusal[1], limit=limit, in_flight=in_flight), breaker
    if gate == "probe":
        breaker = replace(breaker, probe_until_s=now_s + cfg.permit_ttl_s)
    return Admission(True, "ok", probe=gate == "probe", limit=limit, in_flight=in_flight + 1), breaker


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


def config_from_settings(settings: FlexqSettings) -> FlowConfig:
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
        limits=parse_limits(settings.limits),
    )
