"""The worker's claimed runs (worker.runtime.FlexqWorker, worker/lua/claim.lua) on a real Redis.

A due job is claimed and its record read in one script call; when the job ends, the attempt's
record write also removes its arq job, instead of arq's own finish (a deferral is arq's Retry). These
tests check that arq's state after each run is what arq's own start/finish would have left, and the
command recorder the compare-and-set script is given against redis-py's own encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest
from redis import asyncio as aioredis
from redis.asyncio import Redis

from producer import arq_wire
from producer.commands import Commands
from producer.queue import FlexQueue
from producer.status import Status
from tests.conftest import make_settings
from tests.fakes import ScriptedGemini, answer, client_error, overloaded
from worker.runtime import create_worker, shutdown, startup

MODEL = "gemini-2.5-flash"
QUEUE = arq_wire.queue_key("flexq-test")


async def run_worker(redis_url: str, gemini: ScriptedGemini, **options: Any) -> Any:
    settings = make_settings(redis_url=redis_url, flow=False)
    worker = create_worker(settings, burst=True, handle_signals=False,
                           ctx={"flexq_gemini_factory": lambda *_a, **_k: gemini, "flexq_configure_logs": False},
                           **options)
    await worker.main()
    await worker.close()
    return worker


async def arq_state(redis: Redis, job_id: str) -> dict[str, Any]:
    return {
        "job": await redis.exists(arq_wire.job_key(job_id)),
        "in_progress": await redis.exists(arq_wire.in_progress_key(job_id)),
        "retries": await redis.exists(arq_wire.retry_key(job_id)),
        "result": await redis.exists(arq_wire.result_key(job_id)),
        "score": await redis.zscore(QUEUE, job_id),
        "abort": await redis.zscore(arq_wire.ABORT_SET, job_id),
    }


@pytest.fixture
async def queue(redis_url: str) -> Any:
    q = await FlexQueue.connect(make_settings(redis_url=redis_url))
    yield q
    await q.close()


async def test_a_success_leaves_no_arq_state_behind(queue: FlexQueue, redis_url: str) -> None:
    await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="ok-1")
    worker = await run_worker(redis_url, ScriptedGemini.of(answer("hello")))
    record = await queue.get("ok-1")
    assert record.status == Status.SUCCEEDED and record.result is not None
    assert await arq_state(queue.store.redis, "ok-1") == {
        "job": 0, "in_progress": 0, "retries": 0, "result": 0, "score": None, "abort": None}
    assert worker.jobs_complete == 1 and worker.jobs_failed == 0


async def test_a_permanent_error_ends_the_arq_job_with_the_record(queue: FlexQueue, redis_url: str) -> None:
    await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="bad-1")
    await run_worker(redis_url, ScriptedGemini.of(client_error(400)))
    record = await queue.get("bad-1")
    assert record.status == Status.FAILED
    state = await arq_state(queue.store.redis, "bad-1")
    assert state["job"] == 0 and state["score"] is None and state["in_progress"] == 0


async def test_a_deferral_rescores_the_arq_job(queue: FlexQueue, redis_url: str) -> None:
    """arq's Retry: the job stays, due after the policy's delay, its in-progress key released."""
    await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="shed-1")
    before_ms = time.time() * 1000
    await run_worker(redis_url, ScriptedGemini.of(overloaded()), max_burst_jobs=1)
    after_ms = time.time() * 1000
    record = await queue.get("shed-1")
    assert record.status == Status.RETRYING
    delay_s = record.attempts[-1].retry_in_s
    assert delay_s is not None and delay_s > 0
    state = await arq_state(queue.store.redis, "shed-1")
    assert state["job"] == 1 and state["in_progress"] == 0
    assert before_ms + delay_s * 1000 <= state["score"] <= after_ms + delay_s * 1000


async def test_a_stale_abort_request_is_spent_and_the_record_decides(queue: FlexQueue, redis_url: str) -> None:
    """An abort left from an earlier run does not fail a job its record says should run (arq's own
    run would have failed it without a look at the record)."""
    await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="ab-1")
    await queue.store.redis.zadd(arq_wire.ABORT_SET, {"ab-1": time.time() * 1000})
    await run_worker(redis_url, ScriptedGemini.of(answer("hello")))
    assert (await queue.get("ab-1")).status == Status.SUCCEEDED
    assert await queue.store.redis.zscore(arq_wire.ABORT_SET, "ab-1") is None


async def test_a_job_whose_record_is_gone_is_dropped(queue: FlexQueue, redis_url: str) -> None:
    await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="gone-1")
    await queue.store.redis.delete(queue.store.keys.record("gone-1"))
    gemini = ScriptedGemini.of()
    await run_worker(redis_url, gemini)
    assert gemini.calls == []
    state = await arq_state(queue.store.redis, "gone-1")
    assert state["score"] is None and state["job"] == 0 and state["in_progress"] == 0


async def test_a_job_running_elsewhere_or_not_due_is_not_claimed(queue: FlexQueue, redis_url: str) -> None:
    settings = make_settings(redis_url=redis_url, flow=False)
    gemini = ScriptedGemini.of()
    worker = create_worker(settings, handle_signals=False,
                           ctx={"flexq_gemini_factory": lambda *_a, **_k: gemini, "flexq_configure_logs": False})
    worker._pool = worker.pool or await worker_pool(redis_url)
    await startup(worker.ctx)
    try:
        await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="busy-1")
        await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="later-1")
        redis = queue.store.redis
        await redis.set(arq_wire.in_progress_key("busy-1"), b"1", px=60_000)  # another worker runs it
        await redis.zadd(QUEUE, {"later-1": time.time() * 1000 + 60_000})  # deferred meanwhile
        slots = worker.sem._value
        await worker.start_jobs([b"busy-1", b"later-1"])
        assert worker.tasks == {} and worker.job_counter == 0
        assert worker.sem._value == slots  # every slot given back
        assert await redis.pttl(arq_wire.in_progress_key("busy-1")) > 50_000  # left as the owner set it
        assert await redis.exists(arq_wire.in_progress_key("later-1")) == 0
    finally:
        await shutdown(worker.ctx)
        await worker.close()


@contextlib.asynccontextmanager
async def counting_worker(redis_url: str, gemini: ScriptedGemini, *, flow: bool, max_jobs: int, **settings: Any
                          ) -> AsyncIterator[tuple[Any, list[int]]]:
    """A started (not running) worker whose claim script calls are counted: each call's number of jobs."""
    worker = create_worker(make_settings(redis_url=redis_url, flow=flow, **settings), handle_signals=False,
                           max_jobs=max_jobs,
                           ctx={"flexq_gemini_factory": lambda *_a, **_k: gemini, "flexq_configure_logs": False})
    worker._pool = worker.pool or await worker_pool(redis_url)
    await startup(worker.ctx)
    calls: list[int] = []
    script = worker._claim_script

    async def counted(*, keys: list[str], args: list[Any]) -> Any:
        calls.append(len(args) - 2)
        return await script(keys=keys, args=args)

    worker.__dict__["_claim"] = counted
    try:
        yield worker, calls
    finally:
        await shutdown(worker.ctx)
        await worker.close()


