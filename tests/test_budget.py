"""Budgets (FLEXQ_BUDGETS): the pure parts as truth tables, worker/lua/budget.lua on a real Redis (times
passed explicitly, nothing sleeps), and a real ``flexq worker`` that stops a job at its budget."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from rich.console import Console

from flexq import render
from producer.keys import Keys
from producer.pricing import cost_usd
from producer.queue import FlexQueue
from producer.request import GenerateRequest
from producer.settings import settings_error
from producer.stats import summarize
from producer.status import Status, Tier
from simulator import RunningSimulator
from tests.conftest import API_KEY, make_settings
from tests.fakes import USAGE, ScriptedGemini, answer, overloaded
from tests.helpers import poll, running_worker, wait_all, worker_env
from worker.budget import (
    BUDGET_EXCEEDED,
    WINDOW_SPREAD_S,
    Budget,
    BudgetStore,
    Hold,
    Refusal,
    applying,
    budgets_from,
    estimate_usd,
    on_refusal,
)
from worker.config import BudgetLimits, WorkerConfig
from worker.runner import Runner

MODEL = "gemini-2.5-flash"
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()  # noon; the day ends in 12 h, the month on Jan 1
DAY_END = datetime(2026, 12, 4, tzinfo=UTC).timestamp()
MONTH_END = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
QUEUE_DAY, QUEUE_MONTH = Budget("queue", "day", 20.0), Budget("queue", "month", 400.0)
ACME_DAY = Budget("tenant=acme", "day", 5.0)


# -- settings --------------------------------------------------------------------------------------


def test_budgets_setting_parses_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXQ_BUDGETS", '{"queue": {"day": 20.0, "month": 400}, "tenant=acme": {"day": 5}}')
    settings = WorkerConfig()
    assert settings.budgets == {"queue": BudgetLimits(day=20.0, month=400.0), "tenant=acme": BudgetLimits(day=5.0)}
    assert budgets_from(settings.budgets) == [QUEUE_DAY, QUEUE_MONTH, ACME_DAY]
    monkeypatch.delenv("FLEXQ_BUDGETS")
    assert WorkerConfig().budgets == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"queue": {"week": 1}}', "FLEXQ_BUDGETS.queue.week: Extra inputs are not permitted"),
        ('{"queue": {"day": 0}}', "FLEXQ_BUDGETS.queue.day: Input should be greater than 0"),
        ('{"queue": {"day": -2}}', "FLEXQ_BUDGETS.queue.day: Input should be greater than 0"),
        ('{"tenant": {"day": 1}}', "FLEXQ_BUDGETS: 'tenant' is not a budget scope"),
        ('{"=acme": {"day": 1}}', "FLEXQ_BUDGETS: '=acme' is not a budget scope"),
        ('{"queue": {}}', "FLEXQ_BUDGETS: budget 'queue' has no limit"),
        ("queue=20", "FLEXQ_BUDGETS: not valid JSON"),
    ],
)
def test_bad_budgets_name_the_setting(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("FLEXQ_BUDGETS", value)
    with pytest.raises((ValidationError, ValueError)) as err:
        WorkerConfig()
    line = settings_error(err.value, WorkerConfig)
    assert line.startswith(f"bad configuration: {message}"), line
    assert "\n" not in line


# -- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({}, [QUEUE_DAY, QUEUE_MONTH]),
        ({"tenant": "acme"}, [QUEUE_DAY, QUEUE_MONTH, ACME_DAY]),
        ({"tenant": "acme2"}, [QUEUE_DAY, QUEUE_MONTH]),
        ({"team": "acme"}, [QUEUE_DAY, QUEUE_MONTH]),
        ({"tenant": "acme", "team": "x"}, [QUEUE_DAY, QUEUE_MONTH, ACME_DAY]),
    ],
)
def test_which_budgets_apply(tags: dict[str, str], expected: list[Budget]) -> None:
    assert applying([QUEUE_DAY, QUEUE_MONTH, ACME_DAY], tags) == expected


def test_only_tag_budgets_apply_to_tagged_jobs() -> None:
    assert applying([ACME_DAY], {}) == []
    assert applying([ACME_DAY], {"tenant": "acme"}) == [ACME_DAY]


@pytest.mark.parametrize(
    ("request_", "tier", "expected"),
    [
        # 8 chars -> 2 prompt tokens, 1024 output tokens by default: (2 * 0.30 + 1024 * 2.50) / 1M
        (GenerateRequest(model=MODEL, prompt="12345678"), Tier.STANDARD, (2 * 0.30 + 1024 * 2.50) / 1e6),
        (GenerateRequest(model=MODEL, prompt="12345678"), Tier.FLEX, (2 * 0.30 + 1024 * 2.50) / 2e6),
        (GenerateRequest(model=MODEL, prompt="12345678", config={"max_output_tokens": 100}), Tier.STANDARD,
         (2 * 0.30 + 100 * 2.50) / 1e6),
        (GenerateRequest(model="models/" + MODEL, prompt="12345678", config={"maxOutputTokens": 10}), Tier.FLEX,
         (2 * 0.30 + 10 * 2.50) / 2e6),
        (GenerateRequest(model="gemini-9-unpriced", prompt="12345678"), Tier.FLEX, None),
    ],
)
def test_estimate_usd(request_: GenerateRequest, tier: Tier, expected: float | None) -> None:
    got = estimate_usd(request_, tier, output_tokens_default=1024)
    assert got == (None if expected is None else pytest.approx(expected))


def test_standard_estimate_is_twice_flex() -> None:
    """A fallback to standard reserves the standard price: it cannot slip past a budget at flex's."""
    request = GenerateRequest(model=MODEL, prompt="a prompt of some length")
    flex = estimate_usd(request, Tier.FLEX, output_tokens_default=1024)
    standard = estimate_usd(request, Tier.STANDARD, output_tokens_default=1024)
    assert flex is not None and standard == pytest.approx(2 * flex)


