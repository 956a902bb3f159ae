"""Pure policy: choose the next delay, decide retry / escalate / fail.

No I/O, no clock, no global randomness: time and the random source are arguments, so each
function is a truth table (tests/test_policy.py). What an outcome *is* comes from :mod:`worker.classify`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from producer.status import Fallback, Outcome, Tier
from worker.classify import PERMANENT, UNUSABLE, Classified, QuotaKind

#: ``retryDelay`` is truncated to whole seconds by the API: wait this much more.
RETRY_INFO_MARGIN_S = 1.0
#: A retry must be due this long before the deadline: pick-up latency, so it still runs in time.
DEADLINE_MARGIN_S = 1.0
#: A per-day quota does not clear for hours; do not knock every few seconds.
DAILY_QUOTA_MIN_DELAY_S = 3600.0


# -- backoff ---------------------------------------------------------------------------------------


def retry_delay_s(attempt: int, *, base_s: float, cap_s: float, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling_s = min(cap_s, base_s * 2.0 ** min(attempt - 1, 60))
    return rand() * ceiling_s


def next_delay_s(
    classified: Classified, attempt: int, *, base_s: float, cap_s: float, rand: Callable[[], float]
) -> float:
    """Backoff, never shorter than the server's RetryInfo (plus its truncation margin)."""
    delay_s = retry_delay_s(attempt, base_s=base_s, cap_s=cap_s, rand=rand)
    if classified.retry_after_s is not None:
        delay_s = max(delay_s, classified.retry_after_s + RETRY_INFO_MARGIN_S)
    if classified.quota == QuotaKind.PER_DAY:
        delay_s = max(delay_s, DAILY_QUOTA_MIN_DELAY_S)
    elif classified.quota == QuotaKind.BILLING:
        delay_s = max(delay_s, cap_s)
    return round(delay_s, 3)


# -- decision --------------------------------------------------------------------------------------


class Action(StrEnum):
    SUCCEED = "succeed"
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    tier: Tier = Tier.FLEX  # tier of the next attempt
    error_kind: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class RetryBudget:
    """Everything the decision depends on besides the outcome."""

    now_s: float
    deadline_s: float  # epoch seconds
    fallback: Fallback
    tier: Tier  # tier of the attempt that just ended
    tier_failures: int  # retryable failures on this tier so far, this one included (>= 1)
    flex_attempts: int  # flex attempts so far, this one included
    max_flex_attempts: int | None
    base_s: float
    cap_s: float
    margin_s: float = DEADLINE_MARGIN_S
    output_failures: int = 0  # answers unusable as asked (no image, bad JSON) so far, this one included
    max_output_retries: int = 2
    #: With shared flow control on, a 503 is handled by the shared limit: the job itself only needs
    #: a short jittered pause (this base, growing to at most ``overload_cap_s``), not the full
    #: backoff, which at a 45% shed rate would strand a few unlucky jobs for minutes. None: the full backoff.
    overload_base_s: float | None = None
    overload_cap_s: float | None = None
    #: When every attempt of the job so far ended in a connection error: the first one's start (epoch s).
    unreachable_since_s: float | None = None
    #: ...and how long that may last before the job fails with ``unreachable`` (0: never).
    unreachable_fail_s: float = 0.0


