"""Pure bookkeeping on job records: every status change, with no I/O.

Each function returns a new record and leaves its argument untouched (copying only what it
changes). ``Change`` is what a caller hands the store: the new record, what the caller decided (the
store gives it back), and the side effects the change implies (arq scheduling, counters), as data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from producer.errors import InvalidRequestError
from producer.models import Attempt, BatchRef, JobError, JobRecord, JobResult, Usage
from producer.request import GenerateRequest
from producer.status import ACTIVE, Fallback, Outcome, Status, Tier

#: Longest deadline a job may have (30 days): past that, a record would outlive any sane retention.
MAX_DEADLINE_S = 30 * 24 * 3600.0

T = TypeVar("T")


@dataclass(frozen=True)
class Cost:
    """What one successful call cost, for the queue's counters."""

    tier: str
    usd: float | None  # None: the model's price is unknown
    standard_usd: float | None
    model: str | None = None  # named in the counters when its price is unknown
    channel: str | None = None  # the channel that answered (FLEXQ_CHANNELS), counted per channel


@dataclass(frozen=True)
class Change(Generic[T]):
    """A record's next state and what must happen with it, in the same transaction."""

    record: JobRecord
    decided: T | None = None  # what the caller decided; the store returns it
    run_in_s: float | None = None  # (re)create the arq job to run after this many seconds
    drop_arq_job: bool = False  # the job will not run again: remove its arq job
    abort: bool = False  # ask the worker running it to cancel the call
    lease_s: float | None = None  # hold the open attempt's lease this long
    #: the worker running the job ends its arq run in this write, not in arq's own finish (the job will
    #: not run again: its arq job, queue entry and in-progress key go with it)
    end_run: bool = False
    counted: tuple[Attempt, ...] = ()  # closed attempts to add to the queue's counters
    cost: Cost | None = None
    written: str | None = None  # the record's text as the store wrote it (set by the store)


def check_deadline_s(deadline_s: Any) -> float:
    """A job's deadline in seconds from now: a finite number in (0, 30 days]; the error names the field."""
    ok = isinstance(deadline_s, int | float) and not isinstance(deadline_s, bool)
    if not ok or not math.isfinite(deadline_s) or not 0 < deadline_s <= MAX_DEADLINE_S:
        raise InvalidRequestError(
            f"deadline_s: must be a number of seconds in (0, {MAX_DEADLINE_S:g}]", field="deadline_s"
        )
    return float(deadline_s)


def _copy(record: JobRecord, **changes: Any) -> JobRecord:
    """A copy that shares only what nobody mutates: the frozen request and the earlier attempts
    (the latest one, and the tags, are copied: a caller holding the old record may change them)."""
    if "attempts" not in changes:
        attempts = list(record.attempts)
        if attempts:
            attempts[-1] = attempts[-1].model_copy()
        changes["attempts"] = attempts
    changes.setdefault("tags", dict(record.tags))
    return record.model_copy(update=changes)


def new_record(
    job_id: str, request: GenerateRequest, *, now: datetime, deadline_s: float, fallback: Fallback,
    tags: dict[str, str], parent_id: str | None = None, cache: bool = False, tier: Tier = Tier.FLEX,
    channels: list[str] | None = None,
) -> JobRecord:
    return JobRecord(
        id=job_id, status=Status.QUEUED, created_at=now, updated_at=now, fallback=fallback, tags=dict(tags),
        deadline_at=now + timedelta(seconds=check_deadline_s(deadline_s)), request=request, parent_id=parent_id,
        cache=cache, tier=tier, next_tier=tier, channels=list(channels) if channels is not None else None,
    )


def begin_attempt(
    record: JobRecord, *, tier: Tier, worker: str, now: datetime, channel: str | None = None
) -> JobRecord:
    """Open attempt number ``len(attempts) + 1``; the job is ``running``."""
    if record.open_attempt is not None:
        raise ValueError(f"job {record.id!r} already has attempt {record.open_attempt.number} open")
    attempt = Attempt(number=len(record.attempts) + 1, tier=tier, started_at=now, worker=worker, channel=channel)
    return _copy(record, attempts=[*record.attempts, attempt], status=Status.RUNNING, updated_at=now)


def packed(record: JobRecord, *, ref: BatchRef, now: datetime) -> JobRecord:
    """A ``batch``-tier job was packed into the Batch API job ``ref``: it waits there, ``queued``, no attempt open."""
    return _copy(record, batch=ref, updated_at=now)


def begin_batch_attempt(record: JobRecord, *, ref: BatchRef, worker: str, now: datetime) -> JobRecord:
    """The Batch API job ``ref`` ended: open the job's ``batch`` attempt, started when the batch was created
    and sent through it (``channel``: the batch's name), so that ``close_attempt`` records how it ended.
    The job no longer waits in the batch (``batch`` is cleared: the attempt names it)."""
    begun = begin_attempt(record, tier=Tier.BATCH, worker=worker, now=ref.submitted_at, channel=ref.name)
    return begun.model_copy(update={"batch": None, "updated_at": now})


def close_attempt(
    record: JobRecord, *, number: int, now: datetime, outcome: Outcome, http_status: int | None = None,
    error: str | None = None, served_tier: str | None = None, usage: Usage | None = None,
    retry_in_s: float | None = None,
) -> JobRecord:
    """Record how attempt ``number`` ended. Raises ``ValueError`` if it is not the open attempt."""
    current = record.open_attempt
    if current is None or current.number != number:
        raise ValueError(f"attempt {number} of job {record.id!r} is not the open attempt")
    closed = current.model_copy(update={
        "finished_at": now, "latency_ms": max(0, int((now - current.started_at).total_seconds() * 1000)),
        "outcome": outcome, "http_status": http_status, "error": error, "served_tier": served_tier,
        "usage": usage, "retry_in_s": retry_in_s,
    })
    return _copy(record, attempts=[*record.attempts[:-1], closed], updated_at=now)


