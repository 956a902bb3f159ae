"""Tier policy per job: flex (default), standard, priority (served at standard past its limit, and recorded
so), batch (worker.batch_tier); the real SDK against the simulator, records in Redis."""

from __future__ import annotations

from typing import Any

import pytest

from producer.errors import InvalidRequestError
from producer.pricing import PRIORITY_FACTOR, cost_usd
from producer.queue import FlexQueue
from producer.status import Status, Tier
from simulator import RunningSimulator
from tests.conftest import make_settings
from worker.gemini import GeminiClient
from worker.runner import Runner

MODEL = "gemini-2.5-flash"
KEY = "vertex-key-DO-NOT-LEAK-4411"


async def run_once(queue: FlexQueue, sim: RunningSimulator, job_id: str, **overrides: Any) -> None:
    settings = make_settings(gemini_base_url=sim.base_url, request_timeout_s=10, **overrides)
    client = GeminiClient(settings)
    try:
        runner = Runner(store=queue.store, gemini=client, settings=settings, worker_name="w", rand=lambda: 0.5)
        assert await runner.run(job_id) is None
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("tier", "capacity", "served", "billed"),
    [
        pytest.param("priority", None, "priority", Tier.PRIORITY, id="priority-served-as-priority"),
        pytest.param("priority", 0, "standard", Tier.STANDARD, id="priority-past-its-limit-served-at-standard"),
        pytest.param("standard", None, "standard", Tier.STANDARD, id="standard"),
        pytest.param(None, None, "flex", Tier.FLEX, id="flex-by-default"),
    ],
)
async def test_a_jobs_tier_is_asked_for_and_what_was_served_is_recorded_and_billed(
    fake_queue: FlexQueue, sim: RunningSimulator, tier: str | None, capacity: int | None, served: str, billed: Tier
) -> None:
    sim.sim.config = sim.sim.config.updated({"priority_capacity": capacity})
    await fake_queue.enqueue({"model": MODEL, "prompt": "Hello"}, job_id="j", tier=tier)
    await run_once(fake_queue, sim, "j")
    record = await fake_queue.get("j")
    asked = Tier(tier) if tier else Tier.FLEX
    assert record.status == Status.SUCCEEDED and record.tier == asked
    [attempt] = record.attempts
    assert attempt.tier == asked and attempt.served_tier == served and attempt.channel == "default"
    assert record.result is not None and record.result.tier == served
    assert attempt.usage is not None
    assert record.cost_usd == cost_usd(MODEL, attempt.usage, billed)
    assert sim.sim.stats.by_tier == {str(asked): 1}


def test_priority_costs_its_published_multiple_of_standard() -> None:
    from producer.models import Usage

    usage = Usage(prompt_tokens=1000, output_tokens=1000)
    standard = cost_usd(MODEL, usage, Tier.STANDARD)
    assert standard is not None
    assert cost_usd(MODEL, usage, Tier.PRIORITY) == pytest.approx(standard * PRIORITY_FACTOR)
    assert cost_usd(MODEL, usage, Tier.BATCH) == pytest.approx(standard / 2)


async def test_priority_is_not_shed_where_flex_is(fake_queue: FlexQueue, sim: RunningSimulator) -> None:
    sim.sim.config = sim.sim.config.updated({"rate_503": 1.0})
    await fake_queue.enqueue({"model": MODEL, "prompt": "Hello"}, job_id="p", tier="priority")
    await run_once(fake_queue, sim, "p")
    assert (await fake_queue.get("p")).status == Status.SUCCEEDED


