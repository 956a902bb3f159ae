"""JobStore and FlexQueue on fakeredis: enqueue (atomic, idempotent), read, update, cancel, retry, list, stats.

Every test inspects the Redis keys directly (names from ``producer.keys.Keys``), so a key that is
not written, or not cleaned up, fails here rather than in a worker.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
from arq.jobs import Job, JobStatus
from redis.asyncio import Redis

from producer import arq_wire, transitions
from producer.commands import Commands
from producer.errors import (
    FlexqError,
    InvalidJobError,
    InvalidRequestError,
    JobNotFoundError,
    JobStateError,
    WaitTimeoutError,
)
from producer.keys import Keys
from producer.models import JobRecord, JobResult, Usage, utcnow
from producer.queue import FlexQueue, JobSpec
from producer.status import Outcome, Status, Tier
from producer.store import ARQ_JOB_GRACE_S, LATENCY_SAMPLES

REQ = {"model": "gemini-2.5-flash", "prompt": "Hi"}
USAGE = Usage(prompt_tokens=100, output_tokens=20, thoughts_tokens=30, total_tokens=150)
RESULT = JobResult(text="Hello", finish_reason="STOP", usage=USAGE, model_version="gemini-2.5-flash", tier="flex")


def keys(queue: FlexQueue) -> Keys:
    return queue.store.keys


async def index_members(redis: Redis, queue: FlexQueue, status: Status) -> set[str]:
    return {m.decode() for m in await redis.zrange(keys(queue).index(status), 0, -1)}


# -- moving a stored job between statuses (what a worker does) -----------------------------------


def _begin(record: JobRecord) -> JobRecord:
    return transitions.begin_attempt(record, tier=Tier.FLEX, worker="w1", now=utcnow())


def _close(outcome: Outcome) -> Callable[[JobRecord], JobRecord]:
    def mutate(record: JobRecord) -> JobRecord:
        assert record.open_attempt is not None
        return transitions.close_attempt(
            record, number=record.open_attempt.number, now=utcnow(), outcome=outcome,
            usage=USAGE if outcome == Outcome.OK else None,
        )

    return mutate


def _fail(record: JobRecord) -> JobRecord:
    return transitions.fail(record, kind="deadline_exceeded", message="deadline passed", now=utcnow())


def _succeed(record: JobRecord) -> JobRecord:
    return transitions.succeed(record, result=RESULT, now=utcnow(), cost_usd=0.01, standard_cost_usd=0.02)


async def to_status(queue: FlexQueue, job_id: str, status: Status) -> JobRecord:
    steps: dict[Status, list[Callable[[JobRecord], JobRecord]]] = {
        Status.QUEUED: [],
        Status.RUNNING: [_begin],
        Status.RETRYING: [
            _begin, _close(Outcome.OVERLOADED),
            lambda r: transitions.schedule_retry(r, next_tier=Tier.FLEX, now=utcnow()),
        ],
        Status.FAILED: [_begin, _close(Outcome.OVERLOADED), _fail],
        Status.SUCCEEDED: [_begin, _close(Outcome.OK), _succeed],
        Status.CANCELLED: [lambda r: transitions.cancel(r, now=utcnow())],
    }
    record = await queue.get(job_id)
    for step in steps[status]:
        record = await changed(queue, job_id, step)
    assert record.status == status
    return record


async def changed(queue: FlexQueue, job_id: str, step: Callable[[JobRecord], JobRecord]) -> JobRecord:
    """Apply one transition through the store; it must write a change."""
    change = await queue.store.update(job_id, lambda record: transitions.Change(step(record)))
    assert change is not None
    return change.record


# -- enqueue -------------------------------------------------------------------------------------


async def test_enqueue_writes_record_index_and_arq_job(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    before_ms = int(time.time() * 1000)
    job = await fake_queue.enqueue(REQ, job_id="job-1", tags={"batch": "b1"}, fallback="standard")
    k = keys(fake_queue)
    assert job.created is True
    assert job.id == "job-1"
    assert (job.record.status, job.record.fallback, job.record.tags) == (Status.QUEUED, "standard", {"batch": "b1"})

    stored = JobRecord.from_json(await fake_redis.get(k.record("job-1")))
    assert stored == job.record
    assert await index_members(fake_redis, fake_queue, Status.QUEUED) == {"job-1"}

    score = await fake_redis.zscore(k.arq_queue, "job-1")
    assert score is not None
    assert before_ms - 1000 <= score <= time.time() * 1000 + 1000

    payload = await fake_redis.get(arq_wire.job_key("job-1"))
    assert payload is not None
    assert not payload.startswith(b"\x80")  # pickle protocol 2+ header
    envelope = json.loads(payload)
    assert envelope["f"] == arq_wire.FUNCTION
    assert envelope["a"] == ["job-1"]
    assert envelope["k"] == {}
    assert before_ms - 1000 <= envelope["et"] <= time.time() * 1000 + 1000


async def test_enqueue_ttls(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1", deadline_s=600)
    k = keys(fake_queue)
    retention = fake_queue.settings.retention_s
    record_ttl = await fake_redis.ttl(k.record("job-1"))
    assert 600 + retention - 5 <= record_ttl <= 600 + retention
    arq_pttl = await fake_redis.pttl(arq_wire.job_key("job-1"))
    assert (600 + ARQ_JOB_GRACE_S - 5) * 1000 <= arq_pttl <= (600 + ARQ_JOB_GRACE_S) * 1000


async def test_arq_can_read_the_job_it_will_run(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    job = Job("job-1", fake_redis, _queue_name=keys(fake_queue).arq_queue, _deserializer=arq_wire.deserialize)
    assert await job.status() == JobStatus.queued
    info = await job.info()
    assert info is not None
    assert (info.function, list(info.args), info.kwargs) == (arq_wire.FUNCTION, ["job-1"], {})


async def test_enqueue_without_id_generates_one(fake_queue: FlexQueue) -> None:
    first = await fake_queue.enqueue(REQ)
    second = await fake_queue.enqueue(REQ)
    assert first.created
    assert second.created
    assert first.id != second.id
    assert len(first.id) == 32
    assert (await fake_queue.get(first.id)).id == first.id


async def test_enqueue_is_idempotent(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    first = await fake_queue.enqueue(REQ, job_id="job-1", tags={"v": "1"})
    second = await fake_queue.enqueue({"model": "gemini-2.5-pro", "prompt": "Other"}, job_id="job-1", tags={"v": "2"})
    assert (first.created, second.created) == (True, False)
    assert second.record == first.record  # the existing job, not the new request
    assert second.record.tags == {"v": "1"}
    assert await fake_redis.zcard(keys(fake_queue).arq_queue) == 1
    assert await index_members(fake_redis, fake_queue, Status.QUEUED) == {"job-1"}
    assert (await fake_queue.get("job-1")).request == first.record.request


async def test_enqueue_of_a_finished_id_does_not_run_it_again(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    await to_status(fake_queue, "job-1", Status.SUCCEEDED)
    await fake_redis.zrem(keys(fake_queue).arq_queue, "job-1")
    again = await fake_queue.enqueue(REQ, job_id="job-1")
    assert again.created is False
    assert again.record.status == Status.SUCCEEDED
    assert await fake_redis.zscore(keys(fake_queue).arq_queue, "job-1") is None


async def test_new_enqueue_clears_stale_arq_state(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    """A reused id (record expired) must not inherit an old arq result or abort mark."""
    await fake_redis.set(arq_wire.result_key("job-1"), b'{"r": "old"}')
    await fake_redis.set(arq_wire.retry_key("job-1"), b"3")
    await fake_redis.zadd(arq_wire.ABORT_SET, {"job-1": 1})
    assert (await fake_queue.enqueue(REQ, job_id="job-1")).created
    assert await fake_redis.exists(arq_wire.result_key("job-1"), arq_wire.retry_key("job-1")) == 0
    assert await fake_redis.zscore(arq_wire.ABORT_SET, "job-1") is None


async def test_enqueue_many_2500(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    specs = [JobSpec(REQ, job_id=f"j-{i}") for i in range(2500)]
    out = await fake_queue.enqueue_many(specs)
    assert [e.id for e in out] == [f"j-{i}" for i in range(2500)]
    assert all(e.created for e in out)
    k = keys(fake_queue)
    assert await fake_redis.zcard(k.arq_queue) == 2500
    assert await fake_redis.zcard(k.index(Status.QUEUED)) == 2500
    again = await fake_queue.enqueue_many([JobSpec(REQ, job_id="j-0"), JobSpec(REQ, job_id="j-new")])
    assert [e.created for e in again] == [False, True]
    assert await fake_redis.zcard(k.arq_queue) == 2501


async def test_enqueue_many_duplicate_id_within_one_call(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    out = await fake_queue.enqueue_many([JobSpec(REQ, job_id="dup"), JobSpec({**REQ, "prompt": "2"}, job_id="dup")])
    assert [e.created for e in out] == [True, False]
    assert out[1].record.request is not None
    assert out[1].record.request.prompt == "Hi"
    assert await fake_redis.zcard(keys(fake_queue).arq_queue) == 1


@pytest.mark.parametrize(
    ("bad", "message", "field"),
    [
        pytest.param(JobSpec({**REQ, "prompt": ""}, job_id="bad"), "[1250] prompt: must not be empty", "prompt",
                     id="empty-prompt"),
        pytest.param(JobSpec({"prompt": "Hi"}, job_id="bad"), "[1250] model: is required", "model", id="no-model"),
        pytest.param(JobSpec(REQ, job_id="has space"), "[1250] job_id:", "job_id", id="bad-job-id"),
        pytest.param(JobSpec(REQ, job_id="bad", deadline_s=0), "[1250] deadline_s:", "deadline_s", id="zero-deadline"),
        pytest.param(JobSpec(REQ, job_id="bad", deadline_s=-5), "[1250] deadline_s:", "deadline_s",
                     id="negative-deadline"),
        pytest.param(JobSpec(REQ, job_id="bad", deadline_s=math.nan), "[1250] deadline_s:", "deadline_s",
                     id="nan-deadline"),
        pytest.param(JobSpec(REQ, job_id="bad", fallback="priority"), "[1250] fallback:", "fallback",  # type: ignore[arg-type]
                     id="bad-fallback"),
        pytest.param(JobSpec(["x"], job_id="bad"), "[1250] a request must be a JSON object", None,  # type: ignore[arg-type]
                     id="not-an-object"),
    ],
)
async def test_enqueue_many_invalid_spec_enqueues_nothing(
    fake_queue: FlexQueue, fake_redis: Redis, bad: JobSpec, message: str, field: str | None
) -> None:
    specs = [JobSpec(REQ, job_id=f"j-{i}") for i in range(2500)]
    specs[1250] = bad
    with pytest.raises(InvalidRequestError) as info:
        await fake_queue.enqueue_many(specs)
    assert str(info.value).startswith(message)
    assert info.value.field == field
    assert await fake_redis.dbsize() == 0


@pytest.mark.parametrize(
    "deadline_s",
    [
        pytest.param(math.inf, id="inf"),
        pytest.param(1e12, id="past-year-9999"),
        pytest.param(1e300, id="huge"),
    ],
)
async def test_enqueue_overflowing_deadline_is_an_invalid_request(
    fake_queue: FlexQueue, fake_redis: Redis, deadline_s: float
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await fake_queue.enqueue(REQ, job_id="job-1", deadline_s=deadline_s)
    assert info.value.field == "deadline_s"
    assert await fake_redis.dbsize() == 0


# -- read ----------------------------------------------------------------------------------------


async def test_get_unknown_job(fake_queue: FlexQueue) -> None:
    with pytest.raises(JobNotFoundError) as info:
        await fake_queue.get("nope")
    assert info.value.job_id == "nope"
    assert str(info.value) == "no job with id 'nope'"
    assert isinstance(info.value, FlexqError)
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"{not json", "Invalid JSON", id="not-json"),
        pytest.param(b'{"id": "job-1"}', "status", id="missing-fields"),
        pytest.param(b'{"id": "job-1", "status": "exploded", "created_at": "x"}', "status", id="bad-status"),
        pytest.param(b"\xff\xfe\x00", "Invalid JSON", id="binary"),
        pytest.param(b"[]", "should be an object", id="array"),
    ],
)
async def test_corrupt_record(fake_queue: FlexQueue, fake_redis: Redis, raw: bytes, reason: str) -> None:
    await fake_redis.set(keys(fake_queue).record("job-1"), raw)
    with pytest.raises(InvalidJobError) as info:
        await fake_queue.get("job-1")
    assert info.value.job_id == "job-1"
    assert reason.lower() in info.value.reason.lower()


async def test_list_skips_unreadable_records(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await fake_queue.enqueue(REQ, job_id="good")
    await fake_queue.enqueue(REQ, job_id="bad")
    await fake_redis.set(keys(fake_queue).record("bad"), b"{not json")
    assert [r.id for r in await fake_queue.list(status="queued")] == ["good"]
    assert await fake_queue.store.get_many(["bad", "good", "missing"]) == [None, await fake_queue.get("good"), None]
    assert await fake_queue.store.get_many([]) == []


async def test_update_of_unknown_job(fake_queue: FlexQueue) -> None:
    with pytest.raises(JobNotFoundError):
        await changed(fake_queue, "nope", _begin)


async def test_update_returning_none_changes_nothing(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    job = await fake_queue.enqueue(REQ, job_id="job-1")
    raw = await fake_redis.get(keys(fake_queue).record("job-1"))
    assert await fake_queue.store.update("job-1", lambda r: None) is None
    assert await fake_queue.get("job-1") == job.record
    assert await fake_redis.get(keys(fake_queue).record("job-1")) == raw


async def test_status_index_moves_on_update(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await fake_queue.enqueue(REQ, job_id="a")
    await fake_queue.enqueue(REQ, job_id="b")
    await to_status(fake_queue, "a", Status.RUNNING)
    assert [r.id for r in await fake_queue.list(status=Status.RUNNING)] == ["a"]
    assert [r.id for r in await fake_queue.list(status="queued")] == ["b"]
    await changed(fake_queue, "a", _close(Outcome.OVERLOADED))  # same status: index untouched
    assert await index_members(fake_redis, fake_queue, Status.RUNNING) == {"a"}
    await changed(fake_queue, "a", _fail)
    assert await fake_queue.list(status=Status.RUNNING) == []
    assert [r.id for r in await fake_queue.list(status=Status.FAILED)] == ["a"]
    assert {r.id for r in await fake_queue.list()} == {"a", "b"}
    counts = await fake_queue.store.counts()
    assert counts == {"queued": 1, "running": 0, "retrying": 0, "succeeded": 0, "failed": 1, "cancelled": 0}
    assert await fake_queue.active_count() == 1


async def test_list_newest_first_and_limit(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    for i in range(5):
        await fake_queue.enqueue(REQ, job_id=f"j-{i}")
        await fake_redis.zadd(keys(fake_queue).index(Status.QUEUED), {f"j-{i}": 1000.0 + i})
    assert [r.id for r in await fake_queue.list(status="queued", limit=3)] == ["j-4", "j-3", "j-2"]


async def test_list_rejects_an_unknown_status(fake_queue: FlexQueue) -> None:
    with pytest.raises(ValueError, match="exploded"):
        await fake_queue.list(status="exploded")


async def test_old_terminal_index_entries_are_trimmed(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    k = keys(fake_queue)
    ancient = time.time() - fake_queue.settings.retention_s - 60
    await fake_redis.zadd(k.index(Status.SUCCEEDED), {"expired": ancient})
    await fake_redis.zadd(k.index(Status.QUEUED), {"old-but-active": ancient})
    counts = await fake_queue.store.counts()
    assert (counts["succeeded"], counts["queued"]) == (0, 1)


# -- cancel --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [Status.QUEUED, Status.RETRYING])
async def test_cancel_waiting_job(fake_queue: FlexQueue, fake_redis: Redis, status: Status) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    await to_status(fake_queue, "job-1", status)
    k = keys(fake_queue)
    record = await fake_queue.cancel("job-1")
    assert record.status == Status.CANCELLED
    assert record.error is not None
    assert record.error.kind == "cancelled"
    assert await fake_queue.get("job-1") == record
    assert await fake_redis.exists(arq_wire.job_key("job-1")) == 0
    assert await fake_redis.zscore(k.arq_queue, "job-1") is None
    assert await index_members(fake_redis, fake_queue, Status.CANCELLED) == {"job-1"}
    assert await index_members(fake_redis, fake_queue, status) == set()
    retention = fake_queue.settings.retention_s
    assert retention - 5 <= await fake_redis.ttl(k.record("job-1")) <= retention


async def test_cancel_running_job_asks_arq_to_abort(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    await to_status(fake_queue, "job-1", Status.RUNNING)
    payload = await fake_redis.get(arq_wire.job_key("job-1"))
    record = await fake_queue.cancel("job-1")
    assert (record.status, record.cancel_requested) == (Status.RUNNING, True)
    assert record.open_attempt is not None
    assert await fake_redis.zscore(arq_wire.ABORT_SET, "job-1") is not None
    assert await fake_redis.get(arq_wire.job_key("job-1")) == payload  # the worker still owns it
    assert await index_members(fake_redis, fake_queue, Status.RUNNING) == {"job-1"}


@pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.FAILED, Status.CANCELLED])
async def test_cancel_terminal_job(fake_queue: FlexQueue, status: Status) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    before = await to_status(fake_queue, "job-1", status)
    with pytest.raises(JobStateError, match=f"job 'job-1' is {status}") as info:
        await fake_queue.cancel("job-1")
    assert info.value.status == status
    assert await fake_queue.get("job-1") == before


async def test_cancel_unknown_job(fake_queue: FlexQueue) -> None:
    with pytest.raises(JobNotFoundError):
        await fake_queue.cancel("nope")


# -- retry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [Status.FAILED, Status.CANCELLED])
async def test_retry_requeues_with_history(fake_queue: FlexQueue, fake_redis: Redis, status: Status) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    before = await to_status(fake_queue, "job-1", status)
    k = keys(fake_queue)
    await fake_redis.delete(arq_wire.job_key("job-1"))
    await fake_redis.zrem(k.arq_queue, "job-1")
    # stale arq state from the previous run
    await fake_redis.set(arq_wire.result_key("job-1"), b'{"r": "old"}')
    await fake_redis.set(arq_wire.in_progress_key("job-1"), b"1")
    await fake_redis.set(arq_wire.retry_key("job-1"), b"2")
    await fake_redis.zadd(arq_wire.ABORT_SET, {"job-1": 1})

    record = await fake_queue.retry("job-1", deadline_s=120)
    assert record.status == Status.QUEUED
    assert record.attempts == before.attempts
    assert record.enqueues == 2
    assert (record.error, record.cancel_requested) == (None, False)
    assert await fake_queue.get("job-1") == record
    assert await index_members(fake_redis, fake_queue, Status.QUEUED) == {"job-1"}
    assert await index_members(fake_redis, fake_queue, status) == set()

    envelope = json.loads(await fake_redis.get(arq_wire.job_key("job-1")))
    assert (envelope["f"], envelope["a"]) == (arq_wire.FUNCTION, ["job-1"])
    assert await fake_redis.zscore(k.arq_queue, "job-1") is not None
    stale = (arq_wire.result_key("job-1"), arq_wire.in_progress_key("job-1"), arq_wire.retry_key("job-1"))
    assert await fake_redis.exists(*stale) == 0
    assert await fake_redis.zscore(arq_wire.ABORT_SET, "job-1") is None
    job = Job("job-1", fake_redis, _queue_name=k.arq_queue, _deserializer=arq_wire.deserialize)
    assert await job.status() == JobStatus.queued


@pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.QUEUED, Status.RUNNING, Status.RETRYING])
async def test_retry_refused(fake_queue: FlexQueue, status: Status) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    before = await to_status(fake_queue, "job-1", status)
    with pytest.raises(JobStateError, match="only failed or cancelled jobs can be retried"):
        await fake_queue.retry("job-1")
    assert await fake_queue.get("job-1") == before


async def test_retry_of_a_quarantined_job_is_refused(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    k = keys(fake_queue)
    await fake_queue.enqueue(REQ, job_id="job-1")
    await fake_redis.set(k.record("job-1"), b"{garbage")
    await fake_queue.store.quarantine("job-1", "not JSON")
    record = await fake_queue.get("job-1")
    assert record.status == Status.FAILED
    assert record.error is not None
    assert record.error.kind == "invalid_job"
    assert record.tags["raw_record"] == "{garbage"
    assert await index_members(fake_redis, fake_queue, Status.QUEUED) == set()
    assert await index_members(fake_redis, fake_queue, Status.FAILED) == {"job-1"}
    assert await fake_redis.exists(arq_wire.job_key("job-1")) == 0
    with pytest.raises(JobStateError, match="unreadable"):
        await fake_queue.retry("job-1")


# -- wait ----------------------------------------------------------------------------------------


async def test_wait_returns_a_terminal_record(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    done = await to_status(fake_queue, "job-1", Status.SUCCEEDED)
    assert await fake_queue.wait("job-1", timeout_s=0) == done


async def test_wait_times_out_on_an_active_job(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    with pytest.raises(WaitTimeoutError, match="job 'job-1' still queued after 0s") as info:
        await fake_queue.wait("job-1", timeout_s=0)
    assert info.value.status == Status.QUEUED
    assert isinstance(info.value, TimeoutError)


async def test_wait_on_unknown_job(fake_queue: FlexQueue) -> None:
    with pytest.raises(JobNotFoundError):
        await fake_queue.wait("nope", timeout_s=0)


# -- counters and stats --------------------------------------------------------------------------


async def _count(queue: FlexQueue, record: JobRecord, cost: tuple[float | None, float | None] | None = None) -> None:
    """Count the record's last attempt (and a cost) as the attempt's closing write does: through cas.lua."""
    store = queue.store
    ops = Commands()
    costed = None if cost is None else transitions.Cost(str(record.attempts[-1].tier), *cost)
    store._count(ops, [record.attempts[-1]], costed)
    raw = await store.get_raw(record.id)
    assert await store._cas_script(keys=[store.keys.record(record.id)], args=store._cas_args(raw, ops)) == 1


async def test_stats_from_counters(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    record = await fake_queue.get("job-1")
    now = utcnow()
    outcomes = [Outcome.OVERLOADED, Outcome.OVERLOADED, Outcome.RATE_LIMITED, Outcome.OK]
    for number, outcome in enumerate(outcomes, start=1):
        record = transitions.begin_attempt(record, tier=Tier.FLEX, worker="w", now=now)
        record = transitions.close_attempt(
            record, number=number, now=now, outcome=outcome, usage=USAGE if outcome == Outcome.OK else None
        )
        await _count(fake_queue, record, (0.01, 0.02) if outcome == Outcome.OK else None)
    record = transitions.begin_attempt(record, tier=Tier.STANDARD, worker="w", now=now)
    record = transitions.close_attempt(record, number=5, now=now, outcome=Outcome.OK, usage=USAGE)
    await _count(fake_queue, record, (None, None))

    stats = await fake_queue.stats()
    assert stats["jobs"]["queued"] == 1
    assert stats["attempts"]["total"] == 5
    assert stats["attempts"]["by_outcome"] == {"overloaded": 2, "rate_limited": 1, "ok": 2}
    assert stats["attempts"]["by_tier"] == {
        "flex": {"overloaded": 2, "rate_limited": 1, "ok": 1},
        "standard": {"ok": 1},
    }
    assert stats["rates"] == {"overloaded_503": 0.4, "rate_limited_429": 0.2}
    assert stats["tokens"]["flex"] == {"prompt": 100, "output": 20, "thoughts": 30}
    assert stats["tokens"]["standard"] == {"prompt": 100, "output": 20, "thoughts": 30}
    assert stats["latency_ms"] == {"samples": 2, "p50": 0.0, "p95": 0.0}
    assert stats["cost"]["spent_usd"] == 0.01
    assert stats["cost"]["standard_equivalent_usd"] == 0.02
    assert stats["cost"]["saved_usd"] == 0.01
    assert stats["cost"]["jobs_with_unknown_cost"] == 1


async def test_stats_of_an_empty_queue(fake_queue: FlexQueue) -> None:
    stats = await fake_queue.stats()
    assert stats["attempts"]["total"] == 0
    assert stats["rates"] == {"overloaded_503": None, "rate_limited_429": None}
    assert stats["latency_ms"] == {"samples": 0, "p50": None, "p95": None}
    assert set(stats["jobs"]) == {str(s) for s in Status}


async def test_latency_samples_are_capped(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    k = keys(fake_queue)
    await fake_redis.rpush(k.latencies, *range(LATENCY_SAMPLES))
    await fake_queue.enqueue(REQ, job_id="job-1")
    now = utcnow()
    record = transitions.begin_attempt(await fake_queue.get("job-1"), tier=Tier.FLEX, worker="w", now=now)
    record = transitions.close_attempt(record, number=1, now=now, outcome=Outcome.OK)
    record.attempts[-1].latency_ms = 123_456
    await _count(fake_queue, record)
    assert await fake_redis.llen(k.latencies) == LATENCY_SAMPLES
    assert (await fake_queue.store.latencies_ms())[0] == 123_456


async def test_interrupted_attempt_is_counted(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue(REQ, job_id="job-1")
    record = transitions.begin_attempt(await fake_queue.get("job-1"), tier=Tier.FLEX, worker="w", now=utcnow())
    record = transitions.interrupt_open_attempt(record, now=utcnow(), reason="lease expired")
    await _count(fake_queue, record)
    counters: dict[str, Any] = await fake_queue.store.counters()
    assert counters == {"attempts:interrupted": 1.0, "attempts:flex:interrupted": 1.0}
