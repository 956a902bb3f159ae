"""Pure bookkeeping on job records: every status change, with no I/O.

The store applies these inside a Redis transaction; the tests run them as plain functions.
Each returns a new record and leaves its argument untouched.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from producer.models import (
    ACTIVE,
    Attempt,
    Fallback,
    GenerateRequest,
    JobError,
    JobRecord,
    JobResult,
    Outcome,
    Status,
    Tier,
    Usage,
)


def new_record(
    job_id: str,
    request: GenerateRequest,
    *,
    now: datetime,
    deadline_s: float,
    fallback: Fallback,
    tags: dict[str, str],
) -> JobRecord:
    return JobRecord(
        id=job_id,
        status=Status.QUEUED,
        created_at=now,
        updated_at=now,
        deadline_at=now + timedelta(seconds=deadline_s),
        fallback=fallback,
        tags=dict(tags),
        request=request,
    )


def begin_attempt(record: JobRecord, *, tier: Tier, worker: str, now: datetime) -> JobRecord:
    """Open attempt number ``len(attempts) + 1``; the job is ``running``."""
    if record.open_attempt is not None:
        raise ValueError(f"job {record.id!r} already has attempt {record.open_attempt.number} open")
    new = record.model_copy(deep=True)
    new.attempts.append(Attempt(number=len(record.attempts) + 1, tier=tier, started_at=now, worker=worker))
    new.status = Status.RUNNING
    new.updated_at = now
    return new


def close_attempt(
    record: JobRecord,
    *,
    number: int,
    now: datetime,
    outcome: Outcome,
    http_status: int | None = None,
    error: str | None = None,
    served_tier: str | None = None,
    usage: Usage | None = None,
    retry_in_s: float | None = None,
) -> JobRecord:
    """Record how attempt ``number`` ended. Raises ``ValueError`` if it is not the open attempt."""
    current = record.open_attempt
    if current is None or current.number != number:
        raise ValueError(f"attempt {number} of job {record.id!r} is not the open attempt")
    new = record.model_copy(deep=True)
    attempt = new.attempts[-1]
    attempt.finished_at = now
    attempt.latency_ms = max(0, int((now - attempt.started_at).total_seconds() * 1000))
    attempt.outcome = outcome
    attempt.http_status = http_status
    attempt.error = error
    attempt.served_tier = served_tier
    attempt.usage = usage
    attempt.retry_in_s = retry_in_s
    new.updated_at = now
    return new


def interrupt_open_attempt(record: JobRecord, *, now: datetime, reason: str) -> JobRecord:
    """Close a dead worker's open attempt as ``interrupted``; the job goes back to ``retrying``."""
    current = record.open_attempt
    if current is None:
        return record
    new = close_attempt(record, number=current.number, now=now, outcome=Outcome.INTERRUPTED, error=reason)
    new.interrupts += 1
    if new.status == Status.RUNNING:
        new.status = Status.RETRYING
    return new


def succeed(
    record: JobRecord,
    *,
    result: JobResult,
    now: datetime,
    cost_usd: float | None = None,
    standard_cost_usd: float | None = None,
) -> JobRecord:
    new = record.model_copy(deep=True)
    new.status = Status.SUCCEEDED
    new.result = result
    new.error = None
    new.cost_usd = _add(record.cost_usd, cost_usd)
    new.standard_cost_usd = _add(record.standard_cost_usd, standard_cost_usd)
    new.updated_at = now
    return new


def _add(total: float | None, extra: float | None) -> float | None:
    if extra is None:
        return total
    return round((total or 0.0) + extra, 10)


def schedule_retry(record: JobRecord, *, next_tier: Tier, now: datetime) -> JobRecord:
    new = record.model_copy(deep=True)
    new.status = Status.RETRYING
    new.next_tier = next_tier
    new.updated_at = now
    return new


def fail(record: JobRecord, *, kind: str, message: str, now: datetime, http_status: int | None = None) -> JobRecord:
    new = record.model_copy(deep=True)
    new.status = Status.FAILED
    new.error = JobError(kind=kind, message=message, http_status=http_status)
    new.updated_at = now
    return new


def cancel(record: JobRecord, *, now: datetime) -> JobRecord:
    """Cancel a job that is not running (a running one is aborted by its worker instead)."""
    new = interrupt_open_attempt(record, now=now, reason="cancelled") if record.open_attempt else record
    new = new.model_copy(deep=True)
    new.status = Status.CANCELLED
    new.cancel_requested = True
    new.error = JobError(kind="cancelled", message="cancelled on request")
    new.updated_at = now
    return new


def request_cancel(record: JobRecord, *, now: datetime) -> JobRecord:
    new = record.model_copy(deep=True)
    new.cancel_requested = True
    new.updated_at = now
    return new


def requeue(record: JobRecord, *, now: datetime, deadline_s: float) -> JobRecord:
    """``flexq retry``: run a failed or cancelled job again, keeping its history."""
    if record.status in ACTIVE or record.status == Status.SUCCEEDED:
        raise ValueError(f"only failed or cancelled jobs can be retried, not {record.status}")
    new = record.model_copy(deep=True)
    new.status = Status.QUEUED
    new.error = None
    new.result = None
    new.cancel_requested = False
    new.next_tier = Tier.FLEX
    new.interrupts = 0
    new.enqueues += 1
    new.deadline_at = now + timedelta(seconds=deadline_s)
    new.updated_at = now
    return new