def refusal(end_s: float = DAY_END, now_s: float = T0) -> Refusal:
    return Refusal(ACME_DAY, spent_usd=4.99, reserved_usd=0.005, estimate_usd=0.01, window_end_s=end_s, now_s=now_s)


@pytest.mark.parametrize(
    ("deadline_s", "rand", "wait_s"),
    [
        (DAY_END + 3600, 0.0, DAY_END - T0),  # the deadline is after the window: wait for it
        (DAY_END + 3600, 1.0, DAY_END - T0 + WINDOW_SPREAD_S),  # ...spread after its end
        (DAY_END + 30, 0.0, DAY_END - T0),
        (DAY_END + 30, 0.5, None),  # the spread would pass the deadline: fail
        (DAY_END + 1, 0.0, None),  # the deadline margin (1 s)
        (DAY_END, 0.0, None),
        (T0 + 60, 0.0, None),  # a short deadline: fail now
    ],
)
def test_wait_or_fail(deadline_s: float, rand: float, wait_s: float | None) -> None:
    verdict = on_refusal(refusal(), deadline_s=deadline_s, now_s=T0, rand=lambda: rand)
    assert verdict.wait_s == wait_s
    assert "budget tenant=acme per day ($5) would be exceeded: spent $4.990000, reserved $0.005000" in verdict.message
    assert "the window ends 2026-12-04T00:00:00Z" in verdict.message
    assert ("past the job's deadline" in verdict.message) == (wait_s is None)


def test_wait_uses_the_redis_clock_for_the_window() -> None:
    # the refusal's own clock (Redis's) says the window ends in 10 s, whatever the worker's clock says
    verdict = on_refusal(refusal(end_s=T0 + 10, now_s=T0), deadline_s=T0 + 10_000, now_s=T0 + 500, rand=lambda: 0)
    assert verdict.wait_s == 10


# -- the Lua script --------------------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


KEYS = Keys("flexq-budget-test")


def store(client: Redis, budgets: list[Budget], ttl_s: float = 600.0) -> BudgetStore:
    return BudgetStore(client, KEYS, budgets, hold_ttl_s=ttl_s)


async def state(s: BudgetStore, now_s: float) -> dict[tuple[str, str], tuple[str, float, float]]:
    return {(b["scope"], b["window"]): (b["window_id"], b["spent_usd"], b["reserved_usd"])
            for b in await s.snapshot(now_s)}


