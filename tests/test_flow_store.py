"""worker.flow_store on fakeredis (Lua via lupa) and on a real Redis 7 (database 13, flushed per test).

Times are passed explicitly (``now_s``): nothing sleeps. Two ``FlowControl`` instances on one Redis
stand for two workers. The agreement test drives the Lua scripts and their oracle
(tests/flow_oracle.py) with the same events and checks they agree step by step.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from producer.keys import Keys
from producer.status import Outcome
from tests.conftest import require_or_skip
from tests.flow_oracle import Breaker, BreakerState, Oracle, ms
from worker.classify import QuotaKind
from worker.config import Limits
from worker.flow import FlowConfig
from worker.flow_store import FlowControl, flow_lines
from worker.policy import RETRY_INFO_MARGIN_S

FLOW_TEST_DB = 13
KEYS = Keys("flexq-flow-test")
M = "gemini-2.5-flash"
T0 = 1_800_000_000.0  # a minute boundary: 30_000_000 * 60

MakeFlow = Callable[..., FlowControl]


def _db13_url() -> str:
    base = (os.environ.get("FLEXQ_TEST_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379").rstrip("/")
    head, _, tail = base.rpartition("/")
    if tail.isdigit() and head.count("/") >= 2:
        base = head
    return f"{base}/{FLOW_TEST_DB}"


@pytest.fixture(params=["fakeredis", "redis"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    if request.param == "fakeredis":
        fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        yield fake
        await fake.aclose()
        return
    url = _db13_url()
    try:
        probe = sync_redis.Redis.from_url(url, socket_connect_timeout=1)
        probe.ping()
        probe.close()
    except (sync_redis.RedisError, OSError):
        require_or_skip(f"no Redis answers at {url}")
    real = Redis.from_url(url)
    await real.flushdb()
    yield real
    await real.flushdb()
    await real.aclose()


@pytest.fixture
def make_flow(client: Redis) -> MakeFlow:
    def make(worker: str = "w1", **cfg: Any) -> FlowControl:
        return FlowControl(client, KEYS, FlowConfig(**cfg), worker=worker)

    return make


def waiters_key(model: str = M, tier: str = "flex") -> str:
    return KEYS.flow(f"waiters:{model}:{tier}")


async def waiting(client: Redis, model: str = M, tier: str = "flex") -> list[tuple[str, float]]:
    """The line for a permit, oldest first: (job, time it first waited)."""
    return [(_name(job), score) for job, score in await client.zrange(waiters_key(model, tier), 0, -1, withscores=True)]


async def woken(client: Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = await client.hgetall(KEYS.flow("woken"))  # type: ignore[misc]
    return {_name(job): int(float(at)) for job, at in raw.items()}


def _name(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: A deferred arq run's score: far in the future (the waiter_timeout_s fallback, in effect).
FAR_MS = 9_000_000_000_000


async def enqueue(client: Redis, *jobs: str, score: float = FAR_MS) -> None:
    """Put jobs on the arq queue as deferred runs (what a no_permit deferral leaves there)."""
    await client.zadd(KEYS.arq_queue, dict.fromkeys(jobs, score))


async def scores(client: Redis, *jobs: str) -> list[float | None]:
    return [await client.zscore(KEYS.arq_queue, job) for job in jobs]


async def hold(flow: FlowControl, n: int, now_s: float, prefix: str = "h") -> list[Any]:
    """``n`` admitted attempts (their permits)."""
    permits = []
    for i in range(n):
        admission = await flow.acquire(f"{prefix}{i}", M, "flex", 1, now_s=now_s)
        assert admission.admitted, (i, admission)
        permits.append(admission.permit)
    return permits


async def wait_in_line(flow: FlowControl, *jobs: str, now_s: float, step_s: float = 1.0) -> None:
    """Each job refused for want of a permit, ``step_s`` apart: it joins the waiters."""
    for i, job in enumerate(jobs):
        admission = await flow.acquire(job, M, "flex", 1, now_s=now_s + i * step_s)
        assert (admission.admitted, admission.reason) == (False, "no_permit"), job


# -- concurrency permits ---------------------------------------------------------------------------


async def test_permits_never_exceed_the_limit_under_200_concurrent_acquires(make_flow: MakeFlow, client: Redis) -> None:
    workers = [make_flow(f"w{i}", initial_limit=10.0, max_limit=10.0) for i in range(4)]
    admissions = await asyncio.gather(
        *(workers[i % 4].acquire(f"job-{i}", M, "flex", 100, now_s=T0) for i in range(200))
    )
    admitted = [a for a in admissions if a.admitted]
    assert len(admitted) == 10
    assert {a.reason for a in admissions if not a.admitted} == {"no_permit"}
    assert await client.zcard(KEYS.flow(f"permits:{M}:flex")) == 10
    assert max(a.in_flight for a in admitted) == 10
    refused = [f"job-{i}" for i, a in enumerate(admissions) if not a.admitted]
    assert await client.zcard(waiters_key()) == 190  # every refused job waits in line
    await enqueue(client, *refused)  # ...its arq run deferred
    # one released: it wakes the oldest waiter, and exactly one more gets in, whoever asks
    first = admitted[0]
    owner = next(w for w in workers if first.permit is not None and first.permit.job_id in w.held)
    await owner.release(first.permit, "client_error", now_s=T0 + 1)
    assert await client.zcard(waiters_key()) == 189
    assert len(await woken(client)) == 1
    again = await asyncio.gather(
        *(workers[i % 4].acquire(job, M, "flex", 100, now_s=T0 + 1) for i, job in enumerate(refused)),
        *(workers[i % 4].acquire(f"late-{i}", M, "flex", 100, now_s=T0 + 1) for i in range(50)),
    )
    assert sum(a.admitted for a in again) == 1
    assert await client.zcard(KEYS.flow(f"permits:{M}:flex")) == 10


async def test_a_dead_workers_permit_expires_and_is_purged(make_flow: MakeFlow, client: Redis) -> None:
    dead = make_flow("dead", initial_limit=1.0, max_limit=1.0, permit_ttl_s=60.0)
    alive = make_flow("alive", initial_limit=1.0, max_limit=1.0, permit_ttl_s=60.0)
    assert (await dead.acquire("a", M, "flex", 1, now_s=T0)).admitted
    refused = await alive.acquire("b", M, "flex", 1, now_s=T0 + 59.9)
    assert (refused.admitted, refused.reason) == (False, "no_permit")
    later = await alive.acquire("b", M, "flex", 1, now_s=T0 + 60.0)
    assert later.admitted
    assert await client.zrange(KEYS.flow(f"permits:{M}:flex"), 0, -1) == [b"b"]


async def test_renew_keeps_a_permit_and_does_not_revive_a_lapsed_one(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=1.0, max_limit=1.0, permit_ttl_s=60.0)
    other = make_flow("w2", initial_limit=1.0, max_limit=1.0, permit_ttl_s=60.0)
    assert (await flow.acquire("a", M, "flex", 1, now_s=T0)).admitted
    assert await flow.renew(now_s=T0 + 50) == 1
    assert not (await other.acquire("b", M, "flex", 1, now_s=T0 + 100)).admitted  # renewed until T0 + 110
    assert (await other.acquire("b", M, "flex", 1, now_s=T0 + 110)).admitted  # lapsed: purged, b holds it
    assert await flow.renew(now_s=T0 + 111) == 0  # a's permit is gone; renew must not bring it back
    assert await client.zrange(KEYS.flow(f"permits:{M}:flex"), 0, -1) == [b"b"]


async def test_renew_gives_up_on_a_permit_never_released(make_flow: MakeFlow) -> None:
    flow = make_flow(initial_limit=1.0, max_limit=1.0, permit_ttl_s=60.0, permit_max_hold_s=300.0)
    other = make_flow("w2", initial_limit=1.0, max_limit=1.0, permit_ttl_s=60.0)
    assert (await flow.acquire("a", M, "flex", 1, now_s=T0)).admitted
    assert await flow.renew(now_s=T0 + 290) == 1
    assert await flow.renew(now_s=T0 + 301) == 0
    assert flow.held == {}
    assert not (await other.acquire("b", M, "flex", 1, now_s=T0 + 349)).admitted
    assert (await other.acquire("b", M, "flex", 1, now_s=T0 + 350)).admitted


async def test_the_server_clock_by_default(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow()
    seconds, micros = await client.time()
    admission = await flow.acquire("a", M, "flex", 1)
    assert admission.permit is not None
    assert admission.permit.started_s == pytest.approx(seconds + micros / 1e6, abs=5.0)
    learned = await flow.release(admission.permit, "ok")
    assert learned is not None and learned.limit == flow.cfg.initial_limit  # app-limited: 1 < 8/2, no waiters
    assert (await flow.snapshot())["scopes"][0]["in_flight"] == 0


async def test_repeated_acquire_and_unused_release(make_flow: MakeFlow) -> None:
    flow = make_flow(initial_limit=2.0, max_limit=2.0, limits={M: Limits(rpm=10, tpm=1000)})
    first = await flow.acquire("a", M, "flex", 300, now_s=T0)
    second = await flow.acquire("a", M, "flex", 300, now_s=T0 + 1)  # a lost reply, asked again
    assert first.admitted
    assert second.admitted
    assert (await flow.snapshot(now_s=T0 + 1))["scopes"][0]["in_flight"] == 1
    assert (await flow.snapshot(now_s=T0 + 1))["models"][M]["this_minute"] == {"requests": 1.0, "tokens": 300.0}
    assert await flow.release(None, "ok") is None
    await flow.release(first.permit, None, now_s=T0 + 2)  # never called: refund the request and tokens
    snap = await flow.snapshot(now_s=T0 + 2)
    assert snap["scopes"][0]["in_flight"] == 0
    assert snap["scopes"][0]["limit"] == 2.0
    assert snap["models"][M]["this_minute"] == {"requests": 0.0, "tokens": 0.0}
    assert flow.held == {}


async def test_tiers_have_separate_limits(make_flow: MakeFlow) -> None:
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    assert (await flow.acquire("a", M, "flex", 1, now_s=T0)).admitted
    assert not (await flow.acquire("b", f"models/{M}", "flex", 1, now_s=T0)).admitted  # the same model
    assert (await flow.acquire("b", M, "standard", 1, now_s=T0)).admitted


# -- waiters: ack-clocked admission ----------------------------------------------------------------
#
# A job refused for want of a permit joins the line of its (model, tier); a release wakes the oldest
# waiter still on the arq queue (its run becomes due now), plus one per whole permit the limit grew.
# While anyone waits, a free permit goes to a woken job or to one of the first `free` in line, not
# to a newcomer.


async def test_waiters_are_fifo_and_woken_in_order(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    [first] = await hold(flow, 1, T0)
    await wait_in_line(flow, "w1", "w2", "w3", now_s=T0 + 1)
    await wait_in_line(flow, "w1", now_s=T0 + 9)  # asking again keeps its place (ZADD NX: first wait time)
    assert await waiting(client) == [("w1", T0 + 1), ("w2", T0 + 2), ("w3", T0 + 3)]
    await enqueue(client, "w1", "w2", "w3")
    await flow.release(first, "ok", now_s=T0 + 10)
    assert await waiting(client) == [("w2", T0 + 2), ("w3", T0 + 3)]
    assert await woken(client) == {"w1": ms(T0 + 10)}
    assert await scores(client, "w1", "w2", "w3") == [ms(T0 + 10), FAR_MS, FAR_MS]  # w1's run is due now
    # w1 runs and takes the permit; its release wakes w2, and so on down the line
    for job, next_job, now_s in (("w1", "w2", T0 + 11), ("w2", "w3", T0 + 13)):
        admission = await flow.acquire(job, M, "flex", 1, now_s=now_s)
        assert admission.admitted
        assert job not in await woken(client)
        await flow.release(admission.permit, "ok", now_s=now_s + 1)
        # due now, and ahead of every entry already due (w1's run still on the queue, as arq keeps it)
        [at] = await scores(client, next_job)
        assert at is not None and at <= ms(now_s + 1)
        assert at < min(score for score in await scores(client, "w1", "w2", "w3") if score != at)
        assert (await woken(client))[next_job] == at
    assert await waiting(client) == []


async def test_a_release_wakes_one_waiter_plus_one_per_permit_the_limit_grew(
    make_flow: MakeFlow, client: Redis
) -> None:
    flow = make_flow(initial_limit=4.0, max_limit=10.0)
    held = await hold(flow, 4, T0)
    line = [f"w{i}" for i in range(8)]
    await wait_in_line(flow, *line, now_s=T0 + 1, step_s=0.1)
    await enqueue(client, *line)
    # an outcome the limit does not learn from: one waiter replaces the request that ended
    assert await limit_after(flow.release(held[0], "client_error", now_s=T0 + 2)) == 4.0
    assert await scores(client, *line[:2]) == [ms(T0 + 2), FAR_MS]
    # an ok grows the limit by a whole permit (slow start, 4 -> 5): two waiters, though 3 are free
    assert await limit_after(flow.release(held[1], "ok", now_s=T0 + 3)) == 5.0
    # (woken jobs go ahead of those already due, here w0: arq takes due jobs oldest first)
    assert await scores(client, *line) == [ms(T0 + 2), ms(T0 + 2) - 1, ms(T0 + 2) - 1, *[FAR_MS] * 5]
    assert [job for job, _ in await waiting(client)] == line[3:]
    assert await woken(client) == {"w0": ms(T0 + 2), "w1": ms(T0 + 2) - 1, "w2": ms(T0 + 2) - 1}
    for job in line[:3]:  # the woken take their permits: 5 held, none free
        assert (await flow.acquire(job, M, "flex", 1, now_s=T0 + 4)).admitted
    assert await woken(client) == {}
    assert (await flow.acquire(line[3], M, "flex", 1, now_s=T0 + 4)).reason == "no_permit"  # first in line: full
    await flow.release(held[2], None, now_s=T0 + 5)  # refunded, never called: its permit goes to the line
    assert [job for job, _ in await waiting(client)] == line[4:]
    assert await scores(client, "w3", "w4") == [ms(T0 + 2) - 2, FAR_MS]  # the woken ones still run


async def limit_after(release: Any) -> float:
    learned = await release
    assert learned is not None
    return float(learned.limit)


async def believe(client: Redis, limit: float, cap: int) -> None:
    """Seed the state of a scope that has learned the pool's capacity (as release.lua stores it)."""
    await client.hset(KEYS.flow(f"state:{M}:flex"), mapping={"limit": limit, "cap": cap})  # type: ignore[misc]


