"""producer.stats: nearest-rank percentiles and the ``flexq stats`` document, as pure arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from producer.stats import attempt_counts, cost_counts, percentile, summarize
from producer.status import Status

ONE_TO_100 = list(range(1, 101))


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        pytest.param([], 50, None, id="empty"),
        pytest.param([], 95, None, id="empty-p95"),
        pytest.param([7], 0, 7.0, id="one-value-p0"),
        pytest.param([7], 50, 7.0, id="one-value-p50"),
        pytest.param([7], 100, 7.0, id="one-value-p100"),
        pytest.param(ONE_TO_100, 50, 50.0, id="p50-of-1-100"),
        pytest.param(ONE_TO_100, 95, 95.0, id="p95-of-1-100"),
        pytest.param(ONE_TO_100, 99, 99.0, id="p99-of-1-100"),
        pytest.param(ONE_TO_100, 100, 100.0, id="p100-is-max"),
        pytest.param(ONE_TO_100, 0, 1.0, id="p0-is-min"),
        pytest.param(ONE_TO_100, 0.5, 1.0, id="tiny-pct"),
        pytest.param(list(reversed(ONE_TO_100)), 95, 95.0, id="unsorted-input"),
        pytest.param([1, 2], 50, 1.0, id="even-count-lower-rank"),
        pytest.param([1, 2, 3, 4], 51, 3.0, id="rank-rounds-up"),
        pytest.param([5, 5, 5, 1], 50, 5.0, id="duplicates"),
        pytest.param([0.5, 1.5], 100, 1.5, id="floats"),
        pytest.param(ONE_TO_100, 150, 100.0, id="over-100-clamped"),
        pytest.param(ONE_TO_100, -10, 1.0, id="negative-clamped"),
    ],
)
def test_percentile(values: Sequence[float], pct: float, expected: float | None) -> None:
    result = percentile(values, pct)
    assert result == expected
    if result is not None:
        assert isinstance(result, float)


def test_percentile_does_not_sort_its_input() -> None:
    values = [3, 1, 2]
    percentile(values, 50)
    assert values == [3, 1, 2]


COUNTS = {str(s): n for s, n in zip(Status, [3, 2, 1, 10, 4, 0], strict=True)}


def test_summarize_full() -> None:
    counters = {
        "attempts:ok": 10.0,
        "attempts:overloaded": 6.0,
        "attempts:rate_limited": 3.0,
        "attempts:client_error": 1.0,
        "attempts:flex:ok": 8.0,
        "attempts:standard:ok": 2.0,
        "attempts:flex:overloaded": 6.0,
        "tokens:flex:prompt": 1000.0,
        "tokens:flex:output": 200.0,
        "tokens:standard:thoughts": 50.0,
        "cost_usd:flex": 0.1234564,
        "cost_usd:standard": 0.1,
        "channel_attempts:studio:ok": 7.0,
        "channel_attempts:vx:ok": 3.0,
        "channel_cost_usd:studio": 0.2,
        "channel_cost_usd:vx": 0.0234564,
        "standard_cost_usd": 0.3469128,
        "cost_unknown_jobs": 2.0,
        "cost_unknown_model:gemini-2.5-flsh": 1.0,
        "cost_unknown_model:gemini-9-ultra": 1.0,
        "unrelated:key:with:parts": 9.0,
    }
    doc = summarize(counts=COUNTS, counters=counters, latencies_ms=list(range(1, 101)))
    assert doc["jobs"] == COUNTS
    assert doc["attempts"] == {
        "total": 20,
        "by_outcome": {"ok": 10, "overloaded": 6, "rate_limited": 3, "client_error": 1},
        "by_tier": {"flex": {"ok": 8, "overloaded": 6}, "standard": {"ok": 2}},
        "by_channel": {"studio": {"ok": 7}, "vx": {"ok": 3}},
    }
    assert doc["rates"] == {"overloaded_503": 0.3, "rate_limited_429": 0.15}
    assert doc["latency_ms"] == {"samples": 100, "p50": 50.0, "p95": 95.0}
    assert doc["tokens"] == {"flex": {"prompt": 1000, "output": 200}, "standard": {"thoughts": 50}}
    assert doc["cost"] == {
        "spent_usd": 0.223456,
        "by_tier_usd": {"flex": 0.123456, "standard": 0.1},
        "by_channel_usd": {"studio": 0.2, "vx": 0.023456},
        "standard_equivalent_usd": 0.346913,
        "saved_usd": 0.123457,
        "jobs_with_unknown_cost": 2,
        "unknown_price_models": {"gemini-2.5-flsh": 1, "gemini-9-ultra": 1},
    }


@pytest.mark.parametrize(
    ("counters", "rates"),
    [
        pytest.param({}, {"overloaded_503": None, "rate_limited_429": None}, id="no-attempts"),
        pytest.param({"attempts:ok": 4.0}, {"overloaded_503": 0.0, "rate_limited_429": 0.0}, id="all-ok"),
        pytest.param({"attempts:overloaded": 4.0}, {"overloaded_503": 1.0, "rate_limited_429": 0.0}, id="all-503"),
        pytest.param({"attempts:overloaded": 1.0, "attempts:ok": 2.0},
                     {"overloaded_503": 0.3333, "rate_limited_429": 0.0}, id="rounded-to-4"),
        pytest.param({"attempts:flex:overloaded": 5.0}, {"overloaded_503": None, "rate_limited_429": None},
                     id="per-tier-counters-do-not-make-a-total"),
    ],
)
def test_summarize_rates(counters: dict[str, float], rates: dict[str, Any]) -> None:
    assert summarize(counts={}, counters=counters, latencies_ms=[])["rates"] == rates


@pytest.mark.parametrize(
    ("counters", "spent", "standard", "saved"),
    [
        pytest.param({}, 0.0, 0.0, 0.0, id="nothing"),
        pytest.param({"cost_usd:flex": 1.0, "standard_cost_usd": 2.0}, 1.0, 2.0, 1.0, id="flex-half"),
        pytest.param({"cost_usd:flex": 0.5, "cost_usd:standard": 1.0, "standard_cost_usd": 2.0}, 1.5, 2.0, 0.5,
                     id="mixed-tiers"),
        pytest.param({"cost_usd:standard": 2.0, "standard_cost_usd": 2.0}, 2.0, 2.0, 0.0, id="all-standard"),
        pytest.param({"cost_usd:flex": 0.1, "cost_usd:standard": 0.2, "standard_cost_usd": 0.3}, 0.3, 0.3, 0.0,
                     id="no-float-noise"),
    ],
)
def test_summarize_cost(counters: dict[str, float], spent: float, standard: float, saved: float) -> None:
    cost = summarize(counts={}, counters=counters, latencies_ms=[])["cost"]
    assert (cost["spent_usd"], cost["standard_equivalent_usd"], cost["saved_usd"]) == (spent, standard, saved)


def test_summarize_empty() -> None:
    doc = summarize(counts={}, counters={}, latencies_ms=[])
    assert doc["attempts"] == {"total": 0, "by_outcome": {}, "by_tier": {}, "by_channel": {}}
    assert doc["latency_ms"] == {"samples": 0, "p50": None, "p95": None}
    assert doc["tokens"] == {}
    assert doc["cost"]["jobs_with_unknown_cost"] == 0


def test_cost_counts_name_a_model_with_no_known_price() -> None:
    from producer.stats import add_up, cost_counts

    counts = add_up([
        cost_counts("flex", None, None, model="models/gemini-2.5-flsh"),
        cost_counts("flex", None, None, model="gemini-2.5-flsh"),
        cost_counts("flex", 0.1, 0.2, model="gemini-2.5-flash"),  # priced: not named
        cost_counts("flex", None, None),  # a caller that does not say the model: counted, not named
    ])
    cost = summarize(counts={}, counters=counts, latencies_ms=[])["cost"]
    assert cost["jobs_with_unknown_cost"] == 3
    assert cost["unknown_price_models"] == {"gemini-2.5-flsh": 2}


@pytest.mark.parametrize(
    ("channel", "tier", "counted"),
    [
        pytest.param(None, "flex", False, id="no-channel"),
        pytest.param("default", "flex", False, id="default-adds-no-counter"),
        pytest.param("vx", "flex", True, id="configured-channel"),
        pytest.param("batches/abc", "batch", False, id="batch-attempt-names-its-batch"),
    ],
)
def test_attempts_and_cost_are_counted_per_configured_channel(channel: str | None, tier: str, counted: bool) -> None:
    from datetime import UTC, datetime

    from producer.models import Attempt

    attempt = Attempt(number=1, tier=tier, started_at=datetime.now(UTC), outcome="ok", channel=channel)
    assert any(k.startswith("channel_attempts:") for k in attempt_counts(attempt)) == counted
    cost_channel = None if tier == "batch" else channel
    assert any(k.startswith("channel_cost_usd:") for k in cost_counts(tier, 0.1, 0.2, channel=cost_channel)) == counted