async def test_reserve_then_settle(client: Redis) -> None:
    s = store(client, [QUEUE_DAY, QUEUE_MONTH, ACME_DAY])
    hold = await s.reserve("j1", [QUEUE_DAY, QUEUE_MONTH, ACME_DAY], 1.5, now_s=T0)
    assert isinstance(hold, Hold) and hold.usd == 1.5
    assert hold.keys == (
        ("flexq-budget-test:budget:queue:2026-12-03", DAY_END), ("flexq-budget-test:budget:queue:2026-12", MONTH_END),
        ("flexq-budget-test:budget:tenant=acme:2026-12-03", DAY_END),
    )
    assert await state(s, T0) == {
        ("queue", "day"): ("2026-12-03", 0.0, 1.5), ("queue", "month"): ("2026-12", 0.0, 1.5),
        ("tenant=acme", "day"): ("2026-12-03", 0.0, 1.5),
    }
    await s.settle(hold, 0.25, now_s=T0 + 5)
    assert await state(s, T0 + 5) == {
        ("queue", "day"): ("2026-12-03", 0.25, 0.0), ("queue", "month"): ("2026-12", 0.25, 0.0),
        ("tenant=acme", "day"): ("2026-12-03", 0.25, 0.0),
    }
    ttl = await client.ttl("flexq-budget-test:budget:queue:2026-12-03")
    assert ttl > DAY_END - T0  # kept past the window's end (on the real clock: far past)
    snap = await s.snapshot(T0 + 6)
    assert snap[0] == {
        "scope": "queue", "window": "day", "window_id": "2026-12-03", "limit_usd": 20.0, "spent_usd": 0.25,
        "reserved_usd": 0.0, "left_usd": 19.75, "ends_at": "2026-12-04T00:00:00Z",
    }


async def test_refusal_names_the_budget_and_reserves_nothing(client: Redis) -> None:
    s = store(client, [QUEUE_DAY, ACME_DAY])
    first = await s.reserve("j1", [QUEUE_DAY, ACME_DAY], 4.0, now_s=T0)
    assert isinstance(first, Hold)
    await s.settle(first, 4.0, now_s=T0)
    second = await s.reserve("j2", [QUEUE_DAY, ACME_DAY], 0.9, now_s=T0)  # 4.9 of 5: fits
    assert isinstance(second, Hold)
    refused = await s.reserve("j3", [QUEUE_DAY, ACME_DAY], 0.2, now_s=T0 + 1)  # 4 + 0.9 + 0.2 > 5
    assert refused == Refusal(ACME_DAY, 4.0, 0.9, 0.2, DAY_END, T0 + 1)
    assert await state(s, T0 + 1) == {
        ("queue", "day"): ("2026-12-03", 4.0, 0.9), ("tenant=acme", "day"): ("2026-12-03", 4.0, 0.9),
    }
    # the queue's budget alone still takes it: an untagged job is not held back by acme's
    assert isinstance(await s.reserve("j4", [QUEUE_DAY], 0.2, now_s=T0 + 1), Hold)


async def test_a_spent_budget_refuses_even_an_unknown_price(client: Redis) -> None:
    small = Budget("queue", "day", 1.0)
    s = store(client, [small])
    hold = await s.reserve("j1", [small], 0.0, now_s=T0)  # unknown price: reserves 0, fits
    assert isinstance(hold, Hold)
    await s.settle(hold, 1.0, now_s=T0)
    refused = await s.reserve("j2", [small], 0.0, now_s=T0)
    assert isinstance(refused, Refusal) and refused.spent_usd == 1.0


async def test_window_rollover(client: Redis) -> None:
    s = store(client, [QUEUE_DAY, QUEUE_MONTH])
    hold = await s.reserve("j1", [QUEUE_DAY, QUEUE_MONTH], 19.0, now_s=T0)
    assert isinstance(hold, Hold)
    await s.settle(hold, 19.0, now_s=T0)
    refused = await s.reserve("j2", [QUEUE_DAY, QUEUE_MONTH], 2.0, now_s=DAY_END - 0.001)
    assert isinstance(refused, Refusal) and refused.budget == QUEUE_DAY and refused.window_end_s == DAY_END
    assert isinstance(await s.reserve("j2", [QUEUE_DAY, QUEUE_MONTH], 2.0, now_s=DAY_END), Hold)  # a new day
    assert await state(s, DAY_END) == {("queue", "day"): ("2026-12-04", 0.0, 2.0),
                                       ("queue", "month"): ("2026-12", 19.0, 2.0)}
    assert await state(s, MONTH_END) == {("queue", "day"): ("2027-01-01", 0.0, 0.0),
                                         ("queue", "month"): ("2027-01", 0.0, 0.0)}


