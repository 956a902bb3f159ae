"""worker.runner.Runner in process: fakeredis store, a scripted Gemini seam, no worker process, no sleeps.

Each test enqueues through the producer API, runs attempts with ``Runner.run`` (what the arq task
does) and reads the record back. A deferral is the number ``run`` returns; ``run_generation`` (the
arq task) turns it into ``arq.worker.Retry``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from arq.worker import Retry
from redis.asyncio import Redis

from producer import arq_wire, transitions
from producer.models import JobRecord, utcnow
from producer.pricing import cost_usd
from producer.queue import FlexQueue
from producer.request import GenerateRequest
from producer.status import Outcome, Status, Tier
from tests.conftest import API_KEY, make_settings
from tests.fakes import (
    USAGE,
    ScriptedGemini,
    Step,
    answer,
    client_error,
    overloaded,
    rate_limited,
    server_error,
)
from tests.helpers import poll
from worker import logs
from worker.flow import FlowConfig
from worker.flow_store import FlowControl
from worker.gemini import Answer
from worker.runner import MIN_ATTEMPT_TIMEOUT_S, Runner
from worker.runtime import run_generation

MODEL = "gemini-2.5-flash"
WORKER = "test-host:1:aaaaaa"
RAND = 0.5  # every jittered delay is half its ceiling


def make_runner(
    queue: FlexQueue, gemini: Any, *, flow: FlowControl | None = None, name: str = WORKER, **settings: Any
) -> Runner:
    return Runner(
        store=queue.store, gemini=gemini, settings=make_settings(**settings), worker_name=name,
        rand=lambda: RAND, flow=flow,
    )


async def enqueue(queue: FlexQueue, job_id: str = "j1", prompt: str = "Hi", **kw: Any) -> JobRecord:
    done = await queue.enqueue({"model": MODEL, "prompt": prompt}, job_id=job_id, **kw)
    assert done.created
    return done.record


async def edit(queue: FlexQueue, job_id: str, step: Callable[[JobRecord], JobRecord]) -> JobRecord:
    def decide(record: JobRecord) -> transitions.Change[None]:
        return transitions.Change(step(record))

    change = await queue.store.update(job_id, decide)
    assert change is not None
    return change.record


def past_deadline(record: JobRecord) -> JobRecord:
    return record.model_copy(update={"deadline_at": utcnow() - timedelta(seconds=1)})


def opened_by(worker: str) -> Callable[[JobRecord], JobRecord]:
    """Open an attempt as another (now dead or frozen) worker would have."""

    def step(record: JobRecord) -> JobRecord:
        return transitions.begin_attempt(record, tier=record.next_tier, worker=worker, now=utcnow())

    return step


def held(gate: asyncio.Event, then: Answer | BaseException) -> Step:
    """A call that waits for ``gate`` (a call in flight), then answers or raises ``then``."""

    async def step(_request: GenerateRequest, _tier: Tier) -> Answer:
        await gate.wait()
        if isinstance(then, BaseException):
            raise then
        return then

    return step


async def calls_reached(gemini: ScriptedGemini, count: int) -> None:
    async def check() -> bool | None:
        return True if len(gemini.calls) >= count else None

    await poll(check, timeout_s=5, what=f"{count} Gemini call(s)")


async def no_sleep(*_args: Any, **_kw: Any) -> None:
    raise AssertionError("the retry path must not sleep: a deferral is arq's Retry(defer=...)")


# -- success -------------------------------------------------------------------------------------


async def test_success_stores_result_and_attempt_history(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue, prompt="Say hello")
    gemini = ScriptedGemini.of(answer("Hello there"))
    runner = make_runner(fake_queue, gemini)
    assert await runner.run("j1") is None  # done: nothing to defer
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and record.error is None
    assert record.result is not None
    assert record.result.text == "Hello there" and record.result.finish_reason == "STOP"
    assert record.result.usage == USAGE and record.result.model_version == "gemini-2.5-flash-001"
    assert record.result.tier == "flex"
    [attempt] = record.attempts
    assert attempt.number == 1 and attempt.tier == Tier.FLEX and attempt.served_tier == "flex"
    assert attempt.outcome == Outcome.OK and attempt.http_status == 200 and attempt.error is None
    assert attempt.usage == USAGE and attempt.retry_in_s is None and attempt.worker == WORKER
    assert attempt.finished_at is not None and attempt.latency_ms is not None and attempt.latency_ms >= 0
    assert record.cost_usd == cost_usd(MODEL, USAGE, Tier.FLEX) and record.cost_usd is not None
    assert record.standard_cost_usd == cost_usd(MODEL, USAGE, Tier.STANDARD)
    assert record.standard_cost_usd is not None and record.standard_cost_usd > record.cost_usd
    assert [(c.request.prompt, c.tier) for c in gemini.calls] == [("Say hello", Tier.FLEX)]
    assert runner.leases == set()  # the lease is dropped once the attempt is recorded


async def test_success_feeds_the_queue_counters(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await make_runner(fake_queue, ScriptedGemini.of(answer())).run("j1")
    stats = await fake_queue.stats()
    assert stats["jobs"]["succeeded"] == 1 and stats["jobs"]["queued"] == 0
    assert stats["attempts"]["by_outcome"] == {"ok": 1}
    assert stats["tokens"]["flex"] == {"prompt": 100, "output": 20, "thoughts": 30}
    assert stats["latency_ms"]["samples"] == 1
    assert stats["cost"]["spent_usd"] == pytest.approx(cost_usd(MODEL, USAGE, Tier.FLEX), abs=1e-6)  # rounded


async def test_answer_without_served_tier_records_the_requested_one(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await make_runner(fake_queue, ScriptedGemini.of(answer(served_tier=None))).run("j1")
    record = await fake_queue.get("j1")
    assert record.result is not None and record.result.tier == "flex"
    assert record.attempts[0].served_tier is None


async def test_unknown_model_succeeds_with_unknown_cost(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue({"model": "my-tuned-model", "prompt": "Hi"}, job_id="j1")
    await make_runner(fake_queue, ScriptedGemini.of(answer())).run("j1")
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED
    assert record.cost_usd is None and record.standard_cost_usd is None
    assert (await fake_queue.stats())["cost"]["jobs_with_unknown_cost"] == 1


@pytest.mark.parametrize(
    ("request_timeout_s", "deadline_s", "low", "high"),
    [
        pytest.param(900.0, 30.0, 25.0, 30.0, id="capped-by-the-time-left"),
        pytest.param(5.0, 3600.0, 5.0, 5.0, id="the-request-timeout"),
        pytest.param(900.0, 0.3, MIN_ATTEMPT_TIMEOUT_S, MIN_ATTEMPT_TIMEOUT_S, id="at-least-the-minimum"),
    ],
)
async def test_attempt_timeout(
    fake_queue: FlexQueue, request_timeout_s: float, deadline_s: float, low: float, high: float
) -> None:
    await enqueue(fake_queue, deadline_s=deadline_s)
    gemini = ScriptedGemini.of(answer())
    await make_runner(fake_queue, gemini, request_timeout_s=request_timeout_s).run("j1")
    [call] = gemini.calls
    assert low <= call.timeout_s <= high


async def test_lease_is_held_during_the_call(fake_queue: FlexQueue, fake_redis: Redis) -> None:
    await enqueue(fake_queue)
    in_progress = arq_wire.in_progress_key("j1")
    await fake_redis.set(in_progress, b"1", px=960_000)  # as arq sets it: for the whole job timeout
    seen: dict[str, Any] = {}
    runner: Runner

    async def look(_request: GenerateRequest, _tier: Tier) -> Answer:
        seen["leases"] = set(runner.leases)
        seen["pttl"] = await fake_redis.pttl(in_progress)
        seen["status"] = (await fake_queue.get("j1")).status
        return answer()

    runner = make_runner(fake_queue, ScriptedGemini.of(look), lease_s=5.0)
    await runner.run("j1")
    assert seen["leases"] == {"j1"} and seen["status"] == Status.RUNNING
    assert 0 < seen["pttl"] <= 5_000  # the short lease, not arq's job timeout
    assert runner.leases == set()


# -- retryable failures: deferral, never a sleep ----------------------------------------------------


async def test_503_defers_with_growing_backoff_and_no_sleep(
    fake_queue: FlexQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enqueue(fake_queue)
    gemini = ScriptedGemini.of(overloaded(), overloaded(), answer("finally"))
    runner = make_runner(fake_queue, gemini, retry_base_s=0.2, retry_max_s=10.0)
    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    first = await runner.run("j1")
    record = await fake_queue.get("j1")
    assert first == pytest.approx(RAND * 0.2)  # full jitter in [0, base]
    assert record.status == Status.RETRYING and record.next_tier == Tier.FLEX
    attempt = record.attempts[0]
    assert attempt.outcome == Outcome.OVERLOADED and attempt.http_status == 503
    assert attempt.error is not None and attempt.error.startswith("503 UNAVAILABLE")
    assert attempt.retry_in_s == first and attempt.served_tier is None and attempt.usage is None
    second = await runner.run("j1")
    assert second == pytest.approx(RAND * 0.4)  # the ceiling doubled
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and record.result is not None and record.result.text == "finally"
    assert [a.number for a in record.attempts] == [1, 2, 3]
    assert [a.outcome for a in record.attempts] == [Outcome.OVERLOADED, Outcome.OVERLOADED, Outcome.OK]
    assert [a.retry_in_s for a in record.attempts] == [first, second, None]
    assert (await fake_queue.stats())["attempts"]["by_outcome"] == {"overloaded": 2, "ok": 1}


async def test_run_generation_raises_arq_retry_with_the_deferral(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    gemini = ScriptedGemini.of(overloaded(), answer())
    ctx: dict[str, Any] = {"flexq_runner": make_runner(fake_queue, gemini, retry_base_s=0.2)}
    with pytest.raises(Retry) as raised:
        await run_generation(ctx, "j1")
    assert raised.value.defer_score == round(RAND * 0.2 * 1000)  # arq's deferral, in ms
    assert await run_generation(ctx, "j1") is None
    assert (await fake_queue.get("j1")).status == Status.SUCCEEDED


async def test_run_generation_refuses_a_malformed_argument(fake_queue: FlexQueue) -> None:
    gemini = ScriptedGemini.of()
    ctx: dict[str, Any] = {"flexq_runner": make_runner(fake_queue, gemini)}
    assert await run_generation(ctx, {"not": "an id"}) is None  # type: ignore[arg-type]
    assert gemini.calls == []


async def test_429_retry_delay_is_honoured(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    runner = make_runner(fake_queue, ScriptedGemini.of(rate_limited("7s")), retry_base_s=0.2, retry_max_s=1.0)
    delay = await runner.run("j1")
    assert delay == 8.0  # retryDelay 7 s + 1 s margin (truncation), above the 1 s backoff cap
    record = await fake_queue.get("j1")
    attempt = record.attempts[0]
    assert record.status == Status.RETRYING
    assert attempt.outcome == Outcome.RATE_LIMITED and attempt.http_status == 429 and attempt.retry_in_s == 8.0


async def test_daily_quota_429_waits_an_hour_and_does_not_escalate(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue, fallback="standard")
    gemini = ScriptedGemini.of(rate_limited("7s", "GenerateRequestsPerDayPerProjectPerModel"))
    delay = await make_runner(fake_queue, gemini, max_flex_attempts=1).run("j1")
    record = await fake_queue.get("j1")
    assert delay is not None and delay >= 3600.0
    assert record.status == Status.RETRYING and record.next_tier == Tier.FLEX  # standard shares the daily quota


@pytest.mark.parametrize(
    ("failure", "outcome", "http_status"),
    [
        pytest.param(server_error(500), Outcome.SERVER_ERROR, 500, id="500"),
        pytest.param(server_error(504), Outcome.SERVER_ERROR, 504, id="504"),
        pytest.param(TimeoutError(), Outcome.TIMEOUT, None, id="timeout"),
        pytest.param(ConnectionResetError("reset by peer"), Outcome.CONNECTION_ERROR, None, id="reset"),
    ],
)
async def test_other_transient_failures_are_retried(
    fake_queue: FlexQueue, failure: BaseException, outcome: Outcome, http_status: int | None
) -> None:
    await enqueue(fake_queue)
    runner = make_runner(fake_queue, ScriptedGemini.of(failure, answer()), retry_base_s=0.2)
    assert await runner.run("j1") == pytest.approx(RAND * 0.2)
    record = await fake_queue.get("j1")
    assert record.status == Status.RETRYING
    assert (record.attempts[0].outcome, record.attempts[0].http_status) == (outcome, http_status)
    assert await runner.run("j1") is None
    assert (await fake_queue.get("j1")).status == Status.SUCCEEDED


async def test_answer_with_no_candidates_and_no_block_reason_is_retried(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    empty = answer(None, has_candidates=False, finish_reason=None)
    delay = await make_runner(fake_queue, ScriptedGemini.of(empty)).run("j1")
    record = await fake_queue.get("j1")
    assert delay is not None and record.status == Status.RETRYING
    assert record.attempts[0].outcome == Outcome.SERVER_ERROR and record.attempts[0].http_status == 200
    assert record.attempts[0].usage == USAGE  # a 200 reports its usage even when it is not an answer


# -- permanent failures: one attempt --------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "http_status", "in_message"),
    [
        pytest.param(client_error(400, message="Invalid JSON payload"), 400, "400 INVALID_ARGUMENT", id="400"),
        pytest.param(client_error(403, "PERMISSION_DENIED", "no access"), 403, "403 PERMISSION_DENIED", id="403"),
        pytest.param(client_error(404, "NOT_FOUND", "models/x is not found"), 404, "404 NOT_FOUND", id="404"),
        pytest.param(ValueError("a bug in the seam"), None, "unexpected ValueError", id="unexpected-exception"),
    ],
)
async def test_permanent_errors_fail_the_job_at_once(
    fake_queue: FlexQueue, failure: BaseException, http_status: int | None, in_message: str
) -> None:
    await enqueue(fake_queue, fallback="standard")
    gemini = ScriptedGemini.of(failure)
    assert await make_runner(fake_queue, gemini).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.FAILED and record.result is None
    assert record.error is not None and record.error.kind == "client_error"
    assert record.error.http_status == http_status and in_message in record.error.message
    [attempt] = record.attempts
    assert attempt.outcome == Outcome.CLIENT_ERROR and attempt.http_status == http_status
    assert attempt.retry_in_s is None and len(gemini.calls) == 1  # no escalation of a permanent error


@pytest.mark.parametrize(
    ("refusal", "in_message"),
    [
        pytest.param(answer(None, finish_reason="SAFETY"), "finish_reason=SAFETY", id="candidate-safety"),
        pytest.param(answer("partial", finish_reason="RECITATION"), "finish_reason=RECITATION", id="recitation"),
        pytest.param(
            answer(None, finish_reason=None, has_candidates=False, block_reason="PROHIBITED_CONTENT"),
            "prompt blocked: PROHIBITED_CONTENT", id="prompt-blocked",
        ),
    ],
)
async def test_blocked_answer_fails_the_job_with_the_reason(
    fake_queue: FlexQueue, refusal: Answer, in_message: str
) -> None:
    await enqueue(fake_queue)
    assert await make_runner(fake_queue, ScriptedGemini.of(refusal)).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.FAILED and record.result is None and record.cost_usd is None
    assert record.error is not None and record.error.kind == "blocked" and record.error.http_status == 200
    assert in_message in record.error.message
    assert [(a.outcome, a.http_status) for a in record.attempts] == [(Outcome.BLOCKED, 200)]


async def test_max_tokens_is_an_answer(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await make_runner(fake_queue, ScriptedGemini.of(answer(None, finish_reason="MAX_TOKENS"))).run("j1")
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED
    assert record.result is not None and record.result.text is None and record.result.finish_reason == "MAX_TOKENS"


async def test_error_message_is_redacted_and_cut(fake_queue: FlexQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_SECRETS", set())  # this test's secret only, forgotten afterwards
    logs.register_secret(API_KEY)  # as the worker's start-up does
    await enqueue(fake_queue)
    leaky = server_error(500)
    leaky.message = f"upstream said key={API_KEY} " + "x" * 5000
    await make_runner(fake_queue, ScriptedGemini.of(leaky)).run("j1")
    error = (await fake_queue.get("j1")).attempts[0].error
    assert error is not None and API_KEY not in error and "***" in error
    assert len(error) <= 1000


# -- deadline and the standard tier ---------------------------------------------------------------


async def test_deadline_passed_before_the_run_fails_without_a_call(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await edit(fake_queue, "j1", past_deadline)
    gemini = ScriptedGemini.of()
    assert await make_runner(fake_queue, gemini).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.FAILED and record.attempts == []
    assert record.error is not None and record.error.kind == "deadline_exceeded"
    assert gemini.calls == []


async def test_retry_that_would_pass_the_deadline_fails_the_job(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue, deadline_s=20)
    runner = make_runner(fake_queue, ScriptedGemini.of(overloaded()), retry_base_s=100, retry_max_s=100)
    assert await runner.run("j1") is None  # the next retry (in 50 s) would land past the 20 s deadline
    record = await fake_queue.get("j1")
    assert record.status == Status.FAILED
    assert record.error is not None and record.error.kind == "deadline_exceeded"
    assert "would pass the deadline" in record.error.message and record.error.http_status == 503
    assert record.attempts[0].outcome == Outcome.OVERLOADED and record.attempts[0].retry_in_s is None


async def test_success_after_the_deadline_is_kept(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)

    async def slow_answer(_request: GenerateRequest, _tier: Tier) -> Answer:
        await edit(fake_queue, "j1", past_deadline)  # the deadline passes while the call is in flight
        return answer("late but paid for")

    assert await make_runner(fake_queue, ScriptedGemini.of(slow_answer)).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED
    assert record.result is not None and record.result.text == "late but paid for"


async def test_fallback_escalates_to_standard_when_a_flex_retry_would_miss_the_deadline(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue, deadline_s=20, fallback="standard")
    gemini = ScriptedGemini.of(overloaded(), answer("from standard", served_tier="standard"))
    runner = make_runner(fake_queue, gemini, retry_base_s=100, retry_max_s=100)
    assert await runner.run("j1") == 0.0  # escalation runs at once
    record = await fake_queue.get("j1")
    assert record.status == Status.RETRYING and record.next_tier == Tier.STANDARD
    assert record.attempts[0].retry_in_s == 0.0
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert gemini.tiers == [Tier.FLEX, Tier.STANDARD]
    assert record.status == Status.SUCCEEDED
    assert [(a.tier, a.outcome) for a in record.attempts] == [(Tier.FLEX, Outcome.OVERLOADED), (Tier.STANDARD, "ok")]
    assert record.attempts[1].served_tier == "standard"
    assert record.result is not None and record.result.tier == "standard"
    assert record.cost_usd == record.standard_cost_usd == cost_usd(MODEL, USAGE, Tier.STANDARD)


async def test_max_flex_attempts_escalates_and_standard_has_its_own_backoff(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue, fallback="standard")
    gemini = ScriptedGemini.of(overloaded(), overloaded(), overloaded(), answer(served_tier="standard"))
    runner = make_runner(fake_queue, gemini, max_flex_attempts=2, retry_base_s=0.2, retry_max_s=10)
    assert await runner.run("j1") == pytest.approx(RAND * 0.2)
    assert await runner.run("j1") == 0.0  # second flex attempt: escalate
    assert await runner.run("j1") == pytest.approx(RAND * 0.2)  # first standard failure: backoff starts over
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert gemini.tiers == [Tier.FLEX, Tier.FLEX, Tier.STANDARD, Tier.STANDARD]
    assert record.status == Status.SUCCEEDED and record.result is not None and record.result.tier == "standard"


async def test_without_fallback_the_job_stays_on_flex(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    gemini = ScriptedGemini.of(overloaded(), answer())
    runner = make_runner(fake_queue, gemini, max_flex_attempts=1, retry_base_s=0.2)
    assert await runner.run("j1") == pytest.approx(RAND * 0.2)
    assert (await fake_queue.get("j1")).next_tier == Tier.FLEX
    await runner.run("j1")
    assert gemini.tiers == [Tier.FLEX, Tier.FLEX]


# -- jobs that must not run ---------------------------------------------------------------------


async def test_cancelled_job_is_not_run(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await fake_queue.cancel("j1")
    gemini = ScriptedGemini.of()
    assert await make_runner(fake_queue, gemini).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.CANCELLED and record.attempts == [] and gemini.calls == []


async def test_cancel_asked_while_its_worker_died_ends_the_job_without_a_call(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await edit(fake_queue, "j1", opened_by("dead-worker"))
    cancelled = await fake_queue.cancel("j1")  # running: only asks (the abort reaches nobody)
    assert cancelled.status == Status.RUNNING and cancelled.cancel_requested
    gemini = ScriptedGemini.of()
    assert await make_runner(fake_queue, gemini).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.CANCELLED and gemini.calls == []
    assert [a.outcome for a in record.attempts] == [Outcome.INTERRUPTED]
    assert record.error is not None and record.error.kind == "cancelled"


async def test_finished_job_is_not_run_again(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    gemini = ScriptedGemini.of(answer())
    runner = make_runner(fake_queue, gemini)
    await runner.run("j1")
    assert await runner.run("j1") is None  # a duplicate arq run of a finished job
    record = await fake_queue.get("j1")
    assert len(gemini.calls) == 1 and len(record.attempts) == 1 and record.status == Status.SUCCEEDED


async def test_missing_record_is_skipped(fake_queue: FlexQueue) -> None:
    gemini = ScriptedGemini.of()
    assert await make_runner(fake_queue, gemini).run("never-enqueued") is None
    assert gemini.calls == []


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(json.dumps({"id": "j1", "status": "queued"}).encode(), id="wrong-shape"),
        pytest.param(b"\x80\x04\x95pickle", id="pickle-bytes"),
    ],
)
async def test_malformed_record_fails_that_job_and_not_the_worker(
    fake_queue: FlexQueue, fake_redis: Redis, raw: bytes
) -> None:
    await enqueue(fake_queue, "bad")
    await enqueue(fake_queue, "good")
    await fake_redis.set(fake_queue.store.keys.record("bad"), raw)
    gemini = ScriptedGemini.of(answer())
    runner = make_runner(fake_queue, gemini)
    assert await runner.run("bad") is None  # no exception reaches arq
    bad = await fake_queue.get("bad")
    assert bad.status == Status.FAILED and bad.request is None
    assert bad.error is not None and bad.error.kind == "invalid_job"
    assert bad.tags["raw_record"] == raw.decode("utf-8", "replace")
    assert await runner.run("good") is None
    assert (await fake_queue.get("good")).status == Status.SUCCEEDED
    assert [c.request.prompt for c in gemini.calls] == ["Hi"]


# -- dead, stopped and frozen workers -------------------------------------------------------------


async def test_dead_workers_open_attempt_is_closed_before_the_next(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await edit(fake_queue, "j1", opened_by("dead-worker"))
    assert await make_runner(fake_queue, ScriptedGemini.of(answer())).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and record.interrupts == 1
    first, second = record.attempts
    assert (first.worker, first.outcome) == ("dead-worker", Outcome.INTERRUPTED)
    assert first.error == "worker died or lost its lease"
    assert (second.worker, second.outcome, second.number) == (WORKER, Outcome.OK, 2)
    assert (await fake_queue.stats())["attempts"]["by_outcome"] == {"interrupted": 1, "ok": 1}


async def test_too_many_interrupts_fail_the_job(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    await edit(fake_queue, "j1", opened_by("dead-worker"))
    gemini = ScriptedGemini.of()
    assert await make_runner(fake_queue, gemini, max_interrupts=1).run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.FAILED and gemini.calls == []
    assert record.error is not None and record.error.kind == "interrupted"


async def test_shutdown_mid_call_records_interrupted_and_requeues(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    gemini = ScriptedGemini.of(held(asyncio.Event(), answer()), answer("second try"))
    runner = make_runner(fake_queue, gemini)
    task = asyncio.create_task(runner.run("j1"))
    await calls_reached(gemini, 1)
    task.cancel()  # what arq does to in-flight tasks on SIGTERM
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await fake_queue.get("j1")
    assert record.status == Status.RETRYING and record.interrupts == 1 and runner.leases == set()
    assert record.attempts[0].outcome == Outcome.INTERRUPTED
    assert record.attempts[0].error == "worker shut down mid-attempt"
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert [a.outcome for a in record.attempts] == [Outcome.INTERRUPTED, Outcome.OK]
    assert record.result is not None and record.result.text == "second try"


async def test_cancel_of_a_running_job_aborts_the_call(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    gemini = ScriptedGemini.of(held(asyncio.Event(), answer()))
    runner = make_runner(fake_queue, gemini)
    task = asyncio.create_task(runner.run("j1"))
    await calls_reached(gemini, 1)
    await fake_queue.cancel("j1")
    task.cancel()  # arq's abort
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await fake_queue.get("j1")
    assert record.status == Status.CANCELLED and record.result is None
    assert [a.outcome for a in record.attempts] == [Outcome.INTERRUPTED]


async def test_a_late_success_wins_over_a_newer_attempt_still_in_flight(fake_queue: FlexQueue) -> None:
    """A paid answer is kept while the job is unfinished: A lost its lease, B took the job over, A's
    call answered first. The job succeeds with A's answer; B's attempt is closed as superseded (and its
    worker asked to abort); B's answer, arriving after the job ended, changes nothing."""
    await enqueue(fake_queue)
    gate_a, gate_b = asyncio.Event(), asyncio.Event()
    gemini_a = ScriptedGemini.of(held(gate_a, answer("late, from A")))
    gemini_b = ScriptedGemini.of(held(gate_b, answer("from B")))
    frozen = make_runner(fake_queue, gemini_a, name="worker-a")
    taker = make_runner(fake_queue, gemini_b, name="worker-b")
    task_a = asyncio.create_task(frozen.run("j1"))
    await calls_reached(gemini_a, 1)
    task_b = asyncio.create_task(taker.run("j1"))  # A's lease lapsed: arq gave the job to B
    await calls_reached(gemini_b, 1)
    gate_a.set()
    assert await task_a is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and record.result is not None and record.result.text == "late, from A"
    assert [(a.worker, a.outcome) for a in record.attempts] == [
        ("worker-a", Outcome.OK), ("worker-b", Outcome.INTERRUPTED)
    ]
    assert "superseded" in (record.attempts[1].error or "")
    assert frozen.disowned == set()  # A's answer was recorded: its arq finish is its own
    gate_b.set()
    assert await task_b is None
    after = await fake_queue.get("j1")
    assert after.result is not None and after.result.text == "late, from A"
    assert after.attempts == record.attempts
    assert taker.disowned == {"j1"}  # B's outcome was not recorded: arq's finish must skip its deletes