async def test_one_script_call_claims_every_due_job_a_slot_is_free_for(queue: FlexQueue, redis_url: str) -> None:
    """A poll's due jobs are claimed together: jobs running elsewhere or deferred are skipped, the free
    slots are filled in queue order, the rest stay due for the next poll, each claimed job's abort is spent."""
    async with counting_worker(redis_url, ScriptedGemini.of(answer("one"), answer("two")), flow=False,
                               max_jobs=2) as (worker, calls):
        for job_id in ("busy-2", "later-2", "a-2", "b-2", "c-2"):
            await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id=job_id)
        redis = queue.store.redis
        await redis.set(arq_wire.in_progress_key("busy-2"), b"1", px=60_000)  # another worker runs it
        await redis.zadd(QUEUE, {"later-2": time.time() * 1000 + 60_000})  # deferred meanwhile
        await redis.zadd(arq_wire.ABORT_SET, {"a-2": time.time() * 1000})  # left from an earlier run
        await worker.start_jobs([b"busy-2", b"later-2", b"a-2", b"b-2", b"c-2"])
        assert sorted(worker.tasks) == ["a-2", "b-2"] and worker.job_counter == 2
        # one call for the two free slots, and one more for the next two when neither could be claimed
        assert calls == [2, 2]
        assert await redis.zscore(arq_wire.ABORT_SET, "a-2") is None
        assert await redis.exists(arq_wire.in_progress_key("c-2")) == 0
        assert await redis.zscore(QUEUE, "c-2") is not None  # still due, for the next poll
        await asyncio.gather(*worker.tasks.values())
        assert [(await queue.get(j)).status for j in ("a-2", "b-2", "c-2")] == [
            Status.SUCCEEDED, Status.SUCCEEDED, Status.QUEUED]
        assert worker.job_counter == 0


