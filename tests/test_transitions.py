"""producer.transitions: every status change as a pure function on a record, clock passed in."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from producer import transitions
from producer.models import JobRecord, JobResult, Usage
from producer.request import parse_request
from producer.status import Outcome, Status, Tier

T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
REQUEST = parse_request({"model": "gemini-2.5-flash", "prompt": "Hi"}, max_bytes=10_000)
USAGE = Usage(prompt_tokens=10, output_tokens=5, thoughts_tokens=2, total_tokens=17)
RESULT = JobResult(text="Hello", finish_reason="STOP", usage=USAGE, model_version="gemini-2.5-flash", tier="flex")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fresh() -> JobRecord:
    return transitions.new_record("job-1", REQUEST, now=T0, deadline_s=3600, fallback="none", tags={"k": "v"})


def running(number_of_closed: int = 0) -> JobRecord:
    """A record with ``number_of_closed`` closed attempts and one open."""
    record = fresh()
    for n in range(1, number_of_closed + 1):
        record = transitions.begin_attempt(record, tier=Tier.FLEX, worker="w", now=at(n * 10))
        record = transitions.close_attempt(record, number=n, now=at(n * 10 + 1), outcome=Outcome.OVERLOADED)
        record = transitions.schedule_retry(record, next_tier=Tier.FLEX, now=at(n * 10 + 1))
    return transitions.begin_attempt(record, tier=Tier.FLEX, worker="w", now=at(100))


def in_status(status: Status) -> JobRecord:
    record = running()
    now = at(200)
    if status == Status.QUEUED:
        return fresh()
    if status == Status.RUNNING:
        return record
    closed = transitions.close_attempt(record, number=1, now=now, outcome=Outcome.OVERLOADED, http_status=503)
    if status == Status.RETRYING:
        return transitions.schedule_retry(closed, next_tier=Tier.STANDARD, now=now)
    if status == Status.FAILED:
        return transitions.fail(closed, kind="deadline_exceeded", message="deadline passed", now=now)
    if status == Status.SUCCEEDED:
        ok = transitions.close_attempt(record, number=1, now=now, outcome=Outcome.OK, usage=USAGE)
        return transitions.succeed(ok, result=RESULT, now=now, cost_usd=0.1, standard_cost_usd=0.2)
    return transitions.cancel(transitions.schedule_retry(closed, next_tier=Tier.FLEX, now=now), now=now)


# -- new_record ----------------------------------------------------------------------------------


def test_new_record() -> None:
    tags = {"k": "v"}
    record = transitions.new_record("job-1", REQUEST, now=T0, deadline_s=90.5, fallback="standard", tags=tags)
    assert record.status == Status.QUEUED
    assert record.created_at == record.updated_at == T0
    assert record.deadline_at == T0 + timedelta(seconds=90.5)
    assert (record.fallback, record.tags, record.request) == ("standard", {"k": "v"}, REQUEST)
    assert (record.attempts, record.enqueues, record.interrupts, record.next_tier) == ([], 1, 0, Tier.FLEX)
    tags["k"] = "changed"
    assert record.tags == {"k": "v"}


# -- attempts ------------------------------------------------------------------------------------


def test_attempts_are_numbered_from_one() -> None:
    record = fresh()
    for n in (1, 2, 3):
        record = transitions.begin_attempt(record, tier=Tier.FLEX, worker=f"w{n}", now=at(n))
        assert record.status == Status.RUNNING
        assert record.open_attempt is not None
        assert (record.open_attempt.number, record.open_attempt.worker) == (n, f"w{n}")
        record = transitions.close_attempt(record, number=n, now=at(n + 0.25), outcome=Outcome.OVERLOADED)
        assert record.open_attempt is None
    assert [a.number for a in record.attempts] == [1, 2, 3]


def test_begin_while_an_attempt_is_open_raises() -> None:
    with pytest.raises(ValueError, match="already has attempt 1 open"):
        transitions.begin_attempt(running(), tier=Tier.FLEX, worker="w2", now=at(101))


def test_begin_attempt_on_tier() -> None:
    record = transitions.begin_attempt(fresh(), tier=Tier.STANDARD, worker="w", now=at(5))
    assert record.attempts[-1].tier == Tier.STANDARD
    assert record.attempts[-1].started_at == at(5)
    assert record.updated_at == at(5)


def test_close_attempt_records_everything() -> None:
    record = transitions.close_attempt(
        running(), number=1, now=at(101.5), outcome=Outcome.RATE_LIMITED, http_status=429, error="429 quota",
        served_tier="flex", usage=USAGE, retry_in_s=60.0,
    )
    attempt = record.attempts[-1]
    assert attempt.finished_at == at(101.5)
    assert attempt.latency_ms == 1500
    assert (attempt.outcome, attempt.http_status, attempt.error) == (Outcome.RATE_LIMITED, 429, "429 quota")
    assert (attempt.served_tier, attempt.usage, attempt.retry_in_s) == ("flex", USAGE, 60.0)
    assert record.updated_at == at(101.5)
    assert record.status == Status.RUNNING  # closing records the attempt; the decision sets the status


def test_close_attempt_clock_going_backwards_gives_zero_latency() -> None:
    record = transitions.close_attempt(running(), number=1, now=at(50), outcome=Outcome.OK)
    assert record.attempts[-1].latency_ms == 0


@pytest.mark.parametrize(
    ("make", "number"),
    [
        pytest.param(fresh, 1, id="no-attempts"),
        pytest.param(lambda: running(), 2, id="wrong-number"),
        pytest.param(lambda: running(2), 2, id="already-closed-number"),
        pytest.param(lambda: running(), 0, id="zero"),
        pytest.param(
            lambda: transitions.close_attempt(running(), number=1, now=at(101), outcome=Outcome.OK), 1,
            id="closed-twice",
        ),
    ],
)
def test_closing_a_non_open_attempt_raises(make: Callable[[], JobRecord], number: int) -> None:
    with pytest.raises(ValueError, match=f"attempt {number} of job 'job-1' is not the open attempt"):
        transitions.close_attempt(make(), number=number, now=at(300), outcome=Outcome.OK)


# -- interrupt -----------------------------------------------------------------------------------


def test_interrupt_closes_the_open_attempt() -> None:
    record = transitions.interrupt_open_attempt(running(1), now=at(130), reason="lease expired")
    attempt = record.attempts[-1]
    assert (attempt.number, attempt.outcome, attempt.error) == (2, Outcome.INTERRUPTED, "lease expired")
    assert attempt.finished_at == at(130)
    assert record.status == Status.RETRYING
    assert record.interrupts == 1
    again = transitions.begin_attempt(record, tier=Tier.FLEX, worker="w2", now=at(131))
    again = transitions.interrupt_open_attempt(again, now=at(132), reason="lease expired")
    assert again.interrupts == 2
    assert [a.number for a in again.attempts] == [1, 2, 3]


def test_interrupt_without_an_open_attempt_is_a_no_op() -> None:
    record = in_status(Status.RETRYING)
    assert transitions.interrupt_open_attempt(record, now=at(999), reason="x") == record


def test_interrupt_keeps_a_non_running_status() -> None:
    record = running().model_copy(update={"status": Status.RETRYING})
    assert transitions.interrupt_open_attempt(record, now=at(101), reason="x").status == Status.RETRYING


# -- terminal and retry transitions --------------------------------------------------------------


def test_succeed() -> None:
    closed = transitions.close_attempt(running(), number=1, now=at(101), outcome=Outcome.OK, usage=USAGE)
    record = transitions.succeed(closed, result=RESULT, now=at(102), cost_usd=0.1, standard_cost_usd=0.2)
    assert record.status == Status.SUCCEEDED
    assert record.terminal
    assert record.result == RESULT
    assert record.error is None
    assert (record.cost_usd, record.standard_cost_usd) == (0.1, 0.2)
    assert record.updated_at == at(102)


@pytest.mark.parametrize(
    ("before", "extra", "expected"),
    [
        pytest.param(None, None, None, id="unknown-stays-unknown"),
        pytest.param(None, 0.1, 0.1, id="first-cost"),
        pytest.param(0.1, 0.2, 0.3, id="adds-without-float-noise"),
        pytest.param(0.1, None, 0.1, id="unknown-extra-keeps-total"),
        pytest.param(0.0, 0.0, 0.0, id="zero"),
    ],
)
def test_succeed_adds_cost(before: float | None, extra: float | None, expected: float | None) -> None:
    closed = transitions.close_attempt(running(), number=1, now=at(101), outcome=Outcome.OK)
    closed = closed.model_copy(update={"cost_usd": before, "standard_cost_usd": before})
    record = transitions.succeed(closed, result=RESULT, now=at(102), cost_usd=extra, standard_cost_usd=extra)
    assert record.cost_usd == expected
    assert record.standard_cost_usd == expected


@pytest.mark.parametrize("next_tier", [Tier.FLEX, Tier.STANDARD])
def test_schedule_retry(next_tier: Tier) -> None:
    closed = transitions.close_attempt(running(), number=1, now=at(101), outcome=Outcome.OVERLOADED)
    record = transitions.schedule_retry(closed, next_tier=next_tier, now=at(101))
    assert (record.status, record.next_tier, record.updated_at) == (Status.RETRYING, next_tier, at(101))
    assert not record.terminal


def test_fail() -> None:
    closed = transitions.close_attempt(running(), number=1, now=at(101), outcome=Outcome.CLIENT_ERROR)
    record = transitions.fail(closed, kind="client_error", message="400 bad", now=at(102), http_status=400)
    assert record.status == Status.FAILED
    assert record.error is not None
    assert (record.error.kind, record.error.message, record.error.http_status) == ("client_error", "400 bad", 400)
    assert record.terminal


@pytest.mark.parametrize("status", [Status.QUEUED, Status.RETRYING])
def test_cancel_waiting_job(status: Status) -> None:
    before = in_status(status)
    record = transitions.cancel(before, now=at(300))
    assert record.status == Status.CANCELLED
    assert record.cancel_requested is True
    assert record.error is not None
    assert record.error.kind == "cancelled"
    assert record.attempts == before.attempts
    assert record.interrupts == before.interrupts


def test_cancel_with_an_open_attempt_closes_it_as_interrupted() -> None:
    record = transitions.cancel(running(), now=at(300))
    assert record.status == Status.CANCELLED
    assert record.open_attempt is None
    assert record.attempts[-1].outcome == Outcome.INTERRUPTED
    assert record.attempts[-1].error == "cancelled"


def test_request_cancel_keeps_the_job_running() -> None:
    record = transitions.request_cancel(running(), now=at(150))
    assert (record.status, record.cancel_requested, record.updated_at) == (Status.RUNNING, True, at(150))
    assert record.open_attempt is not None


# -- requeue -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [Status.FAILED, Status.CANCELLED])
def test_requeue_keeps_history_and_extends_the_deadline(status: Status) -> None:
    before = in_status(status)
    before = before.model_copy(update={"interrupts": 3, "next_tier": Tier.STANDARD})
    record = transitions.requeue(before, now=at(7200), deadline_s=600)
    assert record.status == Status.QUEUED
    assert record.attempts == before.attempts
    assert len(record.attempts) == 1
    assert record.deadline_at == at(7800)
    assert record.deadline_at > before.deadline_at
    assert (record.error, record.result, record.cancel_requested) == (None, None, False)
    assert (record.next_tier, record.interrupts, record.enqueues) == (Tier.FLEX, 0, 2)
    assert record.created_at == before.created_at
    assert record.updated_at == at(7200)
    again = transitions.begin_attempt(record, tier=Tier.FLEX, worker="w", now=at(7201))
    assert again.attempts[-1].number == 2


@pytest.mark.parametrize("status", [Status.QUEUED, Status.RUNNING, Status.RETRYING, Status.SUCCEEDED])
def test_requeue_refuses_active_and_succeeded(status: Status) -> None:
    with pytest.raises(ValueError, match=f"only failed or cancelled jobs can be retried, not {status}"):
        transitions.requeue(in_status(status), now=at(7200), deadline_s=600)


# -- purity --------------------------------------------------------------------------------------

TRANSITIONS: list[tuple[str, Status, Callable[[JobRecord], JobRecord]]] = [
    ("begin", Status.QUEUED, lambda r: transitions.begin_attempt(r, tier=Tier.FLEX, worker="w", now=at(500))),
    ("close", Status.RUNNING,
     lambda r: transitions.close_attempt(r, number=1, now=at(500), outcome=Outcome.OK, usage=USAGE)),
    ("interrupt", Status.RUNNING, lambda r: transitions.interrupt_open_attempt(r, now=at(500), reason="x")),
    ("succeed", Status.RUNNING,
     lambda r: transitions.succeed(r, result=RESULT, now=at(500), cost_usd=1.0, standard_cost_usd=2.0)),
    ("schedule_retry", Status.RUNNING, lambda r: transitions.schedule_retry(r, next_tier=Tier.STANDARD, now=at(500))),
    ("fail", Status.RUNNING, lambda r: transitions.fail(r, kind="k", message="m", now=at(500))),
    ("cancel-queued", Status.QUEUED, lambda r: transitions.cancel(r, now=at(500))),
    ("cancel-running", Status.RUNNING, lambda r: transitions.cancel(r, now=at(500))),
    ("request_cancel", Status.RUNNING, lambda r: transitions.request_cancel(r, now=at(500))),
    ("requeue", Status.FAILED, lambda r: transitions.requeue(r, now=at(500), deadline_s=60)),
]


@pytest.mark.parametrize(("status", "apply"), [pytest.param(s, f, id=n) for n, s, f in TRANSITIONS])
def test_inputs_are_not_mutated(status: Status, apply: Callable[[JobRecord], JobRecord]) -> None:
    record = in_status(status)
    snapshot = record.to_json()
    new = apply(record)
    assert record.to_json() == snapshot
    assert new is not record
    assert new.to_json() != snapshot
    if record.attempts:
        assert new.attempts[-1] is not record.attempts[-1]
    assert new.tags is not record.tags
