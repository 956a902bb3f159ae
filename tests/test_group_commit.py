"""Group commit (worker.group_commit): attempts' starts, and ends, ready in one event-loop turn go to
Redis as one script call, and leave Redis exactly as the same calls made one at a time would.

The batching itself is checked with a stand-in ``send`` (no Redis); the batch scripts on fakeredis and
on a real Redis 7 (database 13, flushed per test) by running the same opening and closing calls, with
the same explicit clock, once one at a time and once together, and comparing everything they left.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from producer import transitions
from producer.models import JobRecord, JobResult, Usage, utcnow
from producer.queue import FlexQueue, JobSpec
from producer.status import Outcome, Status, Tier
from producer.store import Write
from producer.transitions import Change, Cost
from tests.conftest import make_settings
from tests.test_flow_store import client  # noqa: F401 - the fakeredis / real Redis fixture
from worker.flow import FlowConfig
from worker.flow_store import FlowControl
from worker.group_commit import GroupCommit

M = "gemini-2.5-flash"
T0 = 1_800_000_000.0
USAGE = Usage(prompt_tokens=10, output_tokens=5, total_tokens=15)
RESULT = JobResult(text="Hello", finish_reason="STOP", usage=USAGE, model_version=M, tier="flex")


# -- batching, without Redis ----------------------------------------------------------------------


class Recorder:
    """A stand-in for the batch script: echoes each call's first argument, or fails it when it says so."""

    def __init__(self, keys_each: int = 1, args_each: int = 1, fail_all: Exception | None = None) -> None:
        self.batches: list[tuple[list[str], list[Any]]] = []
        self.keys_each, self.args_each, self.fail_all = keys_each, args_each, fail_all

    async def send(self, keys: list[str], args: list[Any]) -> list[Any]:
        self.batches.append((keys, args))
        await asyncio.sleep(0)  # a round trip: the event loop turns
        if self.fail_all is not None:
            raise self.fail_all
        return [[0, f"bad call {a}"] if str(a).startswith("bad") else [1, f"reply {a}"] for a in args]


async def test_calls_of_one_turn_go_as_one_batch_in_order() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder.send)
    replies = await asyncio.gather(*(commit.call([f"k{i}"], [f"a{i}"]) for i in range(5)))
    assert replies == [f"reply a{i}" for i in range(5)]
    assert recorder.batches == [([f"k{i}" for i in range(5)], [f"a{i}" for i in range(5)])]
    assert (commit.calls, commit.batches) == (5, 1)


async def test_calls_of_later_turns_go_in_later_batches() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder.send)
    assert await commit.call(["k1"], ["a1"]) == "reply a1"
    assert await commit.call(["k2"], ["a2"]) == "reply a2"
    assert [args for _, args in recorder.batches] == [["a1"], ["a2"]]


async def test_a_call_the_script_failed_fails_alone() -> None:
    commit = GroupCommit(Recorder().send)
    results = await asyncio.gather(commit.call(["k1"], ["a1"]), commit.call(["k2"], ["bad2"]),
                                   commit.call(["k3"], ["a3"]), return_exceptions=True)
    assert results[0] == "reply a1" and results[2] == "reply a3"
    assert isinstance(results[1], ResponseError) and "bad call bad2" in str(results[1])


async def test_a_failed_round_trip_fails_every_call_of_the_batch() -> None:
    commit = GroupCommit(Recorder(fail_all=ConnectionError("Redis went away")).send)
    results = await asyncio.gather(*(commit.call([f"k{i}"], [f"a{i}"]) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_batch_is_split_at_its_largest_size() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder.send, max_batch=2)
    replies = await asyncio.gather(*(commit.call([f"k{i}"], [f"a{i}"]) for i in range(5)))
    assert replies == [f"reply a{i}" for i in range(5)]
    assert [args for _, args in recorder.batches] == [["a0", "a1"], ["a2", "a3"], ["a4"]]


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder.send)
    first = asyncio.ensure_future(commit.call(["k1"], ["a1"]))
    second = asyncio.ensure_future(commit.call(["k2"], ["a2"]))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == "reply a2"
    assert first.cancelled()
    assert len(recorder.batches) == 1  # the cancelled call was sent all the same, as a sent command is


# -- the batch scripts: together as one at a time ----------------------------------------------------


@pytest.fixture
async def queue(client: Redis) -> FlexQueue:  # noqa: F811 - the fixture above
    return await FlexQueue.connect(make_settings(), redis=client)


