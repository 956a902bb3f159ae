"""End to end: real ``flexq worker`` processes + real google-genai SDK + the simulator + real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis as sync_redis

from producer.errors import InvalidJobError
from producer.models import JobRecord
from producer.queue import FlexQueue
from producer.status import Status
from simulator import RunningSimulator, SimConfig, start_simulator
from tests.conftest import API_KEY
from tests.helpers import poll, running_worker, wait_all, wait_status, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.redis]
MODEL = "gemini-2.5-flash"


async def enqueue(queue: FlexQueue, job_id: str, prompt: str, **kw: object) -> None:
    done = await queue.enqueue({"model": MODEL, "prompt": prompt}, job_id=job_id, **kw)  # type: ignore[arg-type]
    assert done.created


def outcomes(record: object) -> list[tuple[str | None, int | None]]:
    return [(a.outcome, a.http_status) for a in record.attempts]  # type: ignore[attr-defined]


async def test_each_outcome_and_its_history(real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path):
    cases = {
        "s503": ("[[fault:503x3]]", Status.SUCCEEDED, [("overloaded", 503)] * 3 + [("ok", 200)]),
        "s500": ("[[fault:500x1]]", Status.SUCCEEDED, [("server_error", 500), ("ok", 200)]),
        "s400": ("[[fault:400]]", Status.FAILED, [("client_error", 400)]),
        "s404": ("[[fault:404]]", Status.FAILED, [("client_error", 404)]),
        "safety": ("[[fault:safety]]", Status.FAILED, [("blocked", 200)]),
        "block": ("[[fault:block]]", Status.FAILED, [("blocked", 200)]),
        "reset": ("[[fault:resetx1]]", Status.SUCCEEDED, [("connection_error", None), ("ok", 200)]),
        "html": ("[[fault:html500x1]]", Status.SUCCEEDED, [("server_error", 500), ("ok", 200)]),
    }
    for job_id, (directive, _, _) in cases.items():
        await enqueue(real_queue, job_id, f"case {job_id} {directive}")
    with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log", "--concurrency", "4"):
        records = await wait_all(real_queue, list(cases), timeout_s=60)
    for job_id, (_, status, history) in cases.items():
        record = records[job_id]
        assert record.status == status, (job_id, record.error)
        assert outcomes(record) == history, job_id
        assert [a.number for a in record.attempts] == list(range(1, len(history) + 1))
    assert records["s503"].result is not None and records["s503"].result.text
    assert records["s503"].attempts[-1].served_tier == "flex"
    assert records["s503"].result.usage.total_tokens > 0
    assert records["s400"].error is not None and records["s400"].error.kind == "client_error"
    assert records["s400"].error.http_status == 400
    assert records["safety"].error is not None and records["safety"].error.kind == "blocked"
    assert "SAFETY" in records["safety"].error.message
    assert records["block"].error is not None and "PROHIBITED_CONTENT" in records["block"].error.message
    for retried in ("s503", "s500", "reset"):
        assert all(a.retry_in_s is not None for a in records[retried].attempts[:-1])


async def test_retry_info_delay_is_honoured(real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path):
    await enqueue(real_queue, "r429", "limited [[fault:429x1:retry=2s]]")
    with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log"):
        record = (await wait_all(real_queue, ["r429"], timeout_s=30))["r429"]
    assert outcomes(record) == [("rate_limited", 429), ("ok", 200)]
    first, second = record.attempts
    assert first.retry_in_s is not None and first.retry_in_s >= 3.0  # 2 s RetryInfo + 1 s truncation margin
    assert first.finished_at is not None
    assert (second.started_at - first.finished_at).total_seconds() >= 3.0


async def test_deferred_job_does_not_hold_the_only_slot(
    real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path
):
    # another model: a 429 pauses its own model for every worker (flow control), not the others
    slow = await real_queue.enqueue({"model": "gemini-2.5-pro", "prompt": "deferred [[fault:429x1:retry=4s]]"},
                                    job_id="slow")
    assert slow.created
    with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log", "--concurrency", "1"):
        await wait_status(real_queue, "slow", Status.RETRYING)
        await enqueue(real_queue, "fast", "served meanwhile")
        records = await wait_all(real_queue, ["slow", "fast"], timeout_s=30)
    fast, slow = records["fast"], records["slow"]
    assert fast.status == slow.status == Status.SUCCEEDED
    assert fast.attempts[0].finished_at is not None
    # The only slot served "fast" while "slow" waited out its deferral: no blocking sleep.
    assert fast.attempts[0].finished_at < slow.attempts[1].started_at


async def test_same_id_twice_runs_once(real_queue: FlexQueue, redis_url: str, tmp_path: Path):
    running = await start_simulator(SimConfig(latency_s=0.01))
    try:
        first = await real_queue.enqueue({"model": MODEL, "prompt": "once"}, job_id="dup")
        second = await real_queue.enqueue({"model": MODEL, "prompt": "once, again"}, job_id="dup")
        assert first.created and not second.created
        assert second.record.request is not None and second.record.request.prompt == "once"
        with running_worker(worker_env(redis_url, running.base_url, API_KEY), tmp_path / "w.log"):
            await wait_all(real_queue, ["dup"])
        third = await real_queue.enqueue({"model": MODEL, "prompt": "once"}, job_id="dup")
        assert not third.created and third.record.status == Status.SUCCEEDED
        assert running.sim.stats.requests == 1
    finally:
        await running.close()


async def call_reached(sim: RunningSimulator, count: int = 1) -> None:
    async def check() -> bool | None:
        return True if sim.sim.stats.requests >= count else None

    await poll(check, timeout_s=20, what=f"{count} call(s) at the simulator")


async def test_sigkilled_worker_job_finishes_once_within_the_lease(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
):
    env = worker_env(redis_url, sim.base_url, API_KEY, FLEXQ_LEASE_S="3")
    await enqueue(real_queue, "victim", "survive [[fault:hangx1]]")
    with running_worker(env, tmp_path / "w1.log") as first:
        await wait_status(real_queue, "victim", Status.RUNNING)
        await call_reached(sim)
        first.kill()
    with running_worker(env, tmp_path / "w2.log"):
        # recovered within the lease (3 s) plus polling, far below the 960 s job timeout
        record = (await wait_all(real_queue, ["victim"], timeout_s=20))["victim"]
    assert record.status == Status.SUCCEEDED
    assert [a.outcome for a in record.attempts] == ["interrupted", "ok"]
    assert sum(a.outcome == "ok" for a in record.attempts) == 1
    assert record.attempts[0].worker != record.attempts[1].worker


async def test_sigterm_mid_attempt_records_interrupted_and_another_worker_finishes(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
):
    env = worker_env(redis_url, sim.base_url, API_KEY)
    await enqueue(real_queue, "graceful", "stop me [[fault:hangx1]]")
    with running_worker(env, tmp_path / "w1.log") as first:
        await wait_status(real_queue, "graceful", Status.RUNNING)
        await call_reached(sim)
        assert first.stop() == 0
    record = await real_queue.get("graceful")
    assert record.status == Status.RETRYING
    assert record.attempts[0].outcome == "interrupted"
    with running_worker(env, tmp_path / "w2.log"):
        record = (await wait_all(real_queue, ["graceful"], timeout_s=20))["graceful"]
    assert [a.outcome for a in record.attempts] == ["interrupted", "ok"]


async def test_cancel_running_job_aborts_the_call(real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path):
    await enqueue(real_queue, "abort-me", "long [[fault:hang]]")
    await enqueue(real_queue, "never", "later [[fault:429x1:retry=30s]]")
    with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log"):
        await wait_status(real_queue, "abort-me", Status.RUNNING)
        await wait_status(real_queue, "never", Status.RETRYING)
        await real_queue.cancel("abort-me")
        await real_queue.cancel("never")
        aborted = await wait_status(real_queue, "abort-me", Status.CANCELLED, timeout_s=15)
    never = await real_queue.get("never")
    assert aborted.error is not None and aborted.error.kind == "cancelled"
    assert [a.outcome for a in aborted.attempts] == ["interrupted"]
    assert never.status == Status.CANCELLED and len(never.attempts) == 1


async def test_retry_of_failed_job_keeps_and_extends_history(
    real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path
):
    await enqueue(real_queue, "again", "refused [[fault:400]]")
    with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log"):
        assert (await wait_all(real_queue, ["again"]))["again"].status == Status.FAILED
        requeued = await real_queue.retry("again")
        assert requeued.status == Status.QUEUED
        record = await poll(
            lambda: _terminal_with(real_queue, "again", attempts=2), timeout_s=20, what="second run"
        )
    assert [a.number for a in record.attempts] == [1, 2]
    assert record.status == Status.FAILED and record.enqueues == 2


async def _terminal_with(queue: FlexQueue, job_id: str, attempts: int) -> object | None:
    record = await queue.get(job_id)
    return record if record.terminal and len(record.attempts) == attempts else None


async def test_deadline_and_standard_fallback(real_queue: FlexQueue, redis_url: str, tmp_path: Path):
    running = await start_simulator(SimConfig(latency_s=0.01, rate_503=1.0))  # flex always shed
    try:
        await enqueue(real_queue, "gives-up", "no fallback", deadline_s=2.5)
        await enqueue(real_queue, "escalates", "fallback", deadline_s=2.5, fallback="standard")
        with running_worker(worker_env(redis_url, running.base_url, API_KEY), tmp_path / "w.log"):
            records = await wait_all(real_queue, ["gives-up", "escalates"], timeout_s=30)
    finally:
        await running.close()
    gave_up, escalated = records["gives-up"], records["escalates"]
    assert gave_up.status == Status.FAILED and gave_up.error is not None
    assert gave_up.error.kind == "deadline_exceeded"
    assert all(a.tier == "flex" and a.outcome == "overloaded" for a in gave_up.attempts)
    assert escalated.status == Status.SUCCEEDED
    assert escalated.attempts[-1].tier == "standard" and escalated.attempts[-1].served_tier == "standard"
    assert all(a.tier == "flex" for a in escalated.attempts[:-1])
    assert escalated.result is not None and escalated.result.tier == "standard"


async def test_malformed_jobs_fail_alone_and_nothing_is_pickled_or_leaked(
    real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path
):
    raw = sync_redis.Redis.from_url(redis_url)
    keys = real_queue.store.keys
    # garbage arq payload, an arq job for an id with no record, and a corrupt record
    raw.set("arq:job:garbage", b"\x80\x04not json")
    raw.zadd(keys.arq_queue, {"garbage": 1})
    raw.set("arq:job:orphan", json.dumps({"t": None, "f": "run_generation", "a": ["orphan"], "k": {}, "et": 1}))
    raw.zadd(keys.arq_queue, {"orphan": 1})
    await enqueue(real_queue, "corrupt", "will be corrupted")
    raw.set(keys.record("corrupt"), b"{not json")
    await enqueue(real_queue, "fine", "healthy")
    log_path = tmp_path / "w.log"
    with running_worker(worker_env(redis_url, sim_url, API_KEY), log_path) as worker:
        records = await wait_all(real_queue, ["fine"], timeout_s=30)
        records["corrupt"] = await poll(lambda: _readable(real_queue, "corrupt"), timeout_s=30, what="quarantine")
        assert worker.proc.poll() is None  # the worker survived all of it
    assert records["fine"].status == Status.SUCCEEDED
    assert records["corrupt"].status == Status.FAILED
    assert records["corrupt"].error is not None and records["corrupt"].error.kind == "invalid_job"
    # no secret anywhere in Redis or the logs; nothing pickled
    for key in raw.scan_iter(count=1000):
        kind = raw.type(key)
        if kind == b"string":
            value = raw.get(key) or b""
            assert API_KEY.encode() not in value, key
            if key.startswith(b"arq:job:") and key != b"arq:job:garbage":
                json.loads(value)
            if key != b"arq:job:garbage":
                assert not value.startswith(b"\x80"), f"pickle header in {key!r}"
        elif kind == b"hash":
            assert API_KEY.encode() not in b"".join(k + v for k, v in raw.hgetall(key).items())
    assert API_KEY not in log_path.read_text()
    raw.close()


async def _readable(queue: FlexQueue, job_id: str) -> JobRecord | None:
    try:
        return await queue.get(job_id)
    except InvalidJobError:
        return None


async def test_worker_without_api_key_says_how_to_set_one(redis_url: str, sim_url: str, tmp_path: Path):
    env = worker_env(redis_url, sim_url, "")
    env.pop("GEMINI_API_KEY")
    with running_worker(env, tmp_path / "w.log") as worker:
        code = worker.proc.wait(30)
        log = worker.log()
    assert code != 0
    assert "GEMINI_API_KEY" in log and "Traceback" not in log


async def test_an_endpoint_never_reached_fails_the_job_with_the_cause(
    real_queue: FlexQueue, redis_url: str, tmp_path: Path
) -> None:
    """A wrong GEMINI_BASE_URL (nothing listens there): instead of retrying until the 24 h deadline,
    the job fails with ``unreachable`` once every attempt was a connection error for the span."""
    from bench.common import free_port

    await real_queue.enqueue({"model": "gemini-2.5-flash", "prompt": "anyone there?"}, job_id="void")
    env = worker_env(redis_url, f"http://127.0.0.1:{free_port()}", API_KEY, FLEXQ_UNREACHABLE_FAIL_S="1",
                     FLEXQ_RETRY_BASE_S="0.1", FLEXQ_RETRY_MAX_S="0.3")
    with running_worker(env, tmp_path / "w.log"):
        record = await real_queue.wait("void", timeout_s=60)
    assert record.status == Status.FAILED
    assert record.error is not None and record.error.kind == "unreachable"
    assert "connection error" in record.error.message and "FLEXQ_UNREACHABLE_FAIL_S=1" in record.error.message
    assert len(record.attempts) >= 2
    assert {a.outcome for a in record.attempts} == {"connection_error"}