async def test_with_flow_control_on_jobs_are_claimed_together_until_the_limit_binds(
    queue: FlexQueue, redis_url: str,
) -> None:
    """Jobs claimed together reach the pool together, which blurs the in-flight levels the limit learns
    from (worker.runtime.CLAIM_BATCH_FLOW): until the pool has answered, and once an acquire is refused for
    want of a permit, the worker claims one job per call; in between, a poll's due jobs go in one call."""
    gemini = ScriptedGemini.of(*(answer(f"a{i}") for i in range(7)))
    async with counting_worker(redis_url, gemini, flow=True, max_jobs=5, flow_initial=1.0, flow_max=1.0) as (
            worker, calls):
        for job_id in ("e-1", "f-1", "f-2", "f-3"):
            await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id=job_id)
        flow = worker.ctx["flexq_runner"].flow
        assert flow.limit_binds()  # a cold start: nothing answered yet
        await worker.start_jobs([b"e-1"])
        await asyncio.gather(*worker.tasks.values())
        assert calls == [1] and (await queue.get("e-1")).status == Status.SUCCEEDED
        assert not flow.limit_binds()
        calls.clear()
        await worker.start_jobs([b"f-1", b"f-2", b"f-3"])
        assert calls == [3] and {"f-1", "f-2", "f-3"} <= set(worker.tasks)
        await asyncio.gather(*worker.tasks.values())
        # a limit of 1: two of the three were refused for want of a permit, and wait in line
        assert flow.limit_binds()
        assert sorted([(await queue.get(j)).status for j in ("f-1", "f-2", "f-3")]) == sorted(
            [Status.SUCCEEDED, Status.QUEUED, Status.QUEUED])
        for job_id in ("g-1", "g-2", "g-3"):
            await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id=job_id)
        calls.clear()
        await worker.start_jobs([b"g-1", b"g-2", b"g-3"])
        assert calls == [1, 1, 1]
        await asyncio.gather(*worker.tasks.values())


async def test_a_failed_claim_gives_every_slot_back(queue: FlexQueue, redis_url: str) -> None:
    settings = make_settings(redis_url=redis_url, flow=False)
    worker = create_worker(settings, handle_signals=False, max_jobs=3,
                           ctx={"flexq_gemini_factory": lambda *_a, **_k: ScriptedGemini.of(),
                                "flexq_configure_logs": False})
    worker._pool = worker.pool or await worker_pool(redis_url)
    await startup(worker.ctx)

    async def broken(*, keys: list[str], args: list[Any]) -> Any:
        raise ConnectionError("Redis went away")

    worker.__dict__["_claim"] = broken
    try:
        slots = worker.sem._value
        with pytest.raises(ConnectionError):
            await worker.start_jobs([b"x-1", b"x-2"])
        assert worker.job_counter == 0 and worker.sem._value == slots and worker.tasks == {}
    finally:
        await shutdown(worker.ctx)
        await worker.close()


async def test_a_wake_that_raced_with_the_deferral_is_applied_again_whatever_the_hooks(
    queue: FlexQueue, redis_url: str,
) -> None:
    """A release wakes a job while its run is ending in a deferral: arq's re-scoring of the run overwrites
    the wake, and the run's finish applies it again (also when the caller replaced arq's after-job hook)."""
    redis = queue.store.redis
    woken_at_ms = int(time.time() * 1000) - 5

    async def shed_while_woken(request: Any, tier: Any) -> Any:
        await redis.hset(queue.store.keys.flow("woken"), "race-1", woken_at_ms)  # a release woke it meanwhile
        raise overloaded()

    await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="race-1")
    settings = make_settings(redis_url=redis_url, flow=True)
    hooked: list[str] = []

    async def own_hook(ctx: dict[str, Any]) -> None:
        hooked.append(ctx["job_id"])

    worker = create_worker(settings, burst=True, handle_signals=False, max_burst_jobs=1, after_job_end=own_hook,
                           ctx={"flexq_gemini_factory": lambda *_a, **_k: ScriptedGemini.of(shed_while_woken),
                                "flexq_configure_logs": False})
    await worker.main()
    await worker.close()
    record = await queue.get("race-1")
    assert record.status == Status.RETRYING and (record.attempts[-1].retry_in_s or 0) > 0
    assert await redis.zscore(QUEUE, "race-1") == woken_at_ms  # due at the wake, not after the deferral
    assert hooked == ["race-1"]


