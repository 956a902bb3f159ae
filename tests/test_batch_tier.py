"""The ``batch`` tier (worker/batch_tier.py): truth tables of its pure helpers, then end to end: an
in-process arq worker (the real ``flexq worker`` build, a BatchTier added at start-up), real Redis, the
real google-genai SDK and the simulator's Batch and Files APIs. Waits have deadlines, never bare sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.genai import types
from redis.exceptions import ConnectionError as RedisConnectionError

from producer import transitions
from producer.models import Attempt, BatchRef, JobRecord
from producer.pricing import cost_usd
from producer.queue import FlexQueue
from producer.request import GenerateRequest
from producer.status import Outcome, Status, Tier
from producer.store import JobStore
from simulator import RunningSimulator, SimConfig, start_simulator
from tests.conftest import make_settings
from tests.helpers import poll, wait_all
from worker import runtime
from worker.batch_tier import (
    EXPIRED,
    FAILED,
    GONE,
    INLINE_LIMIT_BYTES,
    MEMBER_POLL_CAP_S,
    BatchInfo,
    BatchTier,
    batch_of,
    batch_verdict,
    entry_http_status,
    entry_verdict,
    inlined_request,
    pack_defer_s,
    packable,
    parse_pointer,
    parse_responses,
    poll_defer_s,
    waiting_in,
)
from worker.config import WorkerConfig
from worker.gemini import sdk_call_args
from worker.runner import Runner

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)

MODEL = "gemini-2.5-flash"
T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
NAME = "batches/abc123"


def record(**changes: Any) -> JobRecord:
    base = transitions.new_record(
        "j1", GenerateRequest(model=MODEL, prompt="hi"), now=T0, deadline_s=3600, fallback="none", tags={},
        tier=Tier.BATCH,
    )
    return base.model_copy(update=changes)


REF = BatchRef(name=NAME, submitted_at=T0 + timedelta(seconds=5), channel="default")


# -- truth tables ---------------------------------------------------------------------------------


def test_batch_of_names_the_batch_a_job_waits_in() -> None:
    assert batch_of(record()) is None
    assert batch_of(record(batch=REF)) == NAME
    opened = transitions.begin_batch_attempt(record(batch=REF), ref=REF, worker="w", now=T0)
    assert opened.batch is None and batch_of(opened) == NAME  # a crash left the batch's attempt open
    flex_open = transitions.begin_attempt(record(next_tier=Tier.FLEX), tier=Tier.FLEX, worker="w", now=T0)
    assert batch_of(flex_open) is None


@pytest.mark.parametrize(
    ("changes", "model", "now", "expected"),
    [
        ({}, MODEL, T0, True),
        ({}, f"models/{MODEL}", T0, False),  # the pending set's model has no prefix
        ({}, "gemini-2.5-pro", T0, False),
        ({}, MODEL, T0 + timedelta(hours=2), False),  # past its deadline
        ({"batch": REF}, MODEL, T0, False),  # packed already
        ({"cancel_requested": True}, MODEL, T0, False),
        ({"status": Status.CANCELLED}, MODEL, T0, False),
        ({"next_tier": Tier.FLEX}, MODEL, T0, False),  # moved on to flex
        ({"request": None}, MODEL, T0, False),
    ],
)
def test_packable(changes: dict[str, Any], model: str, now: datetime, expected: bool) -> None:
    assert packable(record(**changes), model, now) is expected


def test_packable_with_a_models_prefix_in_the_request() -> None:
    prefixed = record(request=GenerateRequest(model=f"models/{MODEL}", prompt="hi"))
    assert packable(prefixed, MODEL, T0)


@pytest.mark.parametrize(
    ("changes", "name", "enqueues", "expected"),
    [
        ({"batch": REF}, NAME, 1, True),
        ({"batch": None}, NAME, 1, True),  # a crash before its record said so: its pointer/hash do
        ({"batch": REF}, "batches/other", 1, False),
        ({"batch": REF}, NAME, 2, False),  # retried (`flexq retry`) since: not this batch's any more
        ({"batch": REF, "status": Status.SUCCEEDED}, NAME, 1, False),
        ({"batch": REF, "cancel_requested": True}, NAME, 1, False),
        ({"batch": REF, "next_tier": Tier.FLEX}, NAME, 1, False),
        ({"request": None, "batch": REF}, NAME, 1, False),
    ],
)
def test_waiting_in(changes: dict[str, Any], name: str, enqueues: int, expected: bool) -> None:
    assert waiting_in(record(**changes), name, enqueues) is expected


def test_waiting_in_with_an_open_attempt() -> None:
    opened = transitions.begin_batch_attempt(record(batch=REF), ref=REF, worker="w", now=T0)
    assert waiting_in(opened, NAME, 1)
    assert not waiting_in(opened, "batches/other", 1)
    flex_open = transitions.begin_attempt(record(), tier=Tier.FLEX, worker="w", now=T0)
    assert not waiting_in(flex_open, NAME, 1)


@pytest.mark.parametrize(
    ("code", "status"),
    [(None, 500), (3, 400), (4, 504), (5, 404), (7, 403), (8, 429), (13, 500), (14, 503), (99, 500), (400, 400),
     (503, 503)],
)
def test_entry_http_status(code: int | None, status: int) -> None:
    assert entry_http_status(code) == status


@pytest.mark.parametrize(
    ("lead", "poll_s", "left_s", "expected"),
    [
        (True, 60.0, 3600.0, 60.0),
        (False, 60.0, 3600.0, 600.0),
        (False, 120.0, 3600.0, MEMBER_POLL_CAP_S),  # capped
        (False, 900.0, 3600.0, 900.0),  # never more often than the lead
        (True, 60.0, 10.0, 10.05),  # never past the deadline
        (False, 60.0, -5.0, 0.05),
    ],
)
def test_poll_defer_s(lead: bool, poll_s: float, left_s: float, expected: float) -> None:
    assert poll_defer_s(lead=lead, poll_s=poll_s, left_s=left_s) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("oldest_s", "now_s", "expected"), [(100.0, 100.0, 60.0), (100.0, 130.0, 30.0), (100.0, 170.0, 0.05)]
)
def test_pack_defer_s(oldest_s: float, now_s: float, expected: float) -> None:
    assert pack_defer_s(oldest_s=oldest_s, now_s=now_s, pack_s=60.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("state", "outcome", "status", "words"),
    [
        (EXPIRED, Outcome.EXPIRED, None, "expired"),
        ("JOB_STATE_CANCELLED", Outcome.EXPIRED, None, "cancelled"),
        (GONE, Outcome.EXPIRED, 404, "gone"),
        (FAILED, Outcome.SERVER_ERROR, None, "failed: boom"),
    ],
)
def test_batch_verdict(state: str, outcome: Outcome, status: int | None, words: str) -> None:
    verdict = batch_verdict(state, NAME, "boom")
    assert (verdict.outcome, verdict.http_status) == (outcome, status)
    assert words in (verdict.message or "") and NAME in (verdict.message or "")


def test_entry_verdict() -> None:
    missing = entry_verdict(None, NAME)
    assert missing is not None and missing.outcome == Outcome.SERVER_ERROR
    answered = types.InlinedResponse(response=types.GenerateContentResponse(candidates=[]))
    assert entry_verdict(answered, NAME) is None
    for code, outcome, status in [(3, Outcome.CLIENT_ERROR, 400), (14, Outcome.OVERLOADED, 503),
                                  (8, Outcome.RATE_LIMITED, 429), (13, Outcome.SERVER_ERROR, 500)]:
        verdict = entry_verdict(types.InlinedResponse(error=types.JobError(code=code, message="no")), NAME)
        assert verdict is not None and (verdict.outcome, verdict.http_status) == (outcome, status)


def test_parse_responses_reads_answers_and_errors_by_key() -> None:
    lines = [
        {"key": "a", "response": {"candidates": [{"content": {"parts": [{"text": "hello"}], "role": "model"},
                                                  "finishReason": "STOP"}],
                                  "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}}},
        {"key": "b", "error": {"code": 3, "message": "bad"}},
        "not json",
        {"no": "key"},
    ]
    data = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode() + b"\n\n"
    found = parse_responses(data)
    assert set(found) == {"a", "b"}
    assert found["a"].response is not None and found["a"].response.text == "hello"
    assert found["a"].response.usage_metadata is not None
    assert found["a"].response.usage_metadata.prompt_token_count == 3
    assert found["b"].error is not None and found["b"].error.code == 3


def test_batch_info_round_trips_through_its_hash() -> None:
    info = BatchInfo(NAME, MODEL, (("a", 1), ("b", 2)), T0, "default", "file")
    raw = {k.encode(): v.encode() for k, v in info.to_hash().items()}
    assert BatchInfo.from_hash(raw) == info
    assert info.lead == "a" and info.ref() == BatchRef(name=NAME, submitted_at=T0, channel="default")
    assert BatchInfo.from_hash({b"name": b"x"}) is None
    assert parse_pointer(json.dumps({"name": NAME, "enqueues": 3})) == (NAME, 3)
    assert parse_pointer(None) is None and parse_pointer(b"garbage") is None


def test_transitions_packed_and_begin_batch_attempt() -> None:
    waiting = transitions.packed(record(), ref=REF, now=T0 + timedelta(seconds=6))
    assert waiting.batch == REF and waiting.status == Status.QUEUED and not waiting.attempts
    assert waiting.updated_at == T0 + timedelta(seconds=6)
    opened = transitions.begin_batch_attempt(waiting, ref=REF, worker="w", now=T0 + timedelta(minutes=5))
    attempt = opened.attempts[-1]
    assert (attempt.tier, attempt.channel, attempt.started_at) == (Tier.BATCH, NAME, REF.submitted_at)
    assert opened.status == Status.RUNNING and opened.batch is None
    assert opened.updated_at == T0 + timedelta(minutes=5)
    assert waiting.batch == REF and not waiting.attempts  # the argument is left as it was


def test_sdk_call_args_and_the_inline_request_carry_no_tier() -> None:
    request = GenerateRequest(model=f"models/{MODEL}", prompt="hi", system_instruction="be brief",
                              config={"temperature": 0.2})
    model, contents, config = sdk_call_args(request)
    assert (model, contents) == (f"models/{MODEL}", "hi")
    assert config.system_instruction == "be brief" and config.temperature == 0.2 and config.service_tier is None
    assert sdk_call_args(request, vertex=True)[0] == MODEL
    inlined = inlined_request("job-1", request)
    assert inlined.metadata == {"key": "job-1"} and inlined.config is not None
    assert inlined.config.service_tier is None and inlined.config.http_options is None


# -- end to end -----------------------------------------------------------------------------------


def batch_settings(redis_url: str, sim: RunningSimulator, **overrides: Any) -> WorkerConfig:
    return make_settings(
        redis_url=redis_url, gemini_base_url=sim.base_url, batch_pack_s=0.3, batch_poll_s=0.2, **overrides
    )


@contextlib.asynccontextmanager
async def batch_worker(
    settings: WorkerConfig, *, inline_limit_bytes: int | None = None, wrap: Callable[[Runner], None] | None = None,
) -> AsyncIterator[Runner]:
    """An in-process arq worker built as ``flexq worker`` builds it, with a BatchTier added at start-up."""
    started: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()

    async def on_startup(ctx: dict[str, Any]) -> None:
        await runtime.startup(ctx)
        runner: Runner = ctx["flexq_runner"]
        runner.batch = BatchTier(ctx["flexq_gemini"].sdk, settings, channel="default",
                                 inline_limit_bytes=inline_limit_bytes or INLINE_LIMIT_BYTES)
        if wrap is not None:
            wrap(runner)
        started.set_result(runner)

    # burst: the worker returns once arq holds no job (every job ended), so no call is cut short at the end
    worker = runtime.create_worker(settings, burst=True, handle_signals=False, on_startup=on_startup,
                                   ctx={"flexq_configure_logs": False})
    task = asyncio.create_task(worker.main())
    try:
        yield await asyncio.wait_for(started, 30)
        await asyncio.wait_for(asyncio.shield(task), 30)
    finally:
        if not task.done():  # the test failed: stop what still runs
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(asyncio.CancelledError):  # a job task cancelled by the stop
            await worker.close()


@pytest.fixture
async def bsim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimConfig(latency_s=0.01, seed=7, batch_turnaround_s=0.6, batch_shuffle=True))
    yield running
    await running.close()


@pytest.fixture
async def queue(redis_url: str, bsim: RunningSimulator) -> AsyncIterator[FlexQueue]:
    q = await FlexQueue.connect(batch_settings(redis_url, bsim))
    yield q
    await q.close()


def sim_outcome(sim: RunningSimulator, **changes: Any) -> None:
    sim.sim.config = sim.sim.config.updated(changes)


async def enqueue(queue: FlexQueue, ids: list[str], **kw: Any) -> None:
    for job_id in ids:
        done = await queue.enqueue({"model": MODEL, "prompt": f"batch job {job_id}"}, job_id=job_id, tier="batch",
                                   **kw)
        assert done.created and done.record.next_tier == Tier.BATCH


def shape(rec: JobRecord) -> list[tuple[str, str | None]]:
    return [(str(a.tier), str(a.outcome) if a.outcome else None) for a in rec.attempts]


def check_batch_answer(rec: JobRecord, attempt: Attempt) -> None:
    assert rec.request is not None and rec.result is not None and attempt.usage is not None
    assert attempt.tier == Tier.BATCH and attempt.outcome == Outcome.OK and attempt.http_status == 200
    assert attempt.channel is not None and attempt.channel.startswith("batches/")
    assert rec.result.text and rec.result.tier == "batch"
    standard = cost_usd(MODEL, attempt.usage, Tier.STANDARD)
    assert standard is not None and rec.standard_cost_usd == pytest.approx(standard)
    assert rec.cost_usd == pytest.approx(standard / 2)  # the Batch API bills half the standard price


@pytest.mark.e2e
@pytest.mark.redis
async def test_batch_jobs_round_trip_through_one_inline_batch(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    ids = [f"b-{n}" for n in range(6)]
    await enqueue(queue, ids)
    async with batch_worker(batch_settings(redis_url, bsim)):
        records = await wait_all(queue, ids, timeout_s=30)
    channels = set()
    for rec in records.values():
        assert rec.status == Status.SUCCEEDED, (rec.id, rec.error, shape(rec))
        assert len(rec.attempts) == 1 and rec.batch is None
        check_batch_answer(rec, rec.attempts[0])
        channels.add(rec.attempts[0].channel)
    assert len(channels) == 1 and bsim.sim.stats.batches_created == 1  # packed together
    (batch,) = bsim.sim.batches.batches.values()
    assert batch.file_name is None and len(batch.items) == 6  # inline
    assert batch.display_name is not None and batch.display_name.startswith("flexq flexq-test gemini-2.5-flash ")
    for item in batch.items:
        assert item.metadata["key"] in ids
        assert "serviceTier" not in json.dumps(item.request)  # the batch is the tier
    assert await queue.store.redis.keys("flexq-test:batch:*") == []  # nothing left behind
    stats = await queue.store.counters()
    assert stats["cost_usd:batch"] == pytest.approx(sum(rec.cost_usd or 0.0 for rec in records.values()))


@pytest.mark.e2e
@pytest.mark.redis
async def test_a_pack_too_large_to_send_inline_goes_through_a_file(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    ids = ["f-1", "f-2", "f-3"]
    await enqueue(queue, ids)
    async with batch_worker(batch_settings(redis_url, bsim), inline_limit_bytes=10):
        records = await wait_all(queue, ids, timeout_s=30)
    for rec in records.values():
        assert rec.status == Status.SUCCEEDED, (rec.id, rec.error, shape(rec))
        check_batch_answer(rec, rec.attempts[0])
    (batch,) = bsim.sim.batches.batches.values()
    assert batch.file_name is not None and batch.file_name.startswith("files/")
    assert sorted(item.key for item in batch.items) == ids
    assert bsim.sim.stats.files_uploaded == 1


@pytest.mark.e2e
@pytest.mark.redis
async def test_an_expired_batch_sends_flex_fallback_jobs_to_flex(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    sim_outcome(bsim, batch_outcome="expired")
    await enqueue(queue, ["x-flex"], fallback="flex")
    await enqueue(queue, ["x-none"])
    async with batch_worker(batch_settings(redis_url, bsim)):
        records = await wait_all(queue, ["x-flex", "x-none"], timeout_s=30)
    moved, failed = records["x-flex"], records["x-none"]
    assert moved.status == Status.SUCCEEDED, (moved.error, shape(moved))
    assert shape(moved) == [("batch", "expired"), ("flex", "ok")]
    assert moved.attempts[0].channel is not None and moved.attempts[0].channel.startswith("batches/")
    assert moved.result is not None and moved.result.tier == "flex" and moved.batch is None
    assert failed.status == Status.FAILED and shape(failed) == [("batch", "expired")]
    assert failed.error is not None and failed.error.kind == "batch_expired"
    assert "expired" in failed.error.message


@pytest.mark.e2e
@pytest.mark.redis
async def test_a_failed_batch_fails_its_jobs_with_the_apis_message(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    sim_outcome(bsim, batch_outcome="failed")
    await enqueue(queue, ["fail-1"])
    async with batch_worker(batch_settings(redis_url, bsim)):
        rec = (await wait_all(queue, ["fail-1"], timeout_s=30))["fail-1"]
    assert rec.status == Status.FAILED and shape(rec) == [("batch", "server_error")]
    assert rec.error is not None and rec.error.kind == "batch_server_error"
    assert "the batch failed" in rec.error.message


@pytest.mark.e2e
@pytest.mark.redis
async def test_error_entries_are_classified_like_the_call_they_stand_for(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    for job_id, directive in [("e400", "[[fault:400]]"), ("e503", "[[fault:503x1]]")]:
        done = await queue.enqueue({"model": MODEL, "prompt": f"{job_id} {directive}"}, job_id=job_id,
                                   tier="batch", fallback="flex")
        assert done.created
    async with batch_worker(batch_settings(redis_url, bsim)):
        records = await wait_all(queue, ["e400", "e503"], timeout_s=30)
    bad, shed = records["e400"], records["e503"]
    assert bad.status == Status.FAILED and shape(bad) == [("batch", "client_error")]
    assert bad.error is not None and bad.error.kind == "client_error" and bad.error.http_status == 400
    assert shed.status == Status.SUCCEEDED and shape(shed) == [("batch", "overloaded"), ("flex", "ok")]
    assert shed.attempts[0].http_status == 503


@pytest.mark.e2e
@pytest.mark.redis
async def test_a_deadline_passing_in_a_batch_ends_the_job(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    sim_outcome(bsim, batch_turnaround_s=60.0)
    await enqueue(queue, ["late"], fallback="flex", deadline_s=2.0)
    async with batch_worker(batch_settings(redis_url, bsim)):
        rec = (await wait_all(queue, ["late"], timeout_s=20))["late"]
    assert rec.status == Status.FAILED and shape(rec) == [("batch", "expired")]
    assert rec.error is not None and rec.error.kind == "deadline_exceeded"
    assert "deadline passed" in (rec.attempts[0].error or "")


@pytest.mark.e2e
@pytest.mark.redis
async def test_an_answer_whose_write_failed_is_recorded_by_a_later_poll(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    """A paid answer is never dropped: the first poll's write for one member fails (Redis went away, say);
    the batch's hash stays, and a later poll records the same answer into the same attempt."""
    ids = ["c-1", "c-2", "c-3"]
    await enqueue(queue, ids)
    failures: list[str] = []

    def wrap(runner: Runner) -> None:
        record_outcome = runner.record_outcome

        async def flaky(job_id: str, *args: Any, **kwargs: Any) -> float | None:
            if job_id == "c-2" and not failures:
                failures.append(job_id)
                raise RedisConnectionError("simulated: Redis went away")
            return await record_outcome(job_id, *args, **kwargs)

        runner.record_outcome = flaky  # type: ignore[method-assign]

    async with batch_worker(batch_settings(redis_url, bsim), wrap=wrap):
        records = await wait_all(queue, ids, timeout_s=30)
        await poll(lambda: _no_batch_keys(queue), timeout_s=10, what="the batch's keys to go")
    assert failures == ["c-2"]
    for rec in records.values():
        assert rec.status == Status.SUCCEEDED, (rec.id, rec.error, shape(rec))
        assert len(rec.attempts) == 1  # the attempt opened by the failed write is the one recorded
        check_batch_answer(rec, rec.attempts[0])
    assert bsim.sim.stats.batches_created == 1  # not sent twice