@pytest.mark.parametrize(
    ("now", "day", "month", "day_end", "month_end"),
    [
        (datetime(2028, 2, 29, 23, 59, 59, tzinfo=UTC), "2028-02-29", "2028-02", datetime(2028, 3, 1, tzinfo=UTC),
         datetime(2028, 3, 1, tzinfo=UTC)),
        (datetime(2027, 2, 28, 0, 0, tzinfo=UTC), "2027-02-28", "2027-02", datetime(2027, 3, 1, tzinfo=UTC),
         datetime(2027, 3, 1, tzinfo=UTC)),
        (datetime(2026, 12, 31, 12, tzinfo=UTC), "2026-12-31", "2026-12", datetime(2027, 1, 1, tzinfo=UTC),
         datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2100, 3, 1, tzinfo=UTC), "2100-03-01", "2100-03", datetime(2100, 3, 2, tzinfo=UTC),
         datetime(2100, 4, 1, tzinfo=UTC)),
        (datetime(2027, 1, 1, tzinfo=UTC), "2027-01-01", "2027-01", datetime(2027, 1, 2, tzinfo=UTC),
         datetime(2027, 2, 1, tzinfo=UTC)),
    ],
)
async def test_calendar_windows(
    client: Redis, now: datetime, day: str, month: str, day_end: datetime, month_end: datetime
) -> None:
    snap = await store(client, [QUEUE_DAY, QUEUE_MONTH]).snapshot(now.timestamp())
    assert [(b["window_id"], b["ends_at"]) for b in snap] == [
        (day, day_end.strftime("%Y-%m-%dT%H:%M:%SZ")), (month, month_end.strftime("%Y-%m-%dT%H:%M:%SZ")),
    ]


async def test_a_reservation_never_settled_lapses(client: Redis) -> None:
    s = store(client, [QUEUE_DAY], ttl_s=10.0)
    lost = await s.reserve("dead-worker-job", [QUEUE_DAY], 15.0, now_s=T0)
    assert isinstance(lost, Hold)
    assert isinstance(await s.reserve("j2", [QUEUE_DAY], 6.0, now_s=T0 + 9), Refusal)  # 15 + 6 > 20
    assert (await state(s, T0 + 9))[("queue", "day")] == ("2026-12-03", 0.0, 15.0)
    assert isinstance(await s.reserve("j2", [QUEUE_DAY], 6.0, now_s=T0 + 11), Hold)  # the lost one lapsed
    assert (await state(s, T0 + 11))[("queue", "day")] == ("2026-12-03", 0.0, 6.0)
    assert await client.hexists(s.prefix + "held", lost.id) == 0
    assert await client.zscore(s.prefix + "holds", lost.id) is None
    await s.settle(lost, 1.0, now_s=T0 + 12)  # a settle after the lapse: the spend counts, no reservation goes
    assert (await state(s, T0 + 12))[("queue", "day")] == ("2026-12-03", 1.0, 6.0)


async def test_stats_render_the_budgets(client: Redis) -> None:
    s = store(client, [ACME_DAY])
    hold = await s.reserve("j1", [ACME_DAY], 1.0, now_s=T0)
    assert isinstance(hold, Hold)
    await s.settle(hold, 1.25, now_s=T0)
    doc = summarize(counts={}, counters={}, latencies_ms=[])
    doc["budgets"] = await s.snapshot(T0)
    console = Console(file=io.StringIO(), width=240, color_system=None, highlight=False)
    render.stats(console, doc)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert ("budget tenant=acme per day (2026-12-03): spent $1.250000 of $5, reserved $0.000000, left $3.750000; "
            "window ends 2026-12-04T00:00:00Z") in out


# -- the runner (fakeredis) ------------------------------------------------------------------------

HI = GenerateRequest(model=MODEL, prompt="Hi")
FLEX_EST = estimate_usd(HI, Tier.FLEX, output_tokens_default=1024) or 0.0


def budget_runner(queue: FlexQueue, gemini: ScriptedGemini, day_usd: float, **settings: object) -> Runner:
    config = make_settings(budgets={"queue": {"day": day_usd}}, **settings)
    return Runner(store=queue.store, gemini=gemini, settings=config, worker_name="w", rand=lambda: 0.5)


async def queue_day(runner: Runner) -> tuple[float, float]:
    assert runner.budget is not None
    (snap,) = await runner.budget.snapshot()
    return snap["spent_usd"], snap["reserved_usd"]


async def test_runner_settles_the_answers_cost(fake_queue: FlexQueue) -> None:
    assert (await fake_queue.enqueue(HI, job_id="j1")).created
    gemini = ScriptedGemini.of(overloaded(), answer())
    runner = budget_runner(fake_queue, gemini, 1.0)
    assert await runner.run("j1") is not None  # a 503: retried, nothing spent
    assert await queue_day(runner) == (0.0, 0.0)
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and record.cost_usd == pytest.approx(cost_usd(MODEL, USAGE, Tier.FLEX))
    assert await queue_day(runner) == (round(record.cost_usd, 6), 0.0)


