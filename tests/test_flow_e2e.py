"""Flow control across real worker processes on one real Redis, against the simulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from producer.queue import FlexQueue, JobSpec
from producer.status import Status
from simulator import SimConfig, start_simulator
from tests.conftest import API_KEY
from tests.helpers import ROOT, poll, running_worker, wait_all, wait_status, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.redis]
MODEL = "gemini-2.5-flash"


def stats_json(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "flexq", "stats", "--json"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=30, check=True,
    )
    return dict(json.loads(done.stdout))


async def test_a_429_pauses_the_model_for_every_worker(real_queue: FlexQueue, redis_url: str, tmp_path: Path):
    running = await start_simulator(SimConfig(latency_s=0.01))
    try:
        env = worker_env(redis_url, running.base_url, API_KEY)
        first = await real_queue.enqueue({"model": MODEL, "prompt": "limited [[fault:429x1:retry=3s]]"}, job_id="a")
        assert first.created
        with running_worker(env, tmp_path / "w1.log"), running_worker(env, tmp_path / "w2.log"):
            limited = await wait_status(real_queue, "a", Status.RETRYING)
            calls_at_pause = running.sim.stats.requests
            others = [f"b{i}" for i in range(6)]
            await real_queue.enqueue_many([JobSpec({"model": MODEL, "prompt": f"other {i}"}, job_id=i) for i in others])
            other_model = await real_queue.enqueue({"model": "gemini-2.5-pro", "prompt": "unaffected"}, job_id="c")
            assert other_model.created
            records = await wait_all(real_queue, ["a", "c", *others], timeout_s=30)
            stats = stats_json(env)
        paused_at = limited.attempts[0].finished_at
        assert paused_at is not None
        for job_id in others:  # no worker called the paused model before RetryInfo's 3 s passed
            assert records[job_id].status == Status.SUCCEEDED
            assert (records[job_id].attempts[0].started_at - paused_at).total_seconds() >= 3.0
        # a different model is not paused
        assert (records["c"].attempts[0].started_at - paused_at).total_seconds() < 3.0
        assert calls_at_pause == 1
        assert len(records["a"].attempts) == 2
        assert "flow" in stats and isinstance(stats["flow_control"], dict)
    finally:
        await running.close()


async def test_breaker_opens_on_a_burst_of_errors_and_a_probe_closes_it(
    real_queue: FlexQueue, redis_url: str, tmp_path: Path
):
    running = await start_simulator(SimConfig(latency_s=0.01, rate_500=1.0))  # every call fails
    try:
        env = worker_env(redis_url, running.base_url, API_KEY, FLEXQ_BREAKER_MIN_FAILURES="5",
                         FLEXQ_BREAKER_COOL_DOWN_S="2")
        ids = [f"j{i}" for i in range(12)]
        await real_queue.enqueue_many([JobSpec({"model": MODEL, "prompt": f"job {i}"}, job_id=i) for i in ids])
        with running_worker(env, tmp_path / "w1.log"), running_worker(env, tmp_path / "w2.log"):

            async def breaker_open() -> dict[str, object] | None:
                doc = stats_json(env)
                scopes = doc["flow_control"]["scopes"]  # type: ignore[index]
                return doc if any(s["breaker"]["state"] == "open" for s in scopes) else None

            opened = await poll(breaker_open, timeout_s=30, what="the breaker to open")
            calls_when_open = running.sim.stats.requests
            running.sim.config = running.sim.config.updated({"rate_500": 0.0})  # the service recovers
            records = await wait_all(real_queue, ids, timeout_s=60)
            closed = stats_json(env)
        assert all(r.status == Status.SUCCEEDED for r in records.values())
        transitions = [(t["from"], t["to"]) for t in closed["flow_control"]["transitions"]]  # type: ignore[index]
        assert ("closed", "open") in transitions and ("half_open", "closed") in transitions
        assert any("breaker" in line and "open" in line for line in opened["flow"])  # type: ignore[union-attr]
        # while open, jobs deferred without calling: far fewer calls than jobs x retries
        assert running.sim.stats.requests - calls_when_open <= len(ids) + 2
    finally:
        await running.close()


async def test_concurrency_converges_under_a_capacity_limited_pool(
    real_queue: FlexQueue, redis_url: str, tmp_path: Path
):
    running = await start_simulator(SimConfig(latency_s=0.3, latency_dist="exp", capacity=8, seed=3))
    try:
        env = worker_env(redis_url, running.base_url, API_KEY)
        ids = [f"c{i}" for i in range(150)]
        await real_queue.enqueue_many([JobSpec({"model": MODEL, "prompt": f"job {i}"}, job_id=i) for i in ids])
        with running_worker(env, tmp_path / "w1.log"), running_worker(env, tmp_path / "w2.log"):
            records = await wait_all(real_queue, ids, timeout_s=90)
            doc = stats_json(env)
        assert all(r.status == Status.SUCCEEDED for r in records.values())
        calls = running.sim.stats.requests
        assert calls / len(ids) <= 1.5  # the shared limit keeps shedding low (without it: most calls shed)
        scope = next(s for s in doc["flow_control"]["scopes"] if s["tier"] == "flex")  # type: ignore[index]
        assert 3 <= scope["limit"] <= 16  # learned near the pool's capacity of 8, shared by both workers
        assert scope["in_flight"] == 0
    finally:
        await running.close()