async def _no_batch_keys(queue: FlexQueue) -> bool | None:
    return True if not await queue.store.redis.keys("flexq-test:batch:*") else None


@pytest.mark.e2e
@pytest.mark.redis
async def test_a_job_packed_before_a_crash_adopts_its_batch_instead_of_a_second_one(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    """A crash between the batch's hash (with the members' pointers) and the member's record update:
    the job's next run adopts the batch from its pointer; it is never packed into another batch."""
    await enqueue(queue, ["crash-1", "crash-2"])

    def wrap(runner: Runner) -> None:
        assert isinstance(runner.batch, BatchTier)
        tier = runner.batch
        mark = tier._mark_packed

        async def crash_for_one(store: JobStore, record: JobRecord, info: BatchInfo, now: datetime) -> None:
            if record.id != "crash-2":
                await mark(store, record, info, now)

        tier._mark_packed = crash_for_one  # type: ignore[method-assign]

    async with batch_worker(batch_settings(redis_url, bsim), wrap=wrap):
        records = await wait_all(queue, ["crash-1", "crash-2"], timeout_s=30)
    for rec in records.values():
        assert rec.status == Status.SUCCEEDED, (rec.id, rec.error, shape(rec))
        check_batch_answer(rec, rec.attempts[0])
    assert bsim.sim.stats.batches_created == 1


@pytest.mark.e2e
@pytest.mark.redis
async def test_a_job_cancelled_while_waiting_is_not_answered(
    redis_url: str, bsim: RunningSimulator, queue: FlexQueue
) -> None:
    sim_outcome(bsim, batch_turnaround_s=1.5)
    await enqueue(queue, ["k-1", "k-2"])
    async with batch_worker(batch_settings(redis_url, bsim)):
        async def packed() -> bool | None:
            rec = await queue.get("k-2")
            return True if rec.batch is not None else None

        await poll(packed, timeout_s=15, what="k-2 to be packed")
        await queue.cancel("k-2")
        records = await wait_all(queue, ["k-1", "k-2"], timeout_s=30)
        await poll(lambda: _no_batch_keys(queue), timeout_s=10, what="the batch's keys to go")
    assert records["k-1"].status == Status.SUCCEEDED
    assert records["k-2"].status == Status.CANCELLED and records["k-2"].result is None
    assert not records["k-2"].attempts