async def test_growth_at_a_known_capacity_wakes_only_on_a_whole_permit(
    make_flow: MakeFlow, client: Redis
) -> None:
    flow = make_flow(initial_limit=4.0, max_limit=10.0)
    await believe(client, 2.0, 2)
    held = await hold(flow, 2, T0)  # full
    await wait_in_line(flow, "w0", "w1", "w2", now_s=T0 + 3)
    await enqueue(client, "w0", "w1", "w2")
    # at the capacity believed in, +probe_gain/limit: 2 -> 2.25, no whole permit: one replacement only
    assert await limit_after(flow.release(held[0], "ok", now_s=T0 + 6)) == pytest.approx(2.25)
    assert [job for job, _ in await waiting(client)] == ["w1", "w2"]
    assert (await flow.acquire("w0", M, "flex", 1, now_s=T0 + 6.1)).admitted
    # 2.25 -> 2.47: floor 2, both held, no permit free: the line waits
    assert await limit_after(flow.release(held[1], "ok", now_s=T0 + 7)) == pytest.approx(2.25 + 0.5 / 2.25)
    assert [job for job, _ in await waiting(client)] == ["w2"]


async def test_newcomers_queue_behind_the_line(make_flow: MakeFlow, client: Redis) -> None:
    """While something is in flight, a free permit goes to the first ``free`` in line (back on their
    own after waiter_timeout_s), not to a newcomer. An idle scope (nothing in flight: no release, no
    wake to come) admits whoever asks, so stale waiters can never lock it."""
    flow = make_flow(initial_limit=3.0, max_limit=3.0, permit_ttl_s=60.0)
    await hold(flow, 3, T0)  # their worker dies: the permits lapse at T0 + 60
    await wait_in_line(flow, "w0", "w1", "w2", "w3", now_s=T0 + 1)
    later = T0 + 61  # 3 free, 4 in line, nothing in flight
    idle = await flow.acquire("new", M, "flex", 1, now_s=later)
    assert (idle.admitted, idle.in_flight) == (True, 1)
    refused = await flow.acquire("late", M, "flex", 1, now_s=later)  # 2 free, 1 in flight: the line first
    assert (refused.admitted, refused.reason) == (False, "no_permit")
    assert not (await flow.acquire("w2", M, "flex", 1, now_s=later)).admitted  # rank 2 >= 2 free
    assert (await flow.acquire("w1", M, "flex", 1, now_s=later)).admitted  # rank 1 < 2 free
    assert (await flow.acquire("w0", M, "flex", 1, now_s=later)).admitted
    assert (await flow.acquire("w3", M, "flex", 1, now_s=later)).reason == "no_permit"  # full now
    assert await waiting(client) == [("w2", T0 + 3), ("w3", T0 + 4), ("late", later)]
    # with nobody in line, a newcomer takes a free permit at once
    other = make_flow(initial_limit=3.0, max_limit=3.0)
    assert (await other.acquire("x", M, "standard", 1, now_s=later)).admitted