async def worker_pool(redis_url: str) -> Any:
    from arq.connections import ArqRedis
    return ArqRedis.from_url(redis_url)


def redis_py_encoding(call: Any) -> list[list[str]]:
    """The commands redis-py's pipeline would send for ``call``, as strings."""
    pipe = aioredis.Redis().pipeline(transaction=False)
    call(pipe)
    out = []
    for args, _options in pipe.command_stack:
        out.append([a.decode() if isinstance(a, bytes) else repr(a) if isinstance(a, float) else str(a) for a in args])
    return out


@pytest.mark.parametrize("call", [
    lambda p: p.set("k", "text", ex=30),
    lambda p: p.set("k", b'{"a":1}', px=1500),
    lambda p: p.set("k", "v"),
    lambda p: p.delete("a", "b", "c"),
    lambda p: p.zadd("z", {"m": 1.5}),
    lambda p: p.zadd("z", {"m": 1700000000123}, xx=True),
    lambda p: p.zadd("z", {"m1": 1, "m2": 2.25}),
    lambda p: p.zrem("z", "m"),
    lambda p: p.xadd("s", {"job": "j1", "status": "queued", "n": 3, "t": 1.5}, maxlen=1000, approximate=True),
    lambda p: p.xadd("s", {"job": "j1"}, maxlen=10, approximate=False),
    lambda p: p.xadd("s", {"job": "j1"}),
    lambda p: p.hincrby("h", "f", 3),
    lambda p: p.hincrbyfloat("h", "f", 0.000125),
    lambda p: p.lpush("l", 17),
    lambda p: p.ltrim("l", 0, 9999),
    lambda p: p.pexpire("k", 60000),
    lambda p: arq_wire.schedule(p, "q", "j1", now_ms=1000, delay_ms=500, job_ttl_ms=90000),
    lambda p: arq_wire.end_run(p, "q", "j1"),
    lambda p: arq_wire.request_abort(p, "j1", now_ms=99),
    lambda p: arq_wire.hold_leases(p, ["j1", "j2"], ttl_ms=60000),
    lambda p: arq_wire.unschedule(p, "q", "j1"),
])
def test_recorded_commands_are_what_redis_py_would_send(call: Any) -> None:
    commands = Commands()
    call(commands)
    assert commands.stack == redis_py_encoding(call)


CAS_LUA = resources.files("producer").joinpath("lua", "cas.lua").read_text()


async def hadd_against_hincrbyfloat(redis: Redis) -> None:
    await redis.delete("t:rec", "t:hadd", "t:incr")
    await redis.set("t:rec", "seen")
    cas = redis.register_script(CAS_LUA)
    steps: list[dict[str, float]] = [{"a": 3, "b": 0.000125}, {"a": 4, "b": 1.7e-06, "c": 1}, {"b": 0.1, "c": 2}]
    for amounts in steps:
        ops = Commands()
        ops.hadd("t:hadd", amounts)
        assert await cas(keys=["t:rec"], args=["seen", json.dumps(ops.stack), "text"]) == 1
        for field, amount in amounts.items():
            await redis.hincrbyfloat("t:incr", field, amount)
    ops = Commands()
    ops.hadd("t:hadd", {"a": 100})
    assert await cas(keys=["t:rec"], args=["not what is there", json.dumps(ops.stack), "text"]) == 0  # refused
    added = await redis.hgetall("t:hadd")
    incremented = await redis.hgetall("t:incr")
    assert {k: float(v) for k, v in added.items()} == pytest.approx(
        {k: float(v) for k, v in incremented.items()}, rel=1e-12)
    assert (added[b"a"], added[b"c"]) == (b"7", b"3")  # whole counts stay whole (HINCRBY still works on them)
    await redis.hincrby("t:hadd", "a", 1)
    await redis.delete("t:rec", "t:hadd", "t:incr")


async def test_hadd_adds_up_as_hincrbyfloat_does_on_redis(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await hadd_against_hincrbyfloat(redis)
    finally:
        await redis.aclose()


async def test_hadd_adds_up_as_hincrbyfloat_does_on_fakeredis(fake_redis: Redis) -> None:
    await hadd_against_hincrbyfloat(fake_redis)