def opening(record: JobRecord) -> Change[None]:
    return Change(transitions.begin_attempt(record, tier=Tier.FLEX, worker="w1", now=utcnow()), lease_s=60.0)


def closing(outcome: Outcome) -> Any:
    def decide(record: JobRecord) -> Change[None]:
        assert record.open_attempt is not None
        number = record.open_attempt.number
        closed = transitions.close_attempt(record, number=number, now=utcnow(), outcome=outcome, http_status=200,
                                           usage=USAGE if outcome == Outcome.OK else None)
        if outcome != Outcome.OK:
            retrying = transitions.schedule_retry(closed, next_tier=Tier.FLEX, now=utcnow())
            return Change(retrying, counted=(retrying.attempts[-1],))
        done = transitions.succeed(closed, result=RESULT, now=utcnow(), cost_usd=0.001, standard_cost_usd=0.002)
        return Change(done, counted=(done.attempts[number - 1],), cost=Cost("flex", 0.001, 0.002, M), end_run=True)

    return decide


async def snapshot(redis: Redis) -> dict[str, Any]:
    """Every key, its contents with what the wall clock put there (record times, index scores, stream
    ids, enqueue scores) left out; the flow-control times come from the explicit clock and stay."""
    out: dict[str, Any] = {}
    for raw_key in sorted(await redis.keys("*")):
        key = raw_key.decode()
        kind = (await redis.type(key)).decode()
        if kind == "string":
            value = (await redis.get(key)) or b""
            try:
                doc = json.loads(value)
            except ValueError:
                out[key] = value
                continue
            if isinstance(doc, dict) and "attempts" in doc:
                out[key] = (doc["status"], [(a["number"], a["outcome"]) for a in doc["attempts"]])
            else:
                out[key] = value  # arq's envelope (its enqueue time aside) or in-progress mark
                if isinstance(doc, dict):
                    out[key] = sorted(doc.keys())
        elif kind == "hash":
            fields = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
            out[key] = {k: round(float(v), 9) if _is_number(v) else v for k, v in fields.items()}
        elif kind == "zset":
            members = await redis.zrange(key, 0, -1, withscores=True)
            clocked = ":idx:" in key or key.endswith(":arq")
            out[key] = sorted(m.decode() for m, _ in members) if clocked else [(m.decode(), s) for m, s in members]
        elif kind == "list":
            values = [v.decode() for v in await redis.lrange(key, 0, -1)]
            out[key] = len(values) if key.endswith("latency_ms") else values  # latencies: the wall clock's
        elif kind == "stream":
            entries = await redis.xrange(key)
            out[key] = [{k.decode(): v.decode() for k, v in fields.items() if k not in (b"at", b"latency_ms")}
                        for _, fields in entries]
        else:
            out[key] = kind
    return out


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


async def run_attempts(queue: FlexQueue, *, together: bool) -> tuple[list[Any], list[Any]]:
    """Six jobs under a limit of three: all try to start (three join the line), then the three running
    end (two answers and a 503; the answers wake the line), then the woken start; one at a time or together."""
    store = queue.store
    flow = FlowControl(store.redis, store.keys, FlowConfig(initial_limit=3.0, min_limit=1.0), worker="w1")
    ids = [f"gc-{i}" for i in range(6)]
    await queue.enqueue_many([JobSpec({"model": M, "prompt": f"p{i}"}, job_id=job_id) for i, job_id in enumerate(ids)])

    async def calls(fns: list[Any]) -> list[Any]:
        if together:
            return list(await asyncio.gather(*(fn() for fn in fns)))
        return [await fn() for fn in fns]

    async def prepared(job_id: str, decide: Any) -> Write[Any]:
        write = store.prepare(job_id, decide, await store.get_raw(job_id))
        assert write is not None
        return write

    def start(job_id: str, write: Write[Any], now_s: float) -> Any:
        return lambda: flow.acquire(job_id, M, "flex", 100, now_s=now_s, since_s=T0 - 10 + int(job_id[-1]),
                                    write=write)

    writes = [await prepared(j, opening) for j in ids]
    admissions = await calls([start(j, w, T0) for j, w in zip(ids, writes, strict=True)])
    admitted = [a for a in admissions if a.admitted]
    assert len(admitted) == 3 and [a.reason for a in admissions if not a.admitted] == ["no_permit"] * 3
    ends = [(Outcome.OK, 0), (Outcome.OVERLOADED, 1), (Outcome.OK, 2)]
    end_writes = [await prepared(admitted[i].permit.job_id, closing(outcome)) for outcome, i in ends]  # type: ignore[union-attr]
    releases = await calls([
        (lambda p=admitted[i].permit, o=outcome, w=w: flow.release(p, str(o), now_s=T0 + 1, write=w))
        for (outcome, i), w in zip(ends, end_writes, strict=True)
    ])
    woken = [j for j in ids if await store.redis.hexists(store.keys.flow("woken"), j)]
    second = [await prepared(j, opening) for j in woken]
    again = await calls([start(j, w, T0 + 2) for j, w in zip(woken, second, strict=True)])
    return ([(a.admitted, a.reason, a.limit, a.written) for a in [*admissions, *again]],
            [(r.limit, r.verdict, r.written) for r in releases if r is not None])


