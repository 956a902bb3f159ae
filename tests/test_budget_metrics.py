"""``flexq metrics`` shows spend against budget (FLEXQ_BUDGETS), on a real Redis (database 15, flushed per
test): spend is recorded through the real ``BudgetStore`` (reserve, then settle, on the Redis clock, as a
worker does), the real HTTP endpoint is scraped, and the figures are those ``flexq stats --json`` prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import pytest

from flexq import cli, metrics
from producer.keys import Keys
from tests.conftest import make_settings
from tests.helpers import poll
from tests.test_metrics import Samples, Served, metrics_args, parse, scrape, value
from worker.budget import BudgetStore, Hold, applying, budgets_from
from worker.config import BudgetLimits, WorkerConfig

BUDGETS = {"queue": BudgetLimits(day=20.0, month=400.0), "tenant=acme": BudgetLimits(day=5.0)}
FAMILIES = ("flexq_budget_spent_usd", "flexq_budget_reserved_usd", "flexq_budget_limit_usd")


def budget_settings(redis_url: str, **budgets: BudgetLimits) -> WorkerConfig:
    return make_settings(redis_url=redis_url, budgets=budgets)


@pytest.fixture
async def served_with(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[tuple[Served, WorkerConfig]]:
    """``flexq metrics --port 0`` with BUDGETS set, as the process's FLEXQ_BUDGETS would set it."""
    settings = budget_settings(redis_url, **BUDGETS)
    task = asyncio.create_task(metrics.cmd_metrics(metrics_args("--port", "0"), settings))

    async def url() -> str | None:
        if task.done():
            task.result()
        found = re.search(r"serving (http://\S+/metrics)", capsys.readouterr().out)
        return found.group(1) if found else None

    yield Served(await poll(url, timeout_s=10, what="flexq metrics to serve"), task), settings
    if not task.done():
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def budget_samples(samples: Samples) -> dict[tuple[str, str, str], float]:
    """(family, budget, window) -> value of every budget sample."""
    out = {}
    for (name, labels), v in samples.items():
        if name in FAMILIES:
            found = dict(labels)
            assert set(found) == {"queue", "budget", "window"}, found
            out[(name, found["budget"], found["window"])] = v
    return out


async def stats_budgets(settings: WorkerConfig, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    """What ``flexq stats --json`` prints under ``budgets``."""
    capsys.readouterr()
    assert await cli.cmd_stats(argparse.Namespace(json=True), settings) == 0
    budgets: list[dict[str, object]] = json.loads(capsys.readouterr().out)["budgets"]
    return budgets


def away_from_midnight() -> None:
    """The test records and reads in the current UTC day: not across a day's end (Redis's clock is this host's)."""
    left = 86400 - time.time() % 86400
    if left < 5:
        time.sleep(left + 1)


@pytest.mark.redis
async def test_a_scrape_shows_spend_and_reservations_against_each_budget(
    served_with: tuple[Served, WorkerConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    served, settings = served_with
    away_from_midnight()
    from producer.queue import FlexQueue

    queue = await FlexQueue.connect(settings)
    try:
        budgets = budgets_from(settings.budgets)
        store = BudgetStore(queue.redis, Keys(settings.queue), budgets, hold_ttl_s=settings.job_timeout_s)
        acme = await store.reserve("j-acme", applying(budgets, {"tenant": "acme"}), 1.5)  # the Redis clock
        assert isinstance(acme, Hold)
        await store.settle(acme, 0.25)
        other = await store.reserve("j-other", applying(budgets, {"tenant": "other"}), 0.4)  # still in flight
        assert isinstance(other, Hold)

        samples = parse(await scrape(served.url))
        assert value(samples, "flexq_up") == 1
        assert budget_samples(samples) == pytest.approx({
            ("flexq_budget_spent_usd", "queue", "day"): 0.25,
            ("flexq_budget_reserved_usd", "queue", "day"): 0.4,
            ("flexq_budget_limit_usd", "queue", "day"): 20.0,
            ("flexq_budget_spent_usd", "queue", "month"): 0.25,
            ("flexq_budget_reserved_usd", "queue", "month"): 0.4,
            ("flexq_budget_limit_usd", "queue", "month"): 400.0,
            ("flexq_budget_spent_usd", "tenant=acme", "day"): 0.25,
            ("flexq_budget_reserved_usd", "tenant=acme", "day"): 0.0,
            ("flexq_budget_limit_usd", "tenant=acme", "day"): 5.0,
        })
        # tenant=acme has no monthly limit: no limit sample for its month (and no spend series either)
        assert value(samples, "flexq_budget_limit_usd", budget="tenant=acme", window="day") == 5.0
        assert not [k for k in samples if k[0] in FAMILIES and dict(k[1])["budget"] == "tenant=acme"
                    and dict(k[1])["window"] == "month"]

        # the same figures as flexq stats prints, with the same setting
        for row in await stats_budgets(settings, capsys):
            where = {"budget": str(row["scope"]), "window": str(row["window"])}
            assert value(samples, "flexq_budget_spent_usd", **where) == row["spent_usd"]
            assert value(samples, "flexq_budget_reserved_usd", **where) == row["reserved_usd"]
            assert value(samples, "flexq_budget_limit_usd", **where) == row["limit_usd"]

        # settled: the reservation becomes spend on the next scrape
        await store.settle(other, 0.1)
        again = parse(await scrape(served.url))
        assert value(again, "flexq_budget_spent_usd", budget="queue", window="day") == pytest.approx(0.35)
        assert value(again, "flexq_budget_reserved_usd", budget="queue", window="day") == 0
        assert value(again, "flexq_budget_spent_usd", budget="queue", window="month") == pytest.approx(0.35)
        assert value(again, "flexq_budget_spent_usd", budget="tenant=acme", window="day") == pytest.approx(0.25)
    finally:
        await queue.close()


@pytest.mark.redis
async def test_a_budget_with_no_spend_yet_is_zeros_and_its_limit(
    served_with: tuple[Served, WorkerConfig],
) -> None:
    served, _ = served_with
    found = budget_samples(parse(await scrape(served.url)))
    assert found == {
        (name, scope, window): (limit if name == "flexq_budget_limit_usd" else 0.0)
        for scope, window, limit in (("queue", "day", 20.0), ("queue", "month", 400.0), ("tenant=acme", "day", 5.0))
        for name in FAMILIES
    }


@pytest.mark.redis
async def test_no_budgets_no_budget_series(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from flexq.fleet import FleetReader

    reader = await FleetReader.connect(budget_settings(redis_url))
    try:
        collector = metrics.FleetCollector(reader, asyncio.get_running_loop())
        families = await asyncio.to_thread(collector.collect)
    finally:
        await reader.close()
    names = {f.name for f in families}
    assert "flexq_up" in names and "flexq_jobs" in names
    assert not names & set(FAMILIES)
    assert set(FAMILIES) <= {f.name for f in collector.describe()}  # registered all the same
