"""Queue statistics from the counters the store keeps: pure arithmetic, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


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
    for key, value in counters.items():
        parts = key.split(":")
        if parts[0] == "attempts" and len(parts) == 2:
            by_outcome[parts[1]] = int(value)
        elif parts[0] == "attempts" and len(parts) == 3:
            by_tier_outcome.setdefault(parts[1], {})[parts[2]] = int(value)
        elif parts[0] == "tokens" and len(parts) == 3:
            tokens.setdefault(parts[1], {})[parts[2]] = int(value)
        elif parts[0] == "cost_usd" and len(parts) == 2:
            cost_by_tier[parts[1]] = round(value, 6)
    total_attempts = sum(by_outcome.values())
    spent = round(sum(cost_by_tier.values()), 6)
    standard = round(counters.get("standard_cost_usd", 0.0), 6)
    return {
        "jobs": dict(counts),
        "attempts": {"total": total_attempts, "by_outcome": by_outcome, "by_tier": by_tier_outcome},
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
            "standard_equivalent_usd": standard,
            "saved_usd": round(standard - spent, 6),
            "jobs_with_unknown_cost": int(counters.get("cost_unknown_jobs", 0)),
        },
    }


def _rate(part: int, total: int) -> float | None:
    return round(part / total, 4) if total else None