async def test_openings_and_closings_together_leave_what_one_at_a_time_leaves(
    queue: FlexQueue, client: Redis,  # noqa: F811 - the fixture above
) -> None:
    one_by_one = await run_attempts(queue, together=False)
    alone = await snapshot(client)
    await client.flushdb()
    together = await run_attempts(queue, together=True)
    assert together == one_by_one
    assert await snapshot(client) == alone
    statuses = sorted(v[0] for k, v in alone.items() if k.startswith(queue.store.keys.record("")))
    # the answers grew the limit and the 503 (a random one) was replaced: the three in line were woken and run
    assert statuses == ["retrying", "running", "running", "running", "succeeded", "succeeded"]
    assert [a[:2] for a in together[0][6:]] == [(True, "ok")] * 3


async def test_the_batches_were_batches(queue: FlexQueue, client: Redis) -> None:  # noqa: F811
    """The same run, counting script calls: the three ends went as one, the six starts as one."""
    store = queue.store
    flow = FlowControl(store.redis, store.keys, FlowConfig(initial_limit=3.0))
    ids = [f"b-{i}" for i in range(6)]
    await queue.enqueue_many([JobSpec({"model": M, "prompt": "p"}, job_id=j) for j in ids])
    writes = []
    for j in ids:
        write = store.prepare(j, opening, await store.get_raw(j))
        assert write is not None
        writes.append(write)
    admissions = await asyncio.gather(*(flow.acquire(j, M, "flex", 10, now_s=T0, write=w)
                                        for j, w in zip(ids, writes, strict=True)))
    assert (flow.acquires.calls, flow.acquires.batches) == (6, 1)
    permits = [a.permit for a in admissions if a.permit is not None]
    ends = []
    for p in permits:
        write = store.prepare(p.job_id, closing(Outcome.OK), await store.get_raw(p.job_id))
        assert write is not None
        ends.append(flow.release(p, "ok", now_s=T0 + 1, write=write))
    assert all(r is not None and r.written == 1 for r in await asyncio.gather(*ends))
    assert (flow.releases.calls, flow.releases.batches) == (3, 1)
    assert sorted([(await queue.get(p.job_id)).status for p in permits]) == [Status.SUCCEEDED] * 3


async def test_a_call_that_fails_in_the_script_fails_alone(queue: FlexQueue, client: Redis) -> None:  # noqa: F811
    store = queue.store
    flow = FlowControl(store.redis, store.keys, FlowConfig(initial_limit=5.0))
    await queue.enqueue_many([JobSpec({"model": M, "prompt": "p"}, job_id=j) for j in ("ok-1", "bad-1")])
    good = store.prepare("ok-1", opening, await store.get_raw("ok-1"))
    assert good is not None
    other = store.prepare("bad-1", opening, await store.get_raw("bad-1"))
    assert other is not None
    bad = Write(other.key, [other.args[0], "[not json", other.args[2]], other.change)  # a malformed command list
    results = await asyncio.gather(flow.acquire("ok-1", M, "flex", 10, now_s=T0, write=good),
                                   flow.acquire("bad-1", M, "flex", 10, now_s=T0, write=bad), return_exceptions=True)
    assert not isinstance(results[0], BaseException) and results[0].admitted and results[0].written == 1
    assert isinstance(results[1], ResponseError)
    assert (await queue.get("ok-1")).status == Status.RUNNING
    assert flow.acquires.batches == 1