async def _newer_attempt_failed(queue: FlexQueue) -> None:
    taker = make_runner(queue, ScriptedGemini.of(overloaded()), name="worker-b")
    assert await taker.run("j1") is not None


async def _recovered_by_the_reconciler(queue: FlexQueue) -> None:
    from worker.lease import repair

    await queue.redis.delete(arq_wire.job_key("j1"))  # arq dropped the job behind flexq's back
    assert await repair(queue.store, "j1")


@pytest.mark.parametrize(
    "take_over",
    [
        pytest.param(_newer_attempt_failed, id="newer-attempt-got-a-503"),
        pytest.param(_recovered_by_the_reconciler, id="reconciler-rescheduled"),
    ],
)
async def test_a_late_success_is_kept_while_the_job_is_unfinished(
    fake_queue: FlexQueue, take_over: Callable[[FlexQueue], Awaitable[None]]
) -> None:
    await enqueue(fake_queue)
    gate = asyncio.Event()
    gemini = ScriptedGemini.of(held(gate, answer("late, but an answer")))
    task = asyncio.create_task(make_runner(fake_queue, gemini, name="worker-a").run("j1"))
    await calls_reached(gemini, 1)
    await take_over(fake_queue)
    before = await fake_queue.get("j1")
    assert before.status == Status.RETRYING and before.open_attempt is None  # unfinished, nobody running it
    gate.set()
    await task
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED
    assert record.result is not None and record.result.text == "late, but an answer"


