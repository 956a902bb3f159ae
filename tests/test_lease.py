"""worker.lease in process on fakeredis: the lease keeper (renewal, heartbeat) and the reconciler.

A dead or frozen worker is stood for by its traces in Redis: an open attempt in the record, an arq
in-progress key, an arq job that has gone missing. The keeper's loop runs with a sub-second
interval and tests poll for its effects with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from producer import arq_wire, transitions
from producer.errors import JobNotFoundError
from producer.models import JobRecord, utcnow
from producer.queue import FlexQueue
from producer.status import ACTIVE, Outcome, Status, Tier
from tests.conftest import make_settings
from tests.fakes import ScriptedGemini, answer
from tests.helpers import poll
from worker import lease
from worker.flow import FlowConfig
from worker.flow_store import FlowControl
from worker.lease import LeaseKeeper, reconcile, repair
from worker.runner import Runner

MODEL = "gemini-2.5-flash"
WORKER = "test-host:1:bbbbbb"
JOB_TIMEOUT_MS = 960_000  # arq's in-progress TTL: the job timeout (+10 s), never renewed by arq itself


async def enqueue(queue: FlexQueue, job_id: str, **kw: Any) -> JobRecord:
    done = await queue.enqueue({"model": MODEL, "prompt": f"prompt of {job_id}"}, job_id=job_id, **kw)
    assert done.created
    return done.record


async def edit(queue: FlexQueue, job_id: str, *, open_by: str | None = None, **changes: Any) -> JobRecord:
    """Change a stored record; ``open_by``: open an attempt as that (dead or frozen) worker."""

    def step(record: JobRecord) -> transitions.Change[None]:
        new = record
        if open_by is not None:
            new = transitions.begin_attempt(new, tier=Tier.FLEX, worker=open_by, now=utcnow())
        return transitions.Change(new.model_copy(update=changes))

    change = await queue.store.update(job_id, step)
    assert change is not None
    return change.record


async def lose_arq_job(redis: Redis, queue: FlexQueue, job_id: str) -> None:
    """What arq leaves when it drops a job ("job expired", aborted before start, a crash)."""
    await redis.delete(arq_wire.job_key(job_id))
    await redis.zrem(queue.store.keys.arq_queue, job_id)


async def arq_job_due(redis: Redis, queue: FlexQueue, job_id: str) -> bool:
    raw = await redis.get(arq_wire.job_key(job_id))
    score = await redis.zscore(queue.store.keys.arq_queue, job_id)
    if raw is None or score is None:
        return False
    assert arq_wire.deserialize(raw)["a"] == [job_id]
    return bool(score <= time.time() * 1000 + 1000)  # due now (not deferred)


# -- the lease keeper ------------------------------------------------------------------------------


async def test_renew_puts_running_jobs_on_the_short_lease(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    for job_id in ("a", "b", "other"):
        await fake_redis.set(arq_wire.in_progress_key(job_id), b"1", px=JOB_TIMEOUT_MS)
    await fake_redis.set(arq_wire.in_progress_key("b"), b"1", px=50)  # nearly lapsed: renewal extends it
    keeper = LeaseKeeper(fake_queue.store, {"a", "b", "gone"}, lease_s=10.0, worker_name=WORKER)
    await keeper.renew()
    for job_id in ("a", "b"):
        assert 1_000 < await fake_redis.pttl(arq_wire.in_progress_key(job_id)) <= 10_000
    assert await fake_redis.pttl(arq_wire.in_progress_key("other")) > 10_000  # not this worker's
    assert not await fake_redis.exists(arq_wire.in_progress_key("gone"))  # a lease is never created
    heartbeat = await fake_redis.zscore(fake_queue.store.keys.workers, WORKER)
    assert heartbeat is not None and abs(heartbeat - time.time()) < 60


async def test_renew_extends_the_flow_permits_this_worker_holds(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    flow = FlowControl(fake_redis, fake_queue.store.keys, FlowConfig(permit_ttl_s=60), worker=WORKER)
    admission = await flow.acquire("a", MODEL, "flex", 10, now_s=time.time() - 45)
    assert admission.admitted
    permits = fake_queue.store.keys.flow(f"permits:{MODEL}:flex")
    before = await fake_redis.zscore(permits, "a")
    assert before is not None
    await LeaseKeeper(fake_queue.store, set(), lease_s=60, worker_name=WORKER, flow=flow).renew()
    after = await fake_redis.zscore(permits, "a")
    assert after is not None and after > before + 30  # expiry moved from (then + 60) to (now + 60)


async def test_keeper_loop_heartbeats_and_stops(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    keeper = LeaseKeeper(fake_queue.store, set(), lease_s=0.3, worker_name=WORKER)
    await keeper.stop()  # stopping a keeper that never started is harmless
    keeper = LeaseKeeper(fake_queue.store, set(), lease_s=0.3, worker_name=WORKER)
    keeper.start()
    try:
        async def beat() -> float | None:
            score: float | None = await fake_redis.zscore(fake_queue.store.keys.workers, WORKER)
            return score

        await poll(beat, timeout_s=5, what="a heartbeat")
    finally:
        await keeper.stop()
    assert keeper._task is not None and keeper._task.done() and not keeper._task.cancelled()


async def test_keeper_survives_redis_errors(
    fake_queue: FlexQueue, fake_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fake_queue.store
    real_heartbeat = store.heartbeat
    calls: list[int] = []

    async def flaky(*args: Any, **kw: Any) -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise RedisConnectionError("Redis blinked")
        await real_heartbeat(*args, **kw)

    monkeypatch.setattr(store, "heartbeat", flaky)
    keeper = LeaseKeeper(store, set(), lease_s=0.3, worker_name=WORKER)
    keeper.start()
    try:
        async def beat() -> float | None:
            score: float | None = await fake_redis.zscore(store.keys.workers, WORKER)
            return score

        await poll(beat, timeout_s=5, what="a heartbeat after two failed renewals")
    finally:
        await keeper.stop()
    assert len(calls) >= 3
    assert keeper._task is not None and keeper._task.exception() is None


async def test_keeper_loop_runs_the_reconciler(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue, "lost")
    await lose_arq_job(fake_redis, fake_queue, "lost")
    keeper = LeaseKeeper(fake_queue.store, set(), lease_s=0.3, worker_name=WORKER)
    keeper.start()
    try:
        async def rescheduled() -> bool | None:
            return True if await arq_job_due(fake_redis, fake_queue, "lost") else None

        await poll(rescheduled, timeout_s=5, what="the reconciler to reschedule the lost job")
    finally:
        await keeper.stop()


# -- the reconciler --------------------------------------------------------------------------------


async def test_reconcile_leaves_healthy_jobs_alone(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    queued = await enqueue(fake_queue, "queued")
    await enqueue(fake_queue, "running")
    running = await edit(fake_queue, "running", open_by="live-worker")
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 0
    assert await fake_queue.get("queued") == queued
    assert await fake_queue.get("running") == running


async def test_reconcile_reschedules_a_lost_queued_job(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue, "lost")
    await lose_arq_job(fake_redis, fake_queue, "lost")
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 1
    record = await fake_queue.get("lost")
    assert record.status == Status.QUEUED and record.attempts == []
    assert await arq_job_due(fake_redis, fake_queue, "lost")


async def test_reconcile_recovers_a_dead_workers_running_job(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue, "orphan")
    await edit(fake_queue, "orphan", open_by="dead-worker")
    await lose_arq_job(fake_redis, fake_queue, "orphan")
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 1
    record = await fake_queue.get("orphan")
    assert record.status == Status.RETRYING and record.interrupts == 1 and record.open_attempt is None
    assert record.attempts[0].outcome == Outcome.INTERRUPTED
    assert record.attempts[0].error == "lost by the queue; recovered"
    assert await arq_job_due(fake_redis, fake_queue, "orphan")
    assert (await fake_queue.stats())["attempts"]["by_outcome"] == {"interrupted": 1}
    # and a worker finishes it
    runner = Runner(
        store=fake_queue.store, gemini=ScriptedGemini.of(answer()), settings=make_settings(), worker_name=WORKER
    )
    assert await runner.run("orphan") is None
    record = await fake_queue.get("orphan")
    assert record.status == Status.SUCCEEDED
    assert [(a.worker, a.outcome) for a in record.attempts] == [("dead-worker", "interrupted"), (WORKER, "ok")]


async def test_reconcile_ends_a_lost_job_whose_cancel_was_asked(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue, "abort-me")
    await edit(fake_queue, "abort-me", open_by="dead-worker")
    await fake_queue.cancel("abort-me")  # running: a cancel is only asked for
    await lose_arq_job(fake_redis, fake_queue, "abort-me")
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 1
    record = await fake_queue.get("abort-me")
    assert record.status == Status.CANCELLED and record.error is not None and record.error.kind == "cancelled"
    assert [a.outcome for a in record.attempts] == [Outcome.INTERRUPTED]
    assert not await fake_redis.exists(arq_wire.job_key("abort-me"))  # not run again


async def test_reconcile_fails_a_lost_job_past_its_deadline(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue, "late")
    await edit(fake_queue, "late", deadline_at=utcnow() - timedelta(seconds=5))
    await lose_arq_job(fake_redis, fake_queue, "late")
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 1
    record = await fake_queue.get("late")
    assert record.status == Status.FAILED
    assert record.error is not None and record.error.kind == "deadline_exceeded"
    assert not await fake_redis.exists(arq_wire.job_key("late"))


async def test_reconcile_runs_one_worker_at_a_time(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue, "lost")
    await lose_arq_job(fake_redis, fake_queue, "lost")
    lock = fake_queue.store.keys.flow("reconcile-lock")
    await fake_redis.set(lock, b"other-worker", ex=30)
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 0
    assert not await fake_redis.exists(arq_wire.job_key("lost"))  # the other worker's sweep owns it
    await fake_redis.delete(lock)
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 1
    assert await fake_redis.get(lock) == WORKER.encode()
    assert 0 < await fake_redis.ttl(lock) <= 30  # the lock lapses on its own


async def test_reconcile_walks_every_batch(
    fake_queue: FlexQueue, fake_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease, "RECONCILE_BATCH", 2)
    ids = [f"j{i}" for i in range(7)]
    for job_id in ids:
        await enqueue(fake_queue, job_id)
    lost = ids[1::2]
    for job_id in lost:
        await lose_arq_job(fake_redis, fake_queue, job_id)
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == len(lost)
    for job_id in ids:
        assert await arq_job_due(fake_redis, fake_queue, job_id)


async def test_repair_refuses_jobs_that_need_none(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    alive = await enqueue(fake_queue, "alive")
    assert not await repair(fake_queue.store, "alive")  # its arq job is there
    assert await fake_queue.get("alive") == alive
    await enqueue(fake_queue, "done")
    await fake_queue.cancel("done")
    await lose_arq_job(fake_redis, fake_queue, "done")
    assert not await repair(fake_queue.store, "done")  # ended: nothing to repair
    assert (await fake_queue.get("done")).status == Status.CANCELLED
    assert not await fake_redis.exists(arq_wire.job_key("done"))


async def test_repair_of_an_unknown_job_raises(fake_queue: FlexQueue) -> None:
    with pytest.raises(JobNotFoundError):
        await repair(fake_queue.store, "never-enqueued")


async def _expire(redis: Redis, queue: FlexQueue, job_id: str) -> None:
    await redis.delete(queue.store.keys.record(job_id))  # its record's TTL ran out


async def _corrupt(redis: Redis, queue: FlexQueue, job_id: str) -> None:
    await redis.set(queue.store.keys.record(job_id), b"{not json")


@pytest.mark.parametrize("spoil", [pytest.param(_expire, id="record-expired"), pytest.param(_corrupt, id="corrupt")])
async def test_reconcile_gets_past_a_job_it_cannot_read(
    fake_queue: FlexQueue, fake_redis: Redis, spoil: Callable[[Redis, FlexQueue, str], Awaitable[None]]
) -> None:
    await enqueue(fake_queue, "ghost")  # oldest first: the sweep meets it before the lost job
    await enqueue(fake_queue, "lost")
    await spoil(fake_redis, fake_queue, "ghost")
    await lose_arq_job(fake_redis, fake_queue, "ghost")
    await lose_arq_job(fake_redis, fake_queue, "lost")
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) >= 1
    assert await arq_job_due(fake_redis, fake_queue, "lost")
    active = await fake_queue.store.ids(ACTIVE, limit=10)
    assert active == ["lost"]  # the ghost left the active index, so the next sweep does not meet it again
    if spoil is _corrupt:  # an unreadable record fails that job, keeping its raw text
        ghost = await fake_queue.get("ghost")
        assert ghost.status == Status.FAILED and ghost.error is not None and ghost.error.kind == "invalid_job"
    else:
        with pytest.raises(JobNotFoundError):
            await fake_queue.get("ghost")


async def test_reconcile_pages_through_every_active_id_past_dangling_ones(
    fake_queue: FlexQueue, fake_redis: Redis
) -> None:
    store = fake_queue.store
    for n in range(7):
        await enqueue(fake_queue, f"lost-{n}")
        await lose_arq_job(fake_redis, fake_queue, f"lost-{n}")
    for n in range(3):  # ids whose records are gone (a manual DEL, retention shorter than a queued job's life)
        await fake_redis.zadd(store.keys.index(Status.QUEUED), {f"dangling-{n}": 0.0})
    assert await reconcile(store, lock_owner=WORKER, lock_s=30, page=2) == 7  # 4 pages of 2 (and more)
    for n in range(7):
        assert await arq_job_due(fake_redis, fake_queue, f"lost-{n}")
    assert not any(m.startswith(b"dangling") for m in await fake_redis.zrange(store.keys.index(Status.QUEUED), 0, -1))


async def test_reconcile_leaves_a_running_job_to_its_live_worker(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    store = fake_queue.store
    await enqueue(fake_queue, "mine")
    await edit(fake_queue, "mine", open_by="alive-worker", status=Status.RUNNING)
    await enqueue(fake_queue, "orphan")
    await edit(fake_queue, "orphan", open_by="dead-worker", status=Status.RUNNING)
    for job_id in ("mine", "orphan"):
        await lose_arq_job(fake_redis, fake_queue, job_id)  # e.g. a stale worker's arq finish deleted it
    await store.heartbeat("alive-worker", [], lease_s=30, now_s=time.time())
    await store.heartbeat("dead-worker", [], lease_s=30, now_s=time.time() - 600)
    assert await reconcile(store, lock_owner=WORKER, lock_s=30, lease_s=30) == 1
    mine, orphan = await fake_queue.get("mine"), await fake_queue.get("orphan")
    assert mine.open_attempt is not None and mine.status == Status.RUNNING  # untouched: its call goes on
    assert orphan.open_attempt is None and orphan.attempts[-1].outcome == Outcome.INTERRUPTED


async def test_reconcile_stops_when_another_worker_holds_the_lock(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue, "lost")
    await lose_arq_job(fake_redis, fake_queue, "lost")
    await fake_redis.set(fake_queue.store.keys.flow("reconcile-lock"), "someone-else", ex=30)
    assert await reconcile(fake_queue.store, lock_owner=WORKER, lock_s=30) == 0
    assert not await arq_job_due(fake_redis, fake_queue, "lost")