def close_late_attempt(
    record: JobRecord, *, number: int, now: datetime, outcome: Outcome, http_status: int | None = None,
    served_tier: str | None = None, usage: Usage | None = None,
) -> JobRecord:
    """Attempt ``number`` was given up on (its worker lost its lease) yet its call answered: a paid
    answer is kept while the job is unfinished. A newer attempt still open is closed as interrupted."""
    if record.open_attempt is not None:
        record = interrupt_open_attempt(record, now=now, reason=f"superseded: attempt {number} answered late")
    attempts = list(record.attempts)
    late = attempts[number - 1]
    attempts[number - 1] = late.model_copy(update={
        "finished_at": now, "latency_ms": max(0, int((now - late.started_at).total_seconds() * 1000)),
        "outcome": outcome, "http_status": http_status, "error": None, "served_tier": served_tier, "usage": usage,
    })
    return _copy(record, attempts=attempts, updated_at=now)


def interrupt_open_attempt(record: JobRecord, *, now: datetime, reason: str) -> JobRecord:
    """Close a dead worker's open attempt as ``interrupted``; the job goes back to ``retrying``."""
    current = record.open_attempt
    if current is None:
        return record
    new = close_attempt(record, number=current.number, now=now, outcome=Outcome.INTERRUPTED, error=reason)
    status = Status.RETRYING if new.status == Status.RUNNING else new.status
    return new.model_copy(update={"interrupts": new.interrupts + 1, "status": status})


def settle(record: JobRecord, *, now: datetime, reason: str, max_interrupts: int | None = None) -> JobRecord:
    """Before a job runs again, and whenever its run stopped without a result: the one rule.

    Cancel the job if a cancel was asked for; else interrupt the open attempt (its worker died, shut
    down or lost its lease: ``reason``), and fail the job if its worker died ``max_interrupts`` times
    mid-attempt or if its deadline has passed. Otherwise the job stays active, no attempt open."""
    if record.terminal:
        return record
    if record.cancel_requested:
        return cancel(record, now=now)  # the open attempt, if any, closes as cancelled
    record = interrupt_open_attempt(record, now=now, reason=reason)
    if max_interrupts is not None and record.interrupts >= max_interrupts:
        return fail(
            record, kind="interrupted", now=now,
            message=f"the job's worker died {record.interrupts} times mid-attempt (FLEXQ_MAX_INTERRUPTS)",
        )
    if now >= record.deadline_at:
        return fail(record, kind="deadline_exceeded", message="deadline passed", now=now)
    return record


def succeed(
    record: JobRecord, *, result: JobResult, now: datetime, cost_usd: float | None = None,
    standard_cost_usd: float | None = None,
) -> JobRecord:
    return _copy(
        record, status=Status.SUCCEEDED, result=result, error=None, updated_at=now,
        cost_usd=_add(record.cost_usd, cost_usd), standard_cost_usd=_add(record.standard_cost_usd, standard_cost_usd),
    )


def answer_from_cache(record: JobRecord, *, result: JobResult, tier: Tier, worker: str, now: datetime) -> JobRecord:
    """The job succeeds with a ``cached`` attempt: no call was made, nothing is paid."""
    attempt = Attempt(
        number=len(record.attempts) + 1, tier=tier, started_at=now, finished_at=now, latency_ms=0,
        outcome=Outcome.CACHED, worker=worker,
    )
    cached = _copy(record, attempts=[*record.attempts, attempt])
    return succeed(cached, result=result, now=now, cost_usd=0.0, standard_cost_usd=0.0)


def _add(total: float | None, extra: float | None) -> float | None:
    if extra is None:
        return total
    return round((total or 0.0) + extra, 10)


def schedule_retry(record: JobRecord, *, next_tier: Tier, now: datetime) -> JobRecord:
    return _copy(record, status=Status.RETRYING, next_tier=next_tier, updated_at=now)


def fail(record: JobRecord, *, kind: str, message: str, now: datetime, http_status: int | None = None) -> JobRecord:
    error = JobError(kind=kind, message=message, http_status=http_status)
    return _copy(record, status=Status.FAILED, error=error, updated_at=now)


def cancel(record: JobRecord, *, now: datetime) -> JobRecord:
    """Cancel a job that is not running (a running one is aborted by its worker instead)."""
    new = interrupt_open_attempt(record, now=now, reason="cancelled") if record.open_attempt else record
    error = JobError(kind="cancelled", message="cancelled on request")
    return _copy(new, status=Status.CANCELLED, cancel_requested=True, error=error, updated_at=now)


def request_cancel(record: JobRecord, *, now: datetime) -> JobRecord:
    return _copy(record, cancel_requested=True, updated_at=now)


def requeue(record: JobRecord, *, now: datetime, deadline_s: float) -> JobRecord:
    """``flexq retry``: run a failed or cancelled job again, keeping its history."""
    if record.status in ACTIVE or record.status == Status.SUCCEEDED:
        raise ValueError(f"only failed or cancelled jobs can be retried, not {record.status}")
    return _copy(
        record, status=Status.QUEUED, error=None, result=None, cancel_requested=False, next_tier=record.tier,
        batch=None, interrupts=0, enqueues=record.enqueues + 1,
        deadline_at=now + timedelta(seconds=check_deadline_s(deadline_s)), updated_at=now,
    )