# -- with shared flow control ---------------------------------------------------------------------


@pytest.fixture
def flow(fake_queue: FlexQueue) -> FlowControl:
    return FlowControl(fake_queue.redis, fake_queue.store.keys, FlowConfig(), worker=WORKER)


async def permits_in_use(queue: FlexQueue, tier: str = "flex") -> int:
    return int(await queue.redis.zcard(queue.store.keys.flow(f"permits:{MODEL}:{tier}")))


async def test_refused_admission_defers_without_an_attempt(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    await flow.pause(MODEL, until_s=time.time() + 100, reason="test pause")
    gemini = ScriptedGemini.of()
    delay = await make_runner(fake_queue, gemini, flow=flow).run("j1")
    assert delay is not None and 90 < delay < 120  # the pause, plus up to 10% jitter and a short poll
    record = await fake_queue.get("j1")
    assert record.status == Status.QUEUED and record.attempts == [] and gemini.calls == []


async def test_permit_is_returned_after_each_attempt(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    seen: list[int] = []

    async def look(_request: GenerateRequest, _tier: Tier) -> Answer:
        seen.append(await permits_in_use(fake_queue))
        return answer()

    runner = make_runner(fake_queue, ScriptedGemini.of(look), flow=flow)
    assert await runner.run("j1") is None
    assert seen == [1]
    assert await permits_in_use(fake_queue) == 0 and flow.held == {}
    assert (await fake_queue.get("j1")).status == Status.SUCCEEDED


async def test_503_under_flow_control_takes_the_short_shed_backoff(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    runner = make_runner(fake_queue, ScriptedGemini.of(overloaded()), flow=flow, retry_base_s=5.0, retry_max_s=600)
    delay = await runner.run("j1")
    assert delay == pytest.approx(RAND * FlowConfig().shed_backoff_base_s)  # not RAND * 5 s
    assert (await fake_queue.get("j1")).attempts[0].retry_in_s == delay
    assert await permits_in_use(fake_queue) == 0


async def test_a_429_pauses_the_model_for_the_next_job(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue, "first")
    await enqueue(fake_queue, "second")
    gemini = ScriptedGemini.of(rate_limited("7s"))
    runner = make_runner(fake_queue, gemini, flow=flow)
    assert await runner.run("first") == 8.0
    delay = await runner.run("second")
    assert delay is not None and delay >= 7.0  # deferred by the model's pause, without a call
    assert len(gemini.calls) == 1 and (await fake_queue.get("second")).attempts == []


async def test_cancelled_call_returns_its_permit(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    gemini = ScriptedGemini.of(held(asyncio.Event(), answer()))
    task = asyncio.create_task(make_runner(fake_queue, gemini, flow=flow).run("j1"))
    await calls_reached(gemini, 1)
    assert await permits_in_use(fake_queue) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await permits_in_use(fake_queue) == 0 and flow.held == {}
    assert (await fake_queue.get("j1")).status == Status.RETRYING


async def test_job_that_will_not_call_takes_no_permit(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    await edit(fake_queue, "j1", past_deadline)
    assert await make_runner(fake_queue, ScriptedGemini.of(), flow=flow).run("j1") is None
    assert (await fake_queue.get("j1")).status == Status.FAILED
    assert await permits_in_use(fake_queue) == 0 and flow.held == {}


# -- flow control's scripts carrying the record's writes -------------------------------------------


def tag_it(record: JobRecord) -> transitions.Change[None]:
    return transitions.Change(record.model_copy(update={"tags": {**record.tags, "seen": "1"}}))


async def test_an_acquire_carries_the_opening_only_when_it_admits(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    raw = await fake_queue.store.get_raw("j1")
    await flow.pause(MODEL, until_s=time.time() + 100, reason="test pause")
    refused = await flow.acquire("j1", MODEL, "flex", 10, write=fake_queue.store.prepare("j1", tag_it, raw))
    assert not refused.admitted and refused.written == 0
    assert (await fake_queue.get("j1")).tags == {}  # not written
    await flow.resume(MODEL)
    admitted = await flow.acquire("j1", MODEL, "flex", 10, write=fake_queue.store.prepare("j1", tag_it, raw))
    assert admitted.admitted and admitted.written == 1
    assert (await fake_queue.get("j1")).tags == {"seen": "1"} and await permits_in_use(fake_queue) == 1


async def test_a_write_decided_from_old_text_is_not_applied(fake_queue: FlexQueue, flow: FlowControl) -> None:
    """Acquire and release still do their own work; the record, changed meanwhile, is left alone."""
    await enqueue(fake_queue)
    stale = await fake_queue.store.get_raw("j1")
    await edit(fake_queue, "j1", lambda r: r.model_copy(update={"tags": {"other": "writer"}}))
    admission = await flow.acquire("j1", MODEL, "flex", 10, write=fake_queue.store.prepare("j1", tag_it, stale))
    assert admission.admitted and admission.written == 0 and await permits_in_use(fake_queue) == 1
    learned = await flow.release(admission.permit, "ok", write=fake_queue.store.prepare("j1", tag_it, stale))
    assert learned is not None and learned.written == 0 and await permits_in_use(fake_queue) == 0
    assert (await fake_queue.get("j1")).tags == {"other": "writer"}


async def test_a_release_carries_the_outcome_in_the_same_call(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    admission = await flow.acquire("j1", MODEL, "flex", 10)
    raw = await fake_queue.store.get_raw("j1")
    learned = await flow.release(admission.permit, "ok", write=fake_queue.store.prepare("j1", tag_it, raw))
    assert learned is not None and learned.written == 1
    assert await permits_in_use(fake_queue) == 0 and (await fake_queue.get("j1")).tags == {"seen": "1"}


async def test_a_write_to_a_record_gone_says_so(fake_queue: FlexQueue, flow: FlowControl) -> None:
    await enqueue(fake_queue)
    raw = await fake_queue.store.get_raw("j1")
    await fake_queue.redis.delete(fake_queue.store.keys.record("j1"))
    admission = await flow.acquire("j1", MODEL, "flex", 10, write=fake_queue.store.prepare("j1", tag_it, raw))
    assert admission.admitted and admission.written == -1


async def test_a_claimed_run_whose_record_was_cancelled_meanwhile_gives_its_permit_back(
    fake_queue: FlexQueue, flow: FlowControl
) -> None:
    """The worker read the record as it claimed the job; a cancel came before the attempt's opening
    (carried by the acquire) was written: the write is refused, the record read again, nothing runs."""
    await enqueue(fake_queue)
    stale = await fake_queue.store.get_raw("j1")
    await fake_queue.cancel("j1")
    gemini = ScriptedGemini.of()
    runner = make_runner(fake_queue, gemini, flow=flow)
    assert await runner.run("j1", raw=stale, claimed=True) is None
    assert gemini.calls == [] and (await fake_queue.get("j1")).status == Status.CANCELLED
    assert await permits_in_use(fake_queue) == 0 and flow.held == {}


async def test_a_claimed_run_with_flow_control_opens_and_closes_in_the_flow_calls(
    fake_queue: FlexQueue, flow: FlowControl
) -> None:
    """One acquire (opening the attempt) and one release (recording the outcome): no other record write."""
    await enqueue(fake_queue)
    raw = await fake_queue.store.get_raw("j1")
    runner = make_runner(fake_queue, ScriptedGemini.of(answer()), flow=flow)
    writes: list[str] = []
    update = fake_queue.store.update

    async def counted(*args: Any, **kwargs: Any) -> Any:
        writes.append(args[0])
        return await update(*args, **kwargs)

    fake_queue.store.update = counted  # type: ignore[method-assign]
    assert await runner.run("j1", raw=raw, claimed=True) is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and len(record.attempts) == 1 and writes == []
    assert await permits_in_use(fake_queue) == 0 and runner.arq_ended == {"j1"}
    assert await fake_queue.redis.zscore(arq_wire.queue_key("flexq-test"), "j1") is None  # the run ended