async def test_fallback_to_standard_does_not_escalate_past_a_budget(fake_queue: FlexQueue) -> None:
    assert (await fake_queue.enqueue(HI, job_id="j1", fallback="standard", deadline_s=60)).created
    gemini = ScriptedGemini.of(overloaded())
    runner = budget_runner(fake_queue, gemini, 1.5 * FLEX_EST, max_flex_attempts=1)  # flex fits, standard not
    assert await runner.run("j1") == 0.0  # one flex 503: straight to standard
    assert (await fake_queue.get("j1")).next_tier == Tier.STANDARD
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.FAILED and record.error is not None and record.error.kind == BUDGET_EXCEEDED
    assert "this attempt ~$" + f"{2 * FLEX_EST:.6f}" in record.error.message
    assert gemini.tiers == [Tier.FLEX]  # the standard call was never made
    assert len(record.attempts) == 1
    assert await queue_day(runner) == (0.0, 0.0)


async def test_a_job_over_budget_with_time_left_waits_without_an_attempt(fake_queue: FlexQueue) -> None:
    assert (await fake_queue.enqueue(HI, job_id="j1", deadline_s=30 * 24 * 3600)).created
    runner = budget_runner(fake_queue, ScriptedGemini.of(), FLEX_EST / 2)
    delay = await runner.run("j1")
    assert delay is not None and 0 < delay <= 86400 + WINDOW_SPREAD_S
    record = await fake_queue.get("j1")
    assert record.status == Status.QUEUED and record.attempts == []


# -- end to end ------------------------------------------------------------------------------------


def log_events(path: Path) -> list[dict[str, object]]:
    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


@pytest.mark.e2e
@pytest.mark.redis
async def test_worker_stops_jobs_at_the_budget(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    request = {"model": MODEL, "prompt": "Count to three.", "config": {"max_output_tokens": 200}}
    estimate = estimate_usd(GenerateRequest.model_validate(request), Tier.FLEX, output_tokens_default=1024)
    assert estimate is not None
    # 1. a roomy budget: the first job runs, and its cost is counted against today's window
    assert (await real_queue.enqueue(request, job_id="first", tags={"tenant": "acme"})).created
    roomy = json.dumps({"tenant=acme": {"day": 1.0}})
    with running_worker(worker_env(redis_url, sim.base_url, API_KEY, FLEXQ_BUDGETS=roomy), tmp_path / "w1.log"):
        first = (await wait_all(real_queue, ["first"], timeout_s=30))["first"]
    assert first.status == Status.SUCCEEDED and first.cost_usd
    assert sim.sim.stats.requests == 1
    # 2. a budget the next job's estimate alone fits, but not on top of what the first one spent
    tight = first.cost_usd / 2 + estimate
    budget = json.dumps({"tenant=acme": {"day": tight}})
    assert (await real_queue.enqueue(request, job_id="over", deadline_s=30, tags={"tenant": "acme"})).created
    assert (await real_queue.enqueue(request, job_id="waits", tags={"tenant": "acme"})).created
    assert (await real_queue.enqueue(request, job_id="untagged", deadline_s=30)).created
    log_path = tmp_path / "w2.log"
    with running_worker(worker_env(redis_url, sim.base_url, API_KEY, FLEXQ_BUDGETS=budget), log_path):
        records = await wait_all(real_queue, ["over", "untagged"], timeout_s=30)

        async def waiting() -> bool | None:
            return True if any(e.get("event") == "budget_wait" and e.get("job_id") == "waits"
                               for e in log_events(log_path)) else None

        await poll(waiting, timeout_s=30, what="the long-deadline job to wait for the window")
    over = records["over"]
    assert over.status == Status.FAILED and over.error is not None
    assert over.error.kind == BUDGET_EXCEEDED
    assert f"budget tenant=acme per day (${tight:g}) would be exceeded: spent ${first.cost_usd:.6f}" in (
        over.error.message
    )
    assert over.attempts == []  # refused before any call
    assert records["untagged"].status == Status.SUCCEEDED  # no budget applies to it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flexq", "stats", "--json",
        env=worker_env(redis_url, sim.base_url, API_KEY, FLEXQ_BUDGETS=budget), stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0
    (shown,) = json.loads(out)["budgets"]
    assert (shown["scope"], shown["window"], shown["limit_usd"]) == ("tenant=acme", "day", tight)
    assert shown["spent_usd"] == pytest.approx(first.cost_usd, abs=1e-6)
    waits = await real_queue.get("waits")
    assert waits.status in (Status.QUEUED, Status.RETRYING) and waits.attempts == []
    assert sim.sim.stats.requests == 2  # "first" and "untagged": nothing past the budget was called
