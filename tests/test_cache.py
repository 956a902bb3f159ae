"""The response cache (``producer.cache``): identical requests answered once, later ones at zero cost."""

from __future__ import annotations

from pathlib import Path

from producer.cache import request_key
from producer.queue import FlexQueue
from producer.request import GenerateRequest
from producer.request import parse_request as parse
from producer.status import Outcome, Status
from simulator import RunningSimulator
from tests.conftest import API_KEY, make_settings
from tests.helpers import running_worker, worker_env

MODEL = "gemini-2.5-flash"


def parse_request(data: dict[str, object]) -> GenerateRequest:
    return parse(data, max_bytes=1 << 20)


def test_the_key_is_the_canonical_request() -> None:
    a = parse_request({"model": MODEL, "prompt": "hi", "config": {"temperature": 0.2, "max_output_tokens": 9}})
    b = parse_request({"config": {"max_output_tokens": 9, "temperature": 0.2}, "prompt": "hi", "model": MODEL})
    assert request_key(a) == request_key(b)
    assert len(request_key(a)) == 64
    other_config = parse_request({"model": MODEL, "prompt": "hi", "config": {"temperature": 0.3}})
    other_prompt = parse_request({"model": MODEL, "prompt": "hi!"})
    other_model = parse_request({"model": "gemini-2.5-pro", "prompt": "hi"})
    assert len({request_key(r) for r in (a, other_config, other_prompt, other_model)}) == 4


async def test_an_identical_request_is_answered_from_the_cache(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    request = {"model": MODEL, "prompt": "classify: invoice or receipt?"}
    with running_worker(worker_env(redis_url, sim.base_url, API_KEY), tmp_path / "w.log"):
        await real_queue.enqueue(request, job_id="first", cache=True)
        first = await real_queue.wait("first", timeout_s=60)
        await real_queue.enqueue(request, job_id="second", cache=True)
        second = await real_queue.wait("second", timeout_s=60)
        await real_queue.enqueue(request, job_id="not-opted-in")
        third = await real_queue.wait("not-opted-in", timeout_s=60)
    assert first.status == second.status == third.status == Status.SUCCEEDED
    assert [a.outcome for a in first.attempts] == [Outcome.OK] and first.cost_usd and first.cost_usd > 0
    assert [a.outcome for a in second.attempts] == [Outcome.CACHED]
    assert second.cost_usd == 0.0 and second.attempts[0].latency_ms == 0
    assert second.result is not None and first.result is not None and second.result.text == first.result.text
    assert [a.outcome for a in third.attempts] == [Outcome.OK]  # a job that did not opt in calls
    assert sim.sim.stats.requests == 2
    stats = await real_queue.stats()
    assert stats["attempts"]["by_outcome"].get("cached") == 1


async def test_a_queue_wide_opt_in_and_a_ttl_of_zero(redis_url: str, sim: RunningSimulator, tmp_path: Path) -> None:
    queue = await FlexQueue.connect(make_settings(redis_url=redis_url, cache=True))  # FLEXQ_CACHE=1
    try:
        request = {"model": MODEL, "prompt": "same question"}
        env = worker_env(redis_url, sim.base_url, API_KEY, FLEXQ_CACHE_TTL_S="0")  # answers are not kept
        with running_worker(env, tmp_path / "w.log"):
            await queue.enqueue(request, job_id="a")
            a = await queue.wait("a", timeout_s=60)
            await queue.enqueue(request, job_id="b")
            b = await queue.wait("b", timeout_s=60)
        assert a.cache and b.cache
        assert [x.attempts[-1].outcome for x in (a, b)] == [Outcome.OK, Outcome.OK]
        assert not [key async for key in queue.redis.scan_iter(match=f"{queue.settings.queue}:cache:*")]
    finally:
        await queue.close()