async def test_a_capacity_503_wakes_nobody_and_a_load_independent_one_hands_its_permit_on(
    make_flow: MakeFlow, client: Redis
) -> None:
    flow = make_flow(initial_limit=4.0, max_limit=4.0)
    await believe(client, 4.0, 3)  # the pool took 3 at once; a 4th is a probe
    held = await hold(flow, 4, T0)
    await wait_in_line(flow, "w0", "w1", now_s=T0 + 1)
    await enqueue(client, "w0", "w1")
    # the 4th, above the capacity: the pool is full there; back to 3 permits, 3 held: nobody is woken
    learned = await flow.release(held[3], "overloaded", now_s=T0 + 5)
    assert learned is not None and (learned.limit, learned.verdict) == (3.0, "capacity")
    assert [job for job, _ in await waiting(client)] == ["w0", "w1"]
    assert await scores(client, "w0", "w1") == [FAR_MS, FAR_MS]
    assert await woken(client) == {}
    # the 1st, far below it with nothing to say the pool stops there: shed at random; its permit goes on
    learned = await flow.release(held[0], "overloaded", now_s=T0 + 6)
    assert learned is not None and (learned.limit, learned.verdict) == (3.0, "random")
    assert await waiting(client) == [("w1", T0 + 2)]
    assert await scores(client, "w0", "w1") == [ms(T0 + 6), FAR_MS]
    await flow.release(held[1], "client_error", now_s=T0 + 7)  # any other outcome wakes the next in line
    assert await waiting(client) == []


