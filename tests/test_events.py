"""Job events (``{queue}:events``) and completion by notification (``producer.notify``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from producer.errors import JobNotFoundError, WaitTimeoutError
from producer.events import Event
from producer.queue import FlexQueue
from producer.status import Status
from tests.conftest import API_KEY, make_settings
from tests.helpers import poll, running_worker, worker_env

MODEL = "gemini-2.5-flash"


async def _all(queue: FlexQueue, **kwargs: object) -> list[Event]:
    return [event async for event in queue.events(after="0", follow=False, **kwargs)]  # type: ignore[arg-type]


async def test_every_change_appends_one_event(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue({"model": MODEL, "prompt": "a"}, job_id="a")
    await fake_queue.enqueue({"model": MODEL, "prompt": "a again"}, job_id="a")  # idempotent: no event
    await fake_queue.cancel("a")
    await fake_queue.retry("a")
    events = await _all(fake_queue)
    assert [(e.job_id, e.status, e.previous) for e in events] == [
        ("a", Status.QUEUED, None), ("a", Status.CANCELLED, Status.QUEUED), ("a", Status.QUEUED, Status.CANCELLED),
    ]
    assert events[1].error_kind == "cancelled" and events[1].terminal
    assert [e.id for e in events] == sorted(e.id for e in events)  # stream ids: resumable positions
    assert await _all(fake_queue, job_id="other") == []


async def test_events_off_writes_none(fake_redis: Redis) -> None:
    queue = await FlexQueue.connect(make_settings(events_maxlen=0), redis=fake_redis)
    await queue.enqueue({"model": MODEL, "prompt": "a"}, job_id="a")
    await queue.cancel("a")
    assert await fake_redis.exists(queue.store.keys.events) == 0


async def test_the_stream_is_capped(fake_redis: Redis) -> None:
    queue = await FlexQueue.connect(make_settings(events_maxlen=10), redis=fake_redis)
    for n in range(300):
        await queue.enqueue({"model": MODEL, "prompt": "a"}, job_id=f"j{n}")
    assert 10 <= await fake_redis.xlen(queue.store.keys.events) < 300


async def test_a_consumer_group_resumes_where_it_stopped(fake_queue: FlexQueue) -> None:
    for n in range(5):
        await fake_queue.enqueue({"model": MODEL, "prompt": "a"}, job_id=f"j{n}")
    seen = []
    async for event in fake_queue.events(after="0", group="pipeline", consumer="c1", follow=False):
        seen.append(event.job_id)
        if len(seen) == 3:
            break  # the process stops while handling j2: j0 and j1 are acknowledged, j2 is not
    assert seen == ["j0", "j1", "j2"]
    again = [e.job_id async for e in fake_queue.events(group="pipeline", consumer="c1", follow=False)]
    assert again == ["j2", "j3", "j4"]  # the unfinished one first, then the rest, nothing twice more
    assert [e.job_id async for e in fake_queue.events(group="pipeline", consumer="c1", follow=False)] == []
    # another group reads everything on its own
    other = [e.job_id async for e in fake_queue.events(after="0", group="audit", consumer="a", follow=False)]
    assert other == [f"j{n}" for n in range(5)]


async def test_follow_sees_new_events_only(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue({"model": MODEL, "prompt": "old"}, job_id="old")
    stream = fake_queue.events(block_s=0.05)
    first = asyncio.ensure_future(anext(stream))
    for n in range(100):  # enqueue until the reader, once started, sees one: never the old job
        await fake_queue.enqueue({"model": MODEL, "prompt": "new"}, job_id=f"new{n}")
        await asyncio.wait([first], timeout=0.05)
        if first.done():
            break
    event = first.result()
    assert event.job_id.startswith("new") and event.status == Status.QUEUED
    await stream.aclose()


# -- wait and wait_many ------------------------------------------------------------------------------


async def test_wait_is_woken_by_the_event_not_by_polling(real_queue: FlexQueue) -> None:
    await real_queue.enqueue({"model": MODEL, "prompt": "a"}, job_id="a")
    real_queue.completions.safety_poll_s = 3600.0  # the safety net will not be what wakes it
    waiter = asyncio.ensure_future(real_queue.wait("a", timeout_s=30))
    await poll(lambda: _waiting(real_queue), timeout_s=5, what="the waiter to register")
    other = await FlexQueue.connect(real_queue.settings)  # another process, say
    try:
        await other.cancel("a")
    finally:
        await other.close()
    record = await asyncio.wait_for(waiter, 10)
    assert record.status == Status.CANCELLED
    assert real_queue.completions.checks == 0


async def _waiting(queue: FlexQueue) -> bool | None:
    return True if queue.completions.waiting else None


async def test_wait_many_returns_what_ended_and_none_for_the_rest(real_queue: FlexQueue) -> None:
    for job_id in ("a", "b", "c"):
        await real_queue.enqueue({"model": MODEL, "prompt": job_id}, job_id=job_id)
    await real_queue.cancel("b")
    got = await real_queue.wait_many(["a", "b", "c"], timeout_s=0.2)
    assert [r.status if r else None for r in got] == [None, Status.CANCELLED, None]
    with pytest.raises(WaitTimeoutError):
        await real_queue.wait("a", timeout_s=0.1)
    with pytest.raises(JobNotFoundError):
        await real_queue.wait_many(["a", "missing"], timeout_s=0.1)
    assert real_queue.completions.waiting == 0  # nothing left registered


async def test_wait_works_with_events_off(redis_url: str) -> None:
    queue = await FlexQueue.connect(make_settings(redis_url=redis_url, events_maxlen=0))
    try:
        await queue.enqueue({"model": MODEL, "prompt": "a"}, job_id="a")
        waiter = asyncio.ensure_future(queue.wait("a", timeout_s=30))
        await poll(lambda: _waiting(queue), timeout_s=5, what="the waiter to register")
        await queue.cancel("a")
        assert (await asyncio.wait_for(waiter, 10)).status == Status.CANCELLED
        assert queue.completions.checks >= 1  # the safety net found it
    finally:
        await queue.close()


async def test_a_worker_run_leaves_the_whole_story_in_events(
    real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path
) -> None:
    await real_queue.enqueue({"model": MODEL, "prompt": "story [[fault:503x1]]"}, job_id="s")
    with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log"):
        record = await real_queue.wait("s", timeout_s=60)
    assert record.status == Status.SUCCEEDED
    events = await _all(real_queue, job_id="s")
    assert [e.status for e in events] == [
        Status.QUEUED, Status.RUNNING, Status.RETRYING, Status.RUNNING, Status.SUCCEEDED]
    shed, done = events[2], events[4]
    assert (shed.attempt, shed.outcome, shed.http_status, shed.tier) == (1, "overloaded", 503, "flex")
    assert shed.retry_in_s is not None and shed.retry_in_s >= 0
    assert (done.attempt, done.outcome, done.http_status) == (2, "ok", 200)
    assert done.latency_ms is not None and done.latency_ms >= 0