def decide(classified: Classified, budget: RetryBudget, rand: Callable[[], float]) -> Decision:
    """Succeed, retry after a delay (maybe on the standard tier), or fail with a reason."""
    outcome = classified.outcome
    if outcome == Outcome.OK:
        return Decision(Action.SUCCEED, tier=budget.tier)
    if outcome in PERMANENT:
        kind = "blocked" if outcome == Outcome.BLOCKED else "client_error"
        return Decision(Action.FAIL, tier=budget.tier, error_kind=kind, reason=classified.message or str(outcome))
    if budget.tier == Tier.BATCH:  # a batch is not tried twice: the job moves on to flex, or fails
        return _after_batch(classified, budget)
    # The standard tier shares the project's daily quota and billing: escalating cannot help those.
    can_escalate = (
        outcome not in UNUSABLE  # the standard tier runs the same model: it would answer the same
        and budget.tier == Tier.FLEX
        and budget.fallback == "standard"
        and classified.quota not in (QuotaKind.PER_DAY, QuotaKind.BILLING)
    )
    if outcome in UNUSABLE and budget.output_failures > budget.max_output_retries:
        return Decision(
            Action.FAIL, tier=budget.tier, error_kind=str(outcome),
            reason=f"{classified.message or outcome} (after {budget.output_failures} answers)",
        )
    if (
        outcome == Outcome.CONNECTION_ERROR
        and budget.unreachable_since_s is not None
        and 0 < budget.unreachable_fail_s <= budget.now_s - budget.unreachable_since_s
    ):  # the endpoint was never reached: a wrong base URL, DNS, a firewall; retrying to the deadline hides it
        span_s = budget.now_s - budget.unreachable_since_s
        return Decision(
            Action.FAIL, tier=budget.tier, error_kind="unreachable",
            reason=f"every attempt for {span_s:.0f}s was a connection error (FLEXQ_UNREACHABLE_FAIL_S="
            f"{budget.unreachable_fail_s:g}); the last: {classified.message or outcome}",
        )
    if budget.now_s >= budget.deadline_s:
        return Decision(Action.FAIL, tier=budget.tier, error_kind="deadline_exceeded", reason="deadline passed")
    if can_escalate and budget.max_flex_attempts is not None and budget.flex_attempts >= budget.max_flex_attempts:
        return Decision(
            Action.RETRY, 0.0, Tier.STANDARD, reason=f"{budget.flex_attempts} flex attempts: escalating to standard"
        )
    base_s, cap_s = budget.base_s, budget.cap_s
    if outcome == Outcome.OVERLOADED and budget.overload_base_s is not None:
        base_s = min(base_s, budget.overload_base_s)
        cap_s = min(cap_s, budget.overload_cap_s if budget.overload_cap_s is not None else cap_s)
    delay_s = next_delay_s(classified, max(1, budget.tier_failures), base_s=base_s, cap_s=cap_s, rand=rand)
    if budget.now_s + delay_s + budget.margin_s < budget.deadline_s:
        return Decision(Action.RETRY, delay_s, budget.tier, reason=f"{outcome}: retry in {delay_s:g}s")
    if can_escalate:
        return Decision(
            Action.RETRY, 0.0, Tier.STANDARD, reason=f"next flex retry in {delay_s:g}s would pass the deadline"
        )
    return Decision(
        Action.FAIL,
        tier=budget.tier,
        error_kind="deadline_exceeded",
        reason=f"{outcome}; the next retry (in {delay_s:g}s) would pass the deadline",
    )


def _after_batch(classified: Classified, budget: RetryBudget) -> Decision:
    """A ``batch`` attempt that gave no usable answer (the batch expired, failed or was cancelled, or its
    entry for this job was an error or unusable): on to flex at once if the job's fallback allows it and
    the deadline leaves room, else the job fails."""
    outcome = classified.outcome
    what = "its batch expired" if outcome == Outcome.EXPIRED else f"its batch answered {outcome}"
    detail = f"{what}: {classified.message}" if classified.message else what
    if budget.fallback == "none":
        return Decision(Action.FAIL, tier=Tier.BATCH, error_kind=_batch_kind(outcome),
                        reason=f"{detail} (fallback none)")
    if budget.now_s + budget.margin_s >= budget.deadline_s:
        return Decision(Action.FAIL, tier=Tier.BATCH, error_kind="deadline_exceeded",
                        reason=f"{detail}, too close to the deadline to run on flex")
    return Decision(Action.RETRY, 0.0, Tier.FLEX, reason=f"{detail}: on to flex")


def _batch_kind(outcome: Outcome) -> str:
    return "batch_expired" if outcome == Outcome.EXPIRED else "batch_" + str(outcome)