async def test_the_limit_binds_for_a_while_after_a_refusal_or_a_capacity_503(
    make_flow: MakeFlow, client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the worker claims by (worker.runtime.CLAIM_BATCH_FLOW): a load-independent 503 says nothing of
    the limit; a 503 taken for capacity, or an acquire that finds jobs in line (or joins it), says it binds,
    for binds_memory_s on this process's monotonic clock; before the pool's first answer, nothing is known
    and the limit is taken to bind."""
    clock = [100.0]
    monkeypatch.setattr("worker.flow_store.time", SimpleNamespace(time=time.time, monotonic=lambda: clock[0]))
    flow = make_flow(initial_limit=4.0, max_limit=4.0, binds_memory_s=10.0)
    await believe(client, 4.0, 3)
    held = await hold(flow, 4, T0)
    assert flow.limit_binds()  # nothing answered yet: a cold start, the limit unknown
    await flow.release(held[2], "ok", now_s=T0 + 0.5)
    assert not flow.limit_binds()
    learned = await flow.release(held[0], "overloaded", now_s=T0 + 1)
    assert learned is not None and learned.verdict == "random" and not flow.limit_binds()
    learned = await flow.release(held[3], "overloaded", now_s=T0 + 2)
    assert learned is not None and (learned.limit, learned.verdict) == (3.0, "capacity") and flow.limit_binds()
    clock[0] += 9.9
    assert flow.limit_binds()
    clock[0] += 0.2
    assert not flow.limit_binds()
    for job in ("k0", "k1"):  # 3 held: the limit since the capacity 503
        admitted = await flow.acquire(job, M, "flex", 1, now_s=T0 + 3)
        assert (admitted.admitted, admitted.line) == (True, False) and not flow.limit_binds()
    refused = await flow.acquire("w0", M, "flex", 1, now_s=T0 + 4)
    assert (refused.reason, refused.line) == ("no_permit", True) and flow.limit_binds()
    clock[0] += 10.1
    await flow.release(held[1], "ok", now_s=T0 + 5)  # w0 is woken into the permit: the line is empty again
    woken = await flow.acquire("w0", M, "flex", 1, now_s=T0 + 6)
    assert (woken.admitted, woken.line) == (True, False) and not flow.limit_binds()
    # another worker, cold: it meets the line before any answer of its own, and binds past binds_memory_s
    cold = make_flow("w2", initial_limit=4.0, max_limit=4.0, binds_memory_s=10.0)
    refused = await cold.acquire("c0", M, "flex", 1, now_s=T0 + 7)
    assert (refused.reason, refused.line) == ("no_permit", True) and cold.limit_binds()
    clock[0] += 10.1
    assert cold.limit_binds() and not flow.limit_binds()


async def test_the_last_permit_in_flight_wakes_the_line_even_after_a_capacity_503(
    make_flow: MakeFlow, client: Redis
) -> None:
    """No other release is to come once the last call in flight ends: whatever it learned, a line with
    room in the limit is woken (it used to wait for its fallback timer, waiter_timeout_s)."""
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    await believe(client, 1.0, 0)  # a step below level 1: every 503 is taken for capacity
    [held] = await hold(flow, 1, T0)
    await wait_in_line(flow, "w0", "w1", now_s=T0 + 1)
    await enqueue(client, "w0", "w1")
    learned = await flow.release(held, "overloaded", now_s=T0 + 5)  # the only call in flight, shed
    assert learned is not None and (learned.limit, learned.verdict) == (1.0, "capacity")
    assert await waiting(client) == [("w1", T0 + 2)]
    assert await scores(client, "w0", "w1") == [ms(T0 + 5), FAR_MS]  # one woken into the one permit
    assert await woken(client) == {"w0": ms(T0 + 5)}


async def test_a_paused_model_wakes_the_line_for_the_end_of_the_pause(make_flow: MakeFlow, client: Redis) -> None:
    """A permit freed during a 429 pause goes to the head of the line, due when the pause ends: skipped,
    it would sit idle while the line waits for its fallback timer."""
    flow = make_flow(initial_limit=2.0, max_limit=2.0, waiter_timeout_s=30.0)
    held = await hold(flow, 2, T0)
    await wait_in_line(flow, "w0", "w1", "w2", now_s=T0 + 1)
    await enqueue(client, "w0", "w1", "w2")
    await flow.pause(M, T0 + 30, "operator", now_s=T0 + 5)
    await flow.release(held[0], "ok", now_s=T0 + 6)  # a permit is free, but the model is paused
    assert await waiting(client) == [("w1", T0 + 2), ("w2", T0 + 3)]
    assert await scores(client, "w0", "w1") == [ms(T0 + 30), FAR_MS]  # due when the pause ends, not before
    assert await woken(client) == {"w0": ms(T0 + 30)}
    assert (await flow.acquire("w0", M, "flex", 1, now_s=T0 + 20)).reason == "paused"  # early: still paused
    await flow.release(held[1], "ok", now_s=T0 + 25)
    assert await waiting(client) == [("w2", T0 + 3)]
    assert await scores(client, "w1") == [ms(T0 + 30)]
    # w1's permit stays held for it past the pause's end: the line's head takes the other, not a newcomer
    assert (await flow.acquire("new", M, "flex", 1, now_s=T0 + 30.5)).reason == "no_permit"
    assert (await flow.acquire("w1", M, "flex", 1, now_s=T0 + 30.5)).admitted
    w2 = await flow.acquire("w2", M, "flex", 1, now_s=T0 + 30.6)
    assert w2.admitted and w2.permit is not None
    # a 429's own release wakes the line for the end of the pause it starts
    await enqueue(client, "new")
    await flow.release(w2.permit, "rate_limited", retry_after_s=7.0, now_s=T0 + 33)
    assert await scores(client, "new") == [ms(T0 + 33 + 7.0 + RETRY_INFO_MARGIN_S)]
    assert await waiting(client) == []


async def test_a_pause_longer_than_the_line_fallback_wakes_nobody(make_flow: MakeFlow, client: Redis) -> None:
    """The line's jobs come back on their own timer and are told when the pause ends: a wake that far
    ahead would hold its permit after an operator lifted the pause (`flexq resume`)."""
    flow = make_flow(initial_limit=2.0, max_limit=2.0, waiter_timeout_s=30.0)
    held = await hold(flow, 2, T0)
    await wait_in_line(flow, "w0", now_s=T0 + 1)
    await enqueue(client, "w0")
    await flow.pause(M, T0 + 100, "operator", now_s=T0 + 2)
    await flow.release(held[0], "ok", now_s=T0 + 5)
    assert await waiting(client) == [("w0", T0 + 1)]
    assert await scores(client, "w0") == [FAR_MS]
    assert await woken(client) == {}
    await flow.release(held[1], "ok", now_s=T0 + 100)  # the pause is over
    assert await waiting(client) == []
    assert await scores(client, "w0") == [ms(T0 + 100)]


async def test_a_wake_skips_jobs_no_longer_on_the_arq_queue(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    [first] = await hold(flow, 1, T0)
    await wait_in_line(flow, "gone1", "gone2", "queued", "next", now_s=T0 + 1)
    await enqueue(client, "queued", "next")  # the gone ones finished or were cancelled meanwhile
    await enqueue(client, "bystander", score=ms(T0) + 123)
    await flow.release(first, "client_error", now_s=T0 + 5)
    assert await waiting(client) == [("next", T0 + 4)]  # the gone ones left the line without a wake
    assert await scores(client, "gone1", "gone2") == [None, None]  # ZADD XX: not put back on the queue
    assert await client.zcard(KEYS.arq_queue) == 3
    # the wake goes just ahead of the bystander, already due: arq takes due jobs oldest first
    assert await scores(client, "queued", "next", "bystander") == [ms(T0) + 122, FAR_MS, ms(T0) + 123]
    assert await woken(client) == {"queued": ms(T0) + 122}
    assert not await flow.settle_wake("gone1")
    assert await client.zscore(KEYS.arq_queue, "gone1") is None


async def test_settle_wake_reapplies_a_wake_lost_to_arqs_rescoring(make_flow: MakeFlow, client: Redis) -> None:
    """A release wakes w0 while its arq run (the attempt refused for want of a permit) is still
    finishing: arq's ZINCRBY for the deferral then pushes it back; the after-job hook re-applies."""
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    [first] = await hold(flow, 1, T0)
    run_score = ms(T0 + 1) - 50  # w0's run was due just before it started
    await enqueue(client, "w0", score=run_score)
    await wait_in_line(flow, "w0", now_s=T0 + 1)
    await flow.release(first, "ok", now_s=T0 + 1.2)  # the wake, while w0's run is still finishing
    wake = run_score - 1  # ahead of everything due, w0's own running entry included
    assert await scores(client, "w0") == [wake]
    # arq: Retry(defer=10 s) -> zincrby(defer_ms + (finished_ms - score at start), w0)
    await client.zincrby(KEYS.arq_queue, 10_000 + (ms(T0 + 1.3) - run_score), "w0")
    assert await scores(client, "w0") == [wake + 10_000 + (ms(T0 + 1.3) - run_score)]  # the wake is lost
    assert await flow.settle_wake("w0")
    assert await scores(client, "w0") == [wake]  # due at the wake again
    assert await woken(client) == {"w0": wake}  # until an attempt spends it
    admission = await flow.acquire("w0", M, "flex", 1, now_s=T0 + 1.25)
    assert admission.admitted
    assert await woken(client) == {}
    # spent: a later deferral of w0 is not undone
    await client.zincrby(KEYS.arq_queue, 10_000, "w0")
    assert not await flow.settle_wake("w0")
    assert await scores(client, "w0") == [wake + 10_000]
    assert not await flow.settle_wake("never-woken")


async def test_settle_wake_does_not_requeue_a_finished_job(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    [first] = await hold(flow, 1, T0)
    await wait_in_line(flow, "w0", now_s=T0 + 1)
    await enqueue(client, "w0")
    await flow.release(first, "ok", now_s=T0 + 2)
    await client.zrem(KEYS.arq_queue, "w0")  # its run ended the job (cancelled, past its deadline)
    assert not await flow.settle_wake("w0")
    assert await client.zscore(KEYS.arq_queue, "w0") is None


async def test_a_woken_jobs_permit_is_reserved_for_it(make_flow: MakeFlow, client: Redis) -> None:
    """Issue 10 (4): a job that comes back on its own (its fallback timer, or a retry carrying a stale
    wake) while a woken job is on its way took the permit meant for the woken one, which then went
    back in line: FIFO broken. The release now reserves the permit for the job it wakes."""
    flow = make_flow(initial_limit=2.0, max_limit=2.0, wake_hold_s=10.0)
    held = await hold(flow, 2, T0)
    await wait_in_line(flow, "w0", "w1", "w2", now_s=T0 + 1)
    await enqueue(client, "w0", "w1", "w2")
    await client.hset(KEYS.flow("woken"), "w1", ms(T0))  # type: ignore[misc]  # a stale wake of w1's
    await flow.release(held[0], "client_error", now_s=T0 + 5)
    assert await woken(client) == {"w0": ms(T0 + 5), "w1": ms(T0)}
    # w1 gets in first, stale wake and all: the free permit is w0's, w1 stays in line
    w1 = await flow.acquire("w1", M, "flex", 1, now_s=T0 + 5.01)
    assert (w1.admitted, w1.reason) == (False, "no_permit")
    assert await waiting(client) == [("w1", T0 + 2), ("w2", T0 + 3)]
    assert (await flow.acquire("new", M, "flex", 1, now_s=T0 + 5.02)).reason == "no_permit"  # nor a newcomer
    w0 = await flow.acquire("w0", M, "flex", 1, now_s=T0 + 5.05)
    assert w0.admitted
    assert await woken(client) == {}  # every wake is spent by the attempt that carried it
    await flow.release(w0.permit, "ok", now_s=T0 + 6)  # wakes w1, next in line
    assert await woken(client) == {"w1": ms(T0 + 5) - 1}
    w1 = await flow.acquire("w1", M, "flex", 1, now_s=T0 + 6.05)
    assert w1.admitted
    assert await waiting(client) == [("w2", T0 + 3), ("new", T0 + 5.02)]
    assert not await flow.settle_wake("w1")  # nothing left to re-apply
    assert await scores(client, "w1") == [ms(T0 + 5) - 1]


async def test_a_reservation_lapses_when_the_woken_job_never_comes(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=2.0, max_limit=2.0, wake_hold_s=10.0)
    held = await hold(flow, 2, T0)
    await wait_in_line(flow, "w0", "w1", now_s=T0 + 1)
    await enqueue(client, "w0", "w1")
    await flow.release(held[0], "ok", now_s=T0 + 5)  # w0 woken, then cancelled: it never asks
    assert await client.ttl(KEYS.flow(f"reserved:{M}:flex")) > 0  # bounded state
    assert (await flow.acquire("w1", M, "flex", 1, now_s=T0 + 14.9)).reason == "no_permit"
    w1 = await flow.acquire("w1", M, "flex", 1, now_s=T0 + 15.1)  # the hold is over: first in line
    assert w1.admitted
    assert await client.zcard(KEYS.flow(f"reserved:{M}:flex")) == 0


async def test_the_limit_grows_while_jobs_wait_even_with_few_permits_held(
    make_flow: MakeFlow, client: Redis
) -> None:
    flow = make_flow(initial_limit=4.0, max_limit=10.0, permit_ttl_s=60.0)
    [kept] = await hold(flow, 1, T0 + 50, prefix="k")
    await hold(flow, 3, T0)  # their worker dies: the permits lapse at T0 + 60
    await wait_in_line(flow, "w0", now_s=T0 + 51)
    await enqueue(client, "w0")
    # at T0 + 61 one permit is held (1 < 4/2: app-limited), but a job waits: the limit is the bottleneck
    assert await limit_after(flow.release(kept, "ok", now_s=T0 + 61)) == 5.0
    assert await waiting(client) == []  # ...and the job is woken
    assert (await flow.acquire("w0", M, "flex", 1, now_s=T0 + 61.1)).admitted
    # without anyone waiting, the same ok leaves it alone
    [kept] = await hold(flow, 1, T0 + 62, prefix="k2")
    assert await limit_after(flow.release(kept, "ok", now_s=T0 + 63)) == 5.0


# -- waiters: suspected bugs (strict xfail: remove the mark when fixed) --------------------------------


async def test_a_woken_job_refused_for_a_pause_is_not_rerun_at_once(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    [first] = await hold(flow, 1, T0)
    await wait_in_line(flow, "w0", now_s=T0 + 1)
    await enqueue(client, "w0")
    await flow.release(first, "ok", now_s=T0 + 2)
    assert await woken(client) == {"w0": ms(T0 + 2)}
    await flow.pause(M, T0 + 600, "429 billing", now_s=T0 + 2.01)  # another worker's 429
    for run in range(3):  # w0's runs: each refused as paused, deferred by arq to the pause's end
        now_s = T0 + 2.05 + run * 0.1
        refused = await flow.acquire("w0", M, "flex", 1, now_s=now_s)
        assert refused.reason == "paused"
        score = await client.zscore(KEYS.arq_queue, "w0")
        assert score is not None
        await client.zincrby(KEYS.arq_queue, ms(T0 + 600) - score, "w0")
        await flow.settle_wake("w0")  # the after-job hook
        assert await scores(client, "w0") == [ms(T0 + 600)], run


async def test_a_429_release_wakes_the_line_for_when_its_pause_ends(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=2.0, max_limit=2.0)
    held = await hold(flow, 2, T0)
    await wait_in_line(flow, "w0", "w1", now_s=T0 + 1)
    await enqueue(client, "w0", "w1")
    await flow.release(held[0], "rate_limited", retry_after_s=19.0, quota=QuotaKind.PER_MINUTE, now_s=T0 + 2)
    assert (await flow.acquire("x", M, "flex", 1, now_s=T0 + 3)).reason == "paused"
    assert await scores(client, "w0", "w1") == [ms(T0 + 2 + 19 + RETRY_INFO_MARGIN_S), FAR_MS]
    assert await waiting(client) == [("w1", T0 + 2)]


async def test_stale_waiters_do_not_block_an_idle_scope(make_flow: MakeFlow, client: Redis) -> None:
    flow = make_flow(initial_limit=2.0, max_limit=2.0, permit_ttl_s=60.0)
    await hold(flow, 2, T0)  # their worker dies: no release will come
    await wait_in_line(flow, "gone1", "gone2", now_s=T0 + 1)  # then cancelled: never asks again
    admitted = False
    for attempt in range(30):  # a newcomer, back every waiter_timeout_s for five minutes
        admitted = (await flow.acquire("new", M, "flex", 1, now_s=T0 + 61 + 10 * attempt)).admitted
        if admitted:
            break
    assert admitted


# -- 429 pauses and quota alerts -------------------------------------------------------------------


async def test_a_429_pauses_the_model_for_every_worker(make_flow: MakeFlow) -> None:
    one, two = make_flow("w1"), make_flow("w2")
    first = await one.acquire("a", M, "flex", 1, now_s=T0)
    await one.release(first.permit, Outcome.RATE_LIMITED, retry_after_s=29.0, quota=QuotaKind.PER_MINUTE, now_s=T0 + 1)
    paused = await two.acquire("b", M, "standard", 1, now_s=T0 + 10)  # quotas are per model, any tier
    assert (paused.admitted, paused.reason, paused.wait_s) == (False, "paused", pytest.approx(21.0))
    assert (await two.acquire("b", "gemini-2.5-pro", "flex", 1, now_s=T0 + 10)).admitted  # other models run
    snap = await two.snapshot(now_s=T0 + 10)
    assert snap["models"][M]["pause"]["reason"] == "429 per_minute, retryDelay 29s"
    assert snap["models"][M]["quota_alert"] is None  # per-minute: no alert
    assert (await two.acquire("b", M, "flex", 1, now_s=T0 + 31)).admitted


async def test_pause_is_only_extended_and_resume_lifts_it(make_flow: MakeFlow) -> None:
    one, two = make_flow("w1"), make_flow("w2")
    await one.pause(M, T0 + 100, "operator", now_s=T0)
    await two.pause(M, T0 + 50, "shorter", now_s=T0)  # does not shorten
    refused = await two.acquire("a", M, "flex", 1, now_s=T0 + 60)
    assert (refused.reason, refused.wait_s) == ("paused", pytest.approx(40.0))
    assert (await two.snapshot(now_s=T0 + 60))["models"][M]["pause"]["reason"] == "operator"
    await one.resume(M)
    assert (await two.acquire("a", M, "flex", 1, now_s=T0 + 60)).admitted


@pytest.mark.parametrize(
    ("quota", "retry_after_s", "pause_s"),
    [(QuotaKind.PER_DAY, 40.0, 3600.0), (QuotaKind.BILLING, None, 900.0)],
)
async def test_quota_alert_with_a_long_pause(
    make_flow: MakeFlow, quota: QuotaKind, retry_after_s: float | None, pause_s: float
) -> None:
    one, two = make_flow("w1", billing_pause_s=900.0), make_flow("w2", billing_pause_s=900.0)
    a = await one.acquire("a", M, "flex", 1, now_s=T0)
    b = await two.acquire("b", M, "flex", 1, now_s=T0)
    c = await two.acquire("c", M, "flex", 1, now_s=T0)
    await one.release(a.permit, "rate_limited", retry_after_s=retry_after_s, quota=quota, now_s=T0 + 1)
    await two.release(b.permit, "rate_limited", retry_after_s=retry_after_s, quota=quota, now_s=T0 + 2)
    snap = await one.snapshot(now_s=T0 + 3)
    alert = snap["models"][M]["quota_alert"]
    assert (alert["kind"], alert["count"], alert["since_s"], alert["last_s"]) == (str(quota), 2, T0 + 1, T0 + 2)
    assert snap["models"][M]["pause"]["until_s"] == pytest.approx(T0 + 2 + pause_s)
    assert snap["transitions"][0]["to"] == f"quota_{quota}"
    refused = await two.acquire("d", M, "flex", 1, now_s=T0 + 3)
    assert (refused.reason, refused.wait_s) == ("paused", pytest.approx(pause_s - 1))
    # an answer to a request sent before the alert proves nothing; one sent after clears it
    await two.release(c.permit, "ok", now_s=T0 + 4)
    assert (await one.snapshot(now_s=T0 + 4))["models"][M]["quota_alert"] is not None
    later = await one.acquire("e", M, "flex", 1, now_s=T0 + 2 + pause_s)
    await one.release(later.permit, "ok", now_s=T0 + 3 + pause_s)
    snap = await one.snapshot(now_s=T0 + 3 + pause_s)
    assert snap["models"][M]["quota_alert"] is None
    assert snap["transitions"][0]["to"] == "quota_ok"


# -- circuit breaker -------------------------------------------------------------------------------

BREAKER = {
    "breaker_min_failures": 3, "breaker_cool_down_s": 5.0, "breaker_window_s": 10.0, "breaker_failure_ratio": 0.5,
}


async def test_breaker_opens_and_probes_across_workers(make_flow: MakeFlow) -> None:
    one, two = make_flow("w1", **BREAKER), make_flow("w2", **BREAKER)
    permits = [(await one.acquire(f"j{i}", M, "flex", 1, now_s=T0)).permit for i in range(6)]
    for i, permit in enumerate(permits[:3]):
        await one.release(permit, "server_error", now_s=T0 + 1 + i * 0.1)
    refused = await two.acquire("x", M, "flex", 1, now_s=T0 + 2)
    assert (refused.reason, refused.wait_s) == ("circuit_open", pytest.approx(4.2))
    await one.release(permits[3], "ok", now_s=T0 + 3)  # a straggler's answer does not close it
    assert (await two.acquire("x", M, "flex", 1, now_s=T0 + 3)).reason == "circuit_open"
    probe = await two.acquire("x", M, "flex", 1, now_s=T0 + 6.2)
    assert (probe.admitted, probe.probe) == (True, True)
    busy = await one.acquire("y", M, "flex", 1, now_s=T0 + 6.3)
    assert (busy.admitted, busy.reason) == (False, "probe_busy")
    await one.release(permits[4], "ok", now_s=T0 + 6.4)  # stragglers sent before it opened: not the probe
    await one.release(permits[5], "server_error", now_s=T0 + 6.5)
    assert (await one.acquire("y", M, "flex", 1, now_s=T0 + 6.6)).reason == "probe_busy"
    await two.release(probe.permit, "timeout", now_s=T0 + 7)  # probe failed: open again, twice as long
    assert (await one.acquire("y", M, "flex", 1, now_s=T0 + 7)).wait_s == pytest.approx(10.0)
    probe = await one.acquire("y", M, "flex", 1, now_s=T0 + 17)
    assert probe.probe
    await one.release(probe.permit, "ok", now_s=T0 + 18)
    after = await two.acquire("z", M, "flex", 1, now_s=T0 + 18)
    assert (after.admitted, after.probe) == (True, False)
    snap = await two.snapshot(now_s=T0 + 18)
    assert snap["scopes"][0]["breaker"]["state"] == "closed"
    assert snap["scopes"][0]["breaker"]["opens"] == 0
    moves = [(t["from"], t["to"], t["worker"]) for t in reversed(snap["transitions"])]
    assert moves == [
        ("closed", "open", "w1"), ("open", "half_open", "w2"), ("half_open", "open", "w2"),
        ("open", "half_open", "w1"), ("half_open", "closed", "w1"),
    ]
    assert snap["transitions"][-1]["t"] == pytest.approx(T0 + 1.2)


async def test_a_probe_with_no_verdict_frees_the_probe_slot(make_flow: MakeFlow) -> None:
    flow = make_flow(**BREAKER)
    for i in range(3):
        permit = (await flow.acquire(f"j{i}", M, "flex", 1, now_s=T0)).permit
        await flow.release(permit, "server_error", now_s=T0)
    probe = await flow.acquire("p", M, "flex", 1, now_s=T0 + 5)
    assert probe.probe
    assert (await flow.acquire("q", M, "flex", 1, now_s=T0 + 5)).reason == "probe_busy"
    await flow.release(probe.permit, "rate_limited", retry_after_s=0.0, now_s=T0 + 5)  # 429: no verdict
    assert (await flow.acquire("q", M, "flex", 1, now_s=T0 + 6)).probe


# -- RPM / TPM -------------------------------------------------------------------------------------


async def test_rpm_limit_across_workers(make_flow: MakeFlow) -> None:
    limits = {M: Limits(rpm=3)}
    one, two = make_flow("w1", limits=limits), make_flow("w2", limits=limits)
    for job, flow in (("a", one), ("b", two), ("c", one)):
        admission = await flow.acquire(job, M, "flex", 10, now_s=T0 + 10)
        assert admission.admitted
        await flow.release(admission.permit, "ok", now_s=T0 + 11)
    refused = await two.acquire("d", M, "flex", 10, now_s=T0 + 20)
    assert (refused.reason, refused.wait_s) == ("rpm", pytest.approx(40.0 + 20.0))  # next window, 1/3 in
    assert (await two.acquire("d", "gemini-2.5-pro", "flex", 10, now_s=T0 + 20)).admitted  # other model
    assert not (await one.acquire("d", M, "flex", 10, now_s=T0 + 79.9)).admitted
    assert (await one.acquire("d", M, "flex", 10, now_s=T0 + 80.0)).admitted
    assert (await two.acquire("e", M, "flex", 10, now_s=T0 + 80.0)).reason == "rpm"


async def test_tpm_limit_corrected_by_reported_usage(make_flow: MakeFlow) -> None:
    flow = make_flow(limits={M: Limits(tpm=1000)})
    a = await flow.acquire("a", M, "flex", 400, now_s=T0)
    b = await flow.acquire("b", M, "flex", 400, now_s=T0)
    assert a.admitted
    assert b.admitted
    refused = await flow.acquire("c", M, "flex", 400, now_s=T0 + 1)
    assert (refused.admitted, refused.reason) == (False, "tpm")
    assert refused.wait_s > 0
    await flow.release(a.permit, "ok", used_tokens=100, now_s=T0 + 2)  # used 300 fewer than estimated
    assert (await flow.acquire("c", M, "flex", 400, now_s=T0 + 2)).admitted
    snap = await flow.snapshot(now_s=T0 + 2)
    assert snap["models"][M]["this_minute"] == {"requests": 3.0, "tokens": 900.0}
    await flow.release(b.permit, "ok", used_tokens=900, now_s=T0 + 3)  # used more: charged
    assert (await flow.snapshot(now_s=T0 + 3))["models"][M]["this_minute"]["tokens"] == 1400.0
    assert (await flow.acquire("d", M, "flex", 1, now_s=T0 + 3)).reason == "tpm"


# -- the limit across workers ---------------------------------------------------------------------


async def test_the_limit_finds_a_capacity_c_server_beside_random_shedding(make_flow: MakeFlow, client: Redis) -> None:
    """Two workers drain a backlog on a server that serves C requests at once (1 s each), 503s the
    rest, and sheds 30% of calls at random besides. arq is played by the test: a job runs when its
    score on the arq queue is due; one refused for want of a permit is deferred by waiter_timeout_s
    (a wake makes it due at once); one shed with a 503 retries after 0.5 s; a finished job is
    replaced by a new one (a constant backlog)."""
    capacity, dt_s, backlog, rate_503 = 12, 0.1, 60, 0.3
    rng = random.Random(11)
    flows = [make_flow(f"w{i}", initial_limit=2.0) for i in range(2)]
    waiter_timeout_ms = round(flows[0].cfg.waiter_timeout_s * 1000)
    ends: list[tuple[float, int, str, Any, str, int]] = []  # (end, seq, outcome, permit, job, worker)
    serving, seq, now, samples, runs, answered = 0, 0, T0, [], 0, 0
    calls, limit = 0, 2.0
    verdicts: dict[str, int] = {}
    await enqueue(client, *(f"j{i}" for i in range(backlog)), score=ms(T0))
    next_job = backlog
    while now < T0 + 90:
        while ends and ends[0][0] <= now:
            end, _, outcome, permit, job, worker = heapq.heappop(ends)
            learned = await flows[worker].release(permit, outcome, now_s=end)
            assert learned is not None
            limit = learned.limit
            verdicts[learned.verdict] = verdicts.get(learned.verdict, 0) + 1
            serving -= outcome == "ok"
            if outcome == "ok":  # done: a new job takes its place in the backlog
                answered += 1
                await enqueue(client, f"j{next_job}", score=ms(end))
                next_job += 1
            else:
                await client.zadd(KEYS.arq_queue, {job: ms(end) + 500})
        for raw in await client.zrangebyscore(KEYS.arq_queue, "-inf", ms(now)):
            job, seq, runs = _name(raw), seq + 1, runs + 1
            admission = await flows[seq % 2].acquire(job, M, "flex", 1, now_s=now)
            if not admission.admitted:
                assert admission.reason == "no_permit"
                await client.zadd(KEYS.arq_queue, {job: ms(now) + waiter_timeout_ms})
                continue
            await client.zrem(KEYS.arq_queue, job)
            calls += 1
            shed = serving >= capacity or rng.random() < rate_503
            outcome, latency_s = ("overloaded", dt_s) if shed else ("ok", 1.0)
            serving += outcome == "ok"
            heapq.heappush(ends, (now + latency_s, seq, outcome, admission.permit, job, seq % 2))
        samples.append((now, limit, serving))
        now = round(now + dt_s, 6)
    late = [(limit, in_service) for t, limit, in_service in samples if t >= T0 + 30]
    assert min(limit for limit, _ in late) >= 0.6 * capacity  # random 503s never collapse it
    assert max(limit for limit, _ in late) <= 2 * capacity
    assert sum(in_service for _, in_service in late) / len(late) >= 0.85 * capacity  # the pool is kept full
    assert verdicts.get("random", 0) > verdicts.get("capacity", 0) > 0  # both kinds were told apart
    assert calls / answered <= 1 / (1 - rate_503) + 0.35
    assert runs <= 4 * (next_job - backlog)  # few refused runs: waiters wait to be woken, they do not poll


# -- the Lua scripts agree with their oracle -------------------------------------------------------

OUTCOMES: list[tuple[str | None, float]] = [
    ("ok", 0.45), ("overloaded", 0.2), ("server_error", 0.1), ("timeout", 0.05), ("client_error", 0.04),
    ("blocked", 0.02), ("connection_error", 0.03), ("rate_limited", 0.04), ("interrupted", 0.04), (None, 0.03),
]


def _cancellable(ref: Oracle, deferred: list[str], held: int) -> list[str]:
    """Deferred jobs the walk may cancel: any not in line; the head of the line only while permits
    are held (a release will pop it). A stale waiter with nothing in flight blocks the scope for
    good (test_stale_waiters_do_not_block_an_idle_scope): the walk must not wander into that."""
    line = [job for job, _ in ref.line()]
    return [job for job in deferred if job not in ref.waiters or (held >= 2 and job == line[0])]


def _float(raw: dict[bytes, bytes], name: str, default: float = 0.0) -> float:
    value = raw.get(name.encode())
    return float(value) if value not in (None, b"") else default


async def _stored_levels(client: Redis) -> dict[int, tuple[float, float, float]]:
    """The counts per in-flight level release.lua keeps in the scope's state hash (fields ``L<level>``)."""
    raw: dict[bytes, bytes] = await client.hgetall(KEYS.flow(f"state:{M}:flex"))  # type: ignore[misc]
    out = {}
    for field, value in raw.items():
        if field.startswith(b"L") and field[1:].isdigit():
            calls, sheds, at = (float(x) for x in value.split())
            out[int(field[1:])] = (calls, sheds, at)
    return out


async def _acquire_both(
    flow: FlowControl, ref: Oracle, client: Redis, job: str, now: float, step: int, held: dict[str, Any],
    deferred: list[str],
) -> str:
    """One acquire through the script and the oracle: they must agree; the walk's books follow."""
    got = await flow.acquire(job, M, "flex", 1, now_s=now)
    want = ref.acquire(job, now)
    assert (got.admitted, got.reason, got.probe) == (want.admitted, want.reason, want.probe), step
    assert got.wait_s == pytest.approx(want.wait_s, abs=1e-9), step
    assert got.in_flight == want.level, step
    if got.admitted:
        held[job] = got.permit
        if job in deferred:
            deferred.remove(job)
        ref.queued.pop(job, None)
        await client.zrem(KEYS.arq_queue, job)
    elif job not in deferred:
        deferred.append(job)
        ref.queued[job] = FAR_MS
        await enqueue(client, job)
    return got.reason


async def test_lua_scripts_agree_with_their_oracle(make_flow: MakeFlow, client: Redis) -> None:
    cfg = {
        "initial_limit": 3.0, "max_limit": 9.0, "permit_ttl_s": 4.0, "breaker_window_s": 2.0,
        "breaker_min_failures": 4, "breaker_cool_down_s": 1.0, "breaker_cool_down_max_s": 4.0,
        "step_min_llr": 4.0, "level_half_life_s": 1.0, "breaker_failure_ratio": 0.5,
    }
    flows = [make_flow(f"w{i}", **cfg) for i in range(2)]
    ref = Oracle(flows[0].cfg)
    rng = random.Random(20261130)
    held: dict[str, Any] = {}
    deferred: list[str] = []  # refused jobs whose arq run comes back (on the arq queue)
    now, reasons, states = T0 + 0.123, set[str](), set[Breaker]()
    names, weights = zip(*OUTCOMES, strict=True)
    for step in range(1500):
        now += rng.uniform(0.0, 0.35)
        roll = rng.random()
        if held and roll < 0.45:
            job = rng.choice(sorted(held))
            permit = held.pop(job)
            outcome = rng.choices(names, weights)[0]
            if permit.level > 5 and rng.random() < 0.7:  # a pool of about 5: capacity 503s above it
                outcome = "overloaded"
            retry_after_s = rng.choice([0.0, 0.5])
            want = ref.release(job, started_s=permit.started_s, level=permit.level, outcome=outcome,
                               retry_after_s=retry_after_s, now_s=now)
            got = await flows[step % 2].release(
                permit, outcome, retry_after_s=retry_after_s, quota=QuotaKind.PER_MINUTE, now_s=now
            )
            assert got is not None
            assert (got.limit, got.verdict) == (pytest.approx(want[0], rel=1e-12), want[1]), step
        elif 0.45 <= roll < 0.5 and (gone := _cancellable(ref, deferred, len(held))):
            # a deferred job leaves the queue for good (cancelled, past its deadline)
            job = rng.choice(gone)
            deferred.remove(job)
            ref.queued.pop(job, None)
            await client.zrem(KEYS.arq_queue, job)
        else:
            woken_jobs = sorted(set(ref.woken) & set(deferred))
            if woken_jobs and roll < 0.8:  # woken: its run is due now
                job = rng.choice(woken_jobs)
            elif deferred and roll < 0.9:  # back on its own (waiter_timeout_s, or a known wait)
                job = rng.choice(deferred)
            else:
                job = f"j{step}"
            reasons.add(await _acquire_both(flows[step % 2], ref, client, job, now, step, held, deferred))
        raw: dict[bytes, bytes] = await client.hgetall(KEYS.flow(f"state:{M}:flex"))  # type: ignore[misc]
        breaker = ref.breaker
        stored = BreakerState(
            Breaker(raw.get(b"state", b"closed").decode()), _float(raw, "since_s"), _float(raw, "open_until_s"),
            int(_float(raw, "opens")), int(_float(raw, "win")), _float(raw, "ok"), _float(raw, "failed"),
            _float(raw, "prev_ok"), _float(raw, "prev_failed"), _float(raw, "probe_until_s"),
        )
        assert stored == replace(breaker, since_s=pytest.approx(breaker.since_s)), step
        control = ref.control
        assert _float(raw, "limit", cfg["initial_limit"]) == pytest.approx(control.limit, rel=1e-12), step
        assert (raw.get(b"cap") or b"").decode() == ("" if control.cap is None else str(control.cap)), step
        if raw.get(b"p_n"):
            assert (_float(raw, "p_hat"), _float(raw, "p_n"), _float(raw, "short"), _float(raw, "tokens")) == (
                pytest.approx((control.p_hat, control.p_n, control.short, control.tokens), rel=1e-9)), step
        stored_levels = await _stored_levels(client)
        assert set(stored_levels) == set(control.levels), step
        for level, counted in control.levels.items():
            assert stored_levels[level] == pytest.approx(counted, rel=1e-9), (step, level)
        assert await waiting(client) == ref.line(), step
        assert await woken(client) == ref.woken, step
        for job, at in ref.woken.items():
            if job in ref.queued:
                assert await client.zscore(KEYS.arq_queue, job) == at, (step, job)
        states.add(breaker.state)
    # the walk covered what it claims to check
    assert states == {Breaker.CLOSED, Breaker.OPEN, Breaker.HALF_OPEN}
    assert {"ok", "no_permit", "paused", "circuit_open", "probe_busy"} <= reasons
    assert set(ref.verdicts) == {"random", "capacity", "excess", "answer"}, ref.verdicts
    assert min(ref.seen.values()) >= 1, ref.seen  # every path of the line was taken (and agreed) at least once


# -- snapshot --------------------------------------------------------------------------------------


async def test_snapshot_shows_every_scope(make_flow: MakeFlow) -> None:
    flow = make_flow(limits={M: Limits(rpm=100)})
    assert await flow.snapshot(now_s=T0) == {"now_s": T0, "scopes": [], "models": {}, "transitions": []}
    held = [(await flow.acquire(f"a{i}", M, "flex", 5, now_s=T0)).permit for i in range(5)]
    await flow.acquire("b", "gemini-2.5-pro", "standard", 5, now_s=T0)
    await flow.release(held[0], "overloaded", now_s=T0 + 1)  # nothing says the pool stops there: random
    await flow.release(held[1], "server_error", now_s=T0 + 1)
    snap = await flow.snapshot(now_s=T0 + 1)
    by_scope = {(s["model"], s["tier"]): s for s in snap["scopes"]}
    assert set(by_scope) == {(M, "flex"), ("gemini-2.5-pro", "standard")}
    assert by_scope[(M, "flex")]["limit"] == flow.cfg.initial_limit  # a load-independent 503 changes nothing
    assert by_scope[(M, "flex")]["capacity_step"] is None
    assert by_scope[(M, "flex")]["random_503_rate"] == pytest.approx(1 / (flow.cfg.baseline_prior_n + 1), abs=1e-4)
    assert by_scope[(M, "flex")]["last_decrease_s"] is None
    assert by_scope[(M, "flex")]["in_flight"] == 3
    assert by_scope[(M, "flex")]["breaker"]["window_failed"] == 2.0  # the 5xx and the load-independent 503
    assert by_scope[("gemini-2.5-pro", "standard")]["in_flight"] == 1
    assert snap["models"][M]["limits"] == {"rpm": 100, "tpm": None}
    assert snap["models"]["gemini-2.5-pro"]["limits"] is None
    live = await flow.snapshot()  # the server's clock: the T0 permit is long expired or not, but counted sanely
    assert live["now_s"] > 1_700_000_000


async def test_flow_lines_for_the_console(make_flow: MakeFlow) -> None:
    flow = make_flow(initial_limit=8.0, **BREAKER)
    for i in range(3):
        permit = (await flow.acquire(f"j{i}", M, "flex", 1, now_s=T0)).permit
        await flow.release(permit, "server_error", now_s=T0 + 1)
    permit = (await flow.acquire("b", "gemini-2.5-pro", "flex", 1, now_s=T0)).permit
    await flow.release(permit, "rate_limited", quota=QuotaKind.BILLING, now_s=T0 + 1)
    lines = flow_lines(await flow.snapshot(now_s=T0 + 2))
    assert lines == [
        "flow gemini-2.5-flash flex: limit 8, in flight 0, breaker open for 4s more (opened 1x in a row)",
        "flow gemini-2.5-pro flex: limit 8, in flight 0, breaker closed",
        "flow gemini-2.5-pro: paused 599s more (429 billing)",
        "QUOTA ALERT gemini-2.5-pro: billing quota, 1 x 429 since 2027-01-15T08:00:01+00:00: 429 billing",
    ]



async def test_wakes_are_written_on_the_workers_clock_not_redis_s(
    make_flow: MakeFlow, client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """arq compares a run's due time with the worker's own clock: with Redis 120 s ahead of the
    workers, a wake written on Redis's clock would make the woken job due two minutes late."""
    flow = make_flow(initial_limit=1.0, max_limit=1.0)
    [first] = await hold(flow, 1, T0)
    await wait_in_line(flow, "w1", now_s=T0 + 1)
    await enqueue(client, "w1")
    seconds, micros = await client.time()
    redis_now_s = seconds + micros / 1e6
    worker_now_s = redis_now_s - 120.0
    monkeypatch.setattr("worker.flow_store.time.time", lambda: worker_now_s)
    await flow.release(first, "ok")  # production: no now_s, the server's clock for the flow state
    [at] = await scores(client, "w1")
    assert at is not None and abs(at - ms(worker_now_s)) < 5_000  # due now for the worker that polls
    assert (await woken(client))["w1"] == at
