"""Pure policy: classify an outcome, choose the next delay, decide retry / escalate / fail.

No I/O, no clock, no global randomness: time and the random source are arguments, so each
function is a truth table (tests/test_policy.py).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from producer.status import Fallback, Outcome, Tier

RETRYABLE = frozenset(
    {
        Outcome.OVERLOADED,
        Outcome.RATE_LIMITED,
        Outcome.SERVER_ERROR,
        Outcome.TIMEOUT,
        Outcome.CONNECTION_ERROR,
        Outcome.INTERRUPTED,
    }
)
PERMANENT = frozenset({Outcome.CLIENT_ERROR, Outcome.BLOCKED})
#: Candidate finish reasons that mean "refused", not "answered".
BLOCKING_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "PROHIBITED_CONTENT",
        "SPII",
        "BLOCKLIST",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "NO_IMAGE",
    }
)
#: ``retryDelay`` is truncated to whole seconds by the API: wait this much more.
RETRY_INFO_MARGIN_S = 1.0
#: A retry must be due this long before the deadline: pick-up latency, so it still runs in time.
DEADLINE_MARGIN_S = 1.0
#: A per-day quota does not clear for hours; do not knock every few seconds.
DAILY_QUOTA_MIN_DELAY_S = 3600.0
_CONNECTION_ERROR_NAMES = frozenset(
    {
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ConnectError",
        "ReadError",
        "WriteError",
        "RemoteProtocolError",
        "TransportError",
        "ClientConnectorDNSError",
    }
)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


class QuotaKind(StrEnum):
    PER_MINUTE = "per_minute"
    PER_DAY = "per_day"
    BILLING = "billing"  # a 429 with no details: credits depleted; retrying cannot help soon


@dataclass(frozen=True)
class Classified:
    """What one attempt amounted to."""

    outcome: Outcome
    http_status: int | None = None
    message: str | None = None
    retry_after_s: float | None = None  # google.rpc.RetryInfo retryDelay, as sent
    quota: QuotaKind | None = None
    quota_id: str | None = None


# -- classification --------------------------------------------------------------------------------


def outcome_for_status(code: int) -> Outcome:
    if code == 503:
        return Outcome.OVERLOADED
    if code == 429:
        return Outcome.RATE_LIMITED
    if code == 408:
        return Outcome.TIMEOUT
    if code >= 500 or code < 400:
        return Outcome.SERVER_ERROR
    return Outcome.CLIENT_ERROR


def parse_duration_s(value: Any) -> float | None:
    """``"37s"`` → 37.0; anything else (garbage, negative, absurd) → None."""
    if not isinstance(value, str):
        return None
    match = _DURATION_RE.match(value)
    if match is None:
        return None
    seconds = float(match.group(1))
    return seconds if seconds <= 7 * 24 * 3600 else None


def error_details(body: Any) -> list[Mapping[str, Any]]:
    """The ``details`` list of a Gemini error body (the SDK's ``APIError.details`` is the whole body)."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, Mapping):
        return []
    error = body.get("error", body)
    details = error.get("details") if isinstance(error, Mapping) else None
    return [d for d in details if isinstance(d, Mapping)] if isinstance(details, list) else []


def parse_rate_limit(body: Any) -> tuple[float | None, QuotaKind, str | None]:
    """RetryInfo delay, quota kind and quota id of a 429 body."""
    details = error_details(body)
    retry_after_s: float | None = None
    quota_id: str | None = None
    for detail in details:
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo"):
            retry_after_s = parse_duration_s(detail.get("retryDelay"))
        elif kind.endswith("google.rpc.QuotaFailure"):
            violations = detail.get("violations")
            for violation in violations if isinstance(violations, list) else []:
                if isinstance(violation, Mapping) and violation.get("quotaId"):
                    this_id = str(violation["quotaId"])
                    if quota_id is None or "PerDay" in this_id:  # a daily quota decides the wait
                        quota_id = this_id
    if not details:
        return None, QuotaKind.BILLING, None
    if quota_id is not None and "PerDay" in quota_id:
        return retry_after_s, QuotaKind.PER_DAY, quota_id
    return retry_after_s, QuotaKind.PER_MINUTE, quota_id


def classify_api_error(code: int, status: str | None, message: str | None, body: Any) -> Classified:
    outcome = outcome_for_status(code)
    text = f"{code} {status or ''}: {message or ''}".strip()
    if outcome == Outcome.RATE_LIMITED:
        retry_after_s, quota, quota_id = parse_rate_limit(body)
        return Classified(outcome, code, text, retry_after_s, quota, quota_id)
    return Classified(outcome, code, text)


def classify_exception(exc: BaseException) -> Classified:
    """Map anything the SDK call raised to an outcome. Unknown exceptions are not retried."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and hasattr(exc, "details"):  # google.genai.errors.APIError
        return classify_api_error(code, getattr(exc, "status", None), getattr(exc, "message", None), exc.details)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return Classified(Outcome.TIMEOUT, None, "request timed out")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _CONNECTION_ERROR_NAMES or isinstance(exc, ConnectionError):
        return Classified(Outcome.CONNECTION_ERROR, None, f"{type(exc).__name__}: {exc}".rstrip(": "))
    return Classified(Outcome.CLIENT_ERROR, None, f"unexpected {type(exc).__name__}: {exc}")


def classify_response(
    *, has_candidates: bool, finish_reason: str | None, block_reason: str | None
) -> Classified:
    """An HTTP 200 is an answer unless the prompt or the candidate was blocked."""
    if not has_candidates:
        if block_reason:
            return Classified(Outcome.BLOCKED, 200, f"prompt blocked: {block_reason}")
        return Classified(Outcome.SERVER_ERROR, 200, "response had no candidates and no block reason")
    if finish_reason in BLOCKING_FINISH_REASONS:
        return Classified(Outcome.BLOCKED, 200, f"candidate blocked: finish_reason={finish_reason}")
    return Classified(Outcome.OK, 200)


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
    #: With shared flow control on, a 503 is handled by the shared limit: the job itself only needs
    #: a short jittered pause (this base, growing to at most ``overload_cap_s``), not the full
    #: backoff, which at a 45% shed rate would strand a few unlucky jobs for minutes. None: the full backoff.
    overload_base_s: float | None = None
    overload_cap_s: float | None = None


def decide(classified: Classified, budget: RetryBudget, rand: Callable[[], float]) -> Decision:
    """Succeed, retry after a delay (maybe on the standard tier), or fail with a reason."""
    outcome = classified.outcome
    if outcome == Outcome.OK:
        return Decision(Action.SUCCEED, tier=budget.tier)
    if outcome in PERMANENT:
        kind = "blocked" if outcome == Outcome.BLOCKED else "client_error"
        return Decision(Action.FAIL, tier=budget.tier, error_kind=kind, reason=classified.message or str(outcome))
    # The standard tier shares the project's daily quota and billing: escalating cannot help those.
    can_escalate = (
        budget.tier == Tier.FLEX
        and budget.fallback == "standard"
        and classified.quota not in (QuotaKind.PER_DAY, QuotaKind.BILLING)
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
