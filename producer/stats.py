"""Queue statistics: what a closed attempt adds to the counters, and the one report built from them.

Pure arithmetic, no I/O. The store adds :func:`attempt_counts` and :func:`cost_counts` to its Redis
hash as jobs run (``flexq stats``); a batch adds them up from its own records (``flexq batch``'s
summary); both reports are :func:`summarize`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from producer.models import Attempt
from producer.request import DEFAULT_CHANNEL
from producer.status import Outcome

#: Counter prefix of the successful jobs per model with no known price: ``cost_unknown_model:<model>``.
UNKNOWN_MODEL = "cost_unknown_model"


def attempt_counts(attempt: Attempt) -> dict[str, int]:
    """The counters one closed attempt adds (an attempt closed without an outcome counts as interrupted)."""
    outcome = attempt.outcome or Outcome.INTERRUPTED
    counts = {f"attempts:{outcome}": 1, f"attempts:{attempt.tier}:{outcome}": 1}
    if attempt.channel not in (None, DEFAULT_CHANNEL) and attempt.tier != "batch":  # batch: its batch's name
        counts[f"channel_attempts:{attempt.channel}:{outcome}"] = 1
    if attempt.usage is not None:
        counts[f"tokens:{attempt.tier}:prompt"] = attempt.usage.prompt_tokens
        counts[f"tokens:{attempt.tier}:output"] = attempt.usage.output_tokens
        counts[f"tokens:{attempt.tier}:thoughts"] = attempt.usage.thoughts_tokens
    return counts


def cost_counts(
    tier: str, usd: float | None, standard_usd: float | None, *, model: str | None = None,
    channel: str | None = None,
) -> dict[str, float]:
    """The counters one successful job's cost adds; ``usd`` None: the model's price is unknown (and
    ``model``, when given, is counted by name, so that the report says which models had no price)."""
    counts: dict[str, float] = {}
    if usd is not None:
        counts[f"cost_usd:{tier}"] = usd
        if channel not in (None, DEFAULT_CHANNEL):  # FLEXQ_CHANNELS only: no extra counter without them
            counts[f"channel_cost_usd:{channel}"] = usd
    if standard_usd is not None:
        counts["standard_cost_usd"] = standard_usd
    if usd is None:
        counts["cost_unknown_jobs"] = 1
        if model:
            counts[f"{UNKNOWN_MODEL}:{model.removeprefix('models/')}"] = 1
    return counts


def add_up(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum counter increments, as the store's hash does."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (``pct`` in 0..100); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summarize(
    *, counts: Mapping[str, int], counters: Mapping[str, float], latencies_ms: Sequence[int]
) -> dict[str, Any]:
    """The ``flexq stats`` document: jobs by status, attempts by outcome, rates, latency, tokens, cost."""
    by_outcome: dict[str, int] = {}
    by_tier_outcome: dict[str, dict[str, int]] = {}
    tokens: dict[str, dict[str, int]] = {}
    cost_by_tier: dict[str, float] = {}
    by_channel: dict[str, dict[str, int]] = {}
    cost_by_channel: dict[str, float] = {}
    unpriced: dict[str, int] = {}
    for key, value in counters.items():
        parts = key.split(":")
        if parts[0] == UNKNOWN_MODEL and len(parts) == 2:
            unpriced[parts[1]] = int(value)
        if parts[0] == "attempts" and len(parts) == 2:
            by_outcome[parts[1]] = int(value)
        elif parts[0] == "attempts" and len(parts) == 3:
            by_tier_outcome.setdefault(parts[1], {})[parts[2]] = int(value)
        elif parts[0] == "tokens" and len(parts) == 3:
            tokens.setdefault(parts[1], {})[parts[2]] = int(value)
        elif parts[0] == "cost_usd" and len(parts) == 2:
            cost_by_tier[parts[1]] = round(value, 6)
        elif parts[0] == "channel_attempts" and len(parts) == 3:
            by_channel.setdefault(parts[1], {})[parts[2]] = int(value)
        elif parts[0] == "channel_cost_usd" and len(parts) == 2:
            cost_by_channel[parts[1]] = round(value, 6)
    total_attempts = sum(by_outcome.values())
    spent = round(sum(cost_by_tier.values()), 6)
    standard = round(counters.get("standard_cost_usd", 0.0), 6)
    return {
        "jobs": dict(counts),
        "attempts": {"total": total_attempts, "by_outcome": by_outcome, "by_tier": by_tier_outcome,
                     "by_channel": by_channel},
        "rates": {
            "overloaded_503": _rate(by_outcome.get("overloaded", 0), total_attempts),
            "rate_limited_429": _rate(by_outcome.get("rate_limited", 0), total_attempts),
        },
        "latency_ms": {
            "samples": len(latencies_ms),
            "p50": percentile(latencies_ms, 50),
            "p95": percentile(latencies_ms, 95),
        },
        "tokens": tokens,
        "cost": {
            "spent_usd": spent,
            "by_tier_usd": cost_by_tier,
            "by_channel_usd": cost_by_channel,
            "standard_equivalent_usd": standard,
            "saved_usd": round(standard - spent, 6),  # of the rounded figures, so that the three add up
            "jobs_with_unknown_cost": int(counters.get("cost_unknown_jobs", 0)),
            "unknown_price_models": dict(sorted(unpriced.items())),  # model -> jobs, where known
        },
    }


def _rate(part: int, total: int) -> float | None:
    return round(part / total, 4) if total else None