async def test_vertex_priority_goes_in_the_header_and_the_traffic_type_says_what_was_served(
    fake_queue: FlexQueue, sim: RunningSimulator
) -> None:
    sim.sim.config = sim.sim.config.updated({"priority_capacity": 0})
    await fake_queue.enqueue({"model": MODEL, "prompt": "Hello"}, job_id="v", tier="priority")
    await run_once(fake_queue, sim, "v", vertex=True, vertex_api_key=KEY, gemini_api_key=None)
    record = await fake_queue.get("v")
    [attempt] = record.attempts
    assert attempt.served_tier == "standard" and attempt.usage is not None
    assert attempt.usage.traffic_type == "ON_DEMAND"
    [facts] = sim.sim.stats.vertex_calls
    assert facts["shared_request_type"] == "priority" and facts["body_has_service_tier"] is False


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        pytest.param({"tier": "gold"}, "tier", "must be one of", id="unknown-tier"),
        pytest.param({"fallback": "flex"}, "fallback", "for batch-tier jobs", id="flex-fallback-needs-batch"),
        pytest.param({"fallback": "always"}, "fallback", "must be 'none', 'flex' or 'standard'", id="bad-fallback"),
    ],
)
async def test_a_bad_tier_policy_is_refused_at_enqueue_naming_the_field(
    fake_queue: FlexQueue, kwargs: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message) as raised:
        await fake_queue.enqueue({"model": MODEL, "prompt": "hi"}, **kwargs)
    assert raised.value.field == field


async def test_far_deadlines_go_to_the_batch_tier_when_enabled(fake_redis: Any) -> None:
    queue = await FlexQueue.connect(make_settings(batch_after_s=86_400), redis=fake_redis)
    far = await queue.enqueue({"model": MODEL, "prompt": "hi"}, deadline_s=2 * 86_400)
    near = await queue.enqueue({"model": MODEL, "prompt": "hi"}, deadline_s=600)
    chosen = await queue.enqueue({"model": MODEL, "prompt": "hi"}, deadline_s=2 * 86_400, tier="flex")
    assert (far.record.tier, far.record.next_tier) == (Tier.BATCH, Tier.BATCH)
    assert near.record.tier == Tier.FLEX
    assert chosen.record.tier == Tier.FLEX  # a tier given is kept


async def test_flexq_retry_starts_again_on_the_jobs_own_tier(fake_queue: FlexQueue, sim: RunningSimulator) -> None:
    await fake_queue.enqueue({"model": MODEL, "prompt": "[[fault:400]]"}, job_id="r", tier="priority")
    await run_once(fake_queue, sim, "r")
    assert (await fake_queue.get("r")).status == Status.FAILED
    retried = await fake_queue.retry("r")
    assert retried.next_tier == Tier.PRIORITY


@pytest.mark.e2e
@pytest.mark.redis
async def test_flexq_worker_sends_batch_jobs_through_the_batch_api(
    real_queue: FlexQueue, redis_url: str, tmp_path: Any
) -> None:
    from producer.queue import JobSpec
    from simulator import SimConfig, start_simulator
    from tests.conftest import API_KEY
    from tests.helpers import running_worker, wait_all, worker_env

    running = await start_simulator(SimConfig(latency_s=0.01, batch_turnaround_s=0.5))
    try:
        env = worker_env(redis_url, running.base_url, API_KEY, FLEXQ_BATCH_PACK_S="0.5", FLEXQ_BATCH_POLL_S="0.5")
        ids = [f"b{i}" for i in range(3)]
        await real_queue.enqueue_many(
            [JobSpec({"model": MODEL, "prompt": f"batch {i}"}, job_id=i, tier="batch") for i in ids]
        )
        with running_worker(env, tmp_path / "w.log"):
            records = await wait_all(real_queue, ids, timeout_s=60)
        assert all(r.status == Status.SUCCEEDED for r in records.values())
        names = {r.attempts[-1].channel for r in records.values()}
        assert len(names) == 1 and next(iter(names), "").startswith("batches/")  # one Batch API job for all
        assert all([a.tier for a in r.attempts] == [Tier.BATCH] for r in records.values())
        assert running.sim.stats.requests == 0  # no generateContent call: all through the Batch API
        assert running.sim.stats.batches_created == 1
    finally:
        await running.close()
