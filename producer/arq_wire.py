"""arq's wire format, in the one module that knows it: its keys, its job envelope, its queue.

flexq writes arq's job keys itself (the envelope arq's own ``enqueue_job`` writes, in JSON) so that
an enqueue is one atomic script and ``flexq retry`` can reuse an id (arq #432). arq's keys carry
fixed global prefixes (``arq:job:``...), so two flexq queues in one Redis database must not share
job ids. Everything else in flexq asks this module for a key or a pipeline step; ``worker.runtime``
is the one module that imports arq itself, and it takes the serializer and names from here.

Never pickle: pickle from Redis is remote code execution. The envelope is
``{"t": try, "f": function, "a": args, "k": kwargs, "et": enqueue_ms}``; flexq's only argument is
the job id, so JSON covers it. A result that is an exception (arq stores those on failure) is
written as ``{"error": "ClassName: message"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

JOB_PREFIX = "arq:job:"
IN_PROGRESS_PREFIX = "arq:in-progress:"
RESULT_PREFIX = "arq:result:"
RETRY_PREFIX = "arq:retry:"
ABORT_SET = "arq:abort"
#: The one arq function every flexq job runs.
FUNCTION = "run_generation"


def queue_key(queue: str) -> str:
    """arq's queue of one flexq queue: a sorted set of job ids scored by run time (epoch ms)."""
    return f"{queue}:arq"


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def in_progress_key(job_id: str) -> str:
    return IN_PROGRESS_PREFIX + job_id


def result_key(job_id: str) -> str:
    return RESULT_PREFIX + job_id


def retry_key(job_id: str) -> str:
    return RETRY_PREFIX + job_id


# -- the envelope ----------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, BaseException):
        return {"error": f"{type(value).__name__}: {value}"}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def serialize(data: dict[str, Any]) -> bytes:
    return json.dumps(data, default=_default, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("arq payload is not a JSON object")
    return value


def job_payload(job_id: str, *, enqueue_ms: int, job_try: int | None = None) -> bytes:
    """The arq job envelope for one flexq job, as arq's own ``serialize_job`` would write it."""
    return serialize({"t": job_try, "f": FUNCTION, "a": [job_id], "k": {}, "et": enqueue_ms})


# -- pipeline steps (inside a caller's pipeline or transaction) ------------------------------------


def schedule(pipe: Any, queue: str, job_id: str, *, now_ms: int, delay_ms: int, job_ttl_ms: int) -> None:
    """(Re)create the arq job to run ``delay_ms`` from now, clearing what an earlier run left."""
    pipe.delete(result_key(job_id), retry_key(job_id), in_progress_key(job_id))
    pipe.zrem(ABORT_SET, job_id)
    pipe.set(job_key(job_id), job_payload(job_id, enqueue_ms=now_ms), px=job_ttl_ms)
    pipe.zadd(queue_key(queue), {job_id: now_ms + delay_ms})


def wake(pipe: Any, queue: str, job_id: str, *, now_ms: int) -> None:
    """Make a deferred arq job due now (only if it is queued: a running one is left alone)."""
    pipe.zadd(queue_key(queue), {job_id: now_ms}, xx=True)


def unschedule(pipe: Any, queue: str, job_id: str) -> None:
    pipe.delete(job_key(job_id), retry_key(job_id))
    pipe.zrem(queue_key(queue), job_id)


def end_run(pipe: Any, queue: str, job_id: str) -> None:
    """What arq's own finish of a job's last run does, for a worker that ends the run in its record's
    write: the arq job, its retry count, abort request, queue entry and in-progress key removed."""
    pipe.delete(in_progress_key(job_id), retry_key(job_id), job_key(job_id))
    pipe.zrem(ABORT_SET, job_id)
    pipe.zrem(queue_key(queue), job_id)


def request_abort(pipe: Any, job_id: str, *, now_ms: int) -> None:
    """Ask the worker running ``job_id`` to cancel it (``allow_abort_jobs`` is on)."""
    pipe.zadd(ABORT_SET, {job_id: now_ms})


def hold_leases(pipe: Any, job_ids: Iterable[str], *, ttl_ms: int) -> None:
    """Keep arq's in-progress key of each running job alive for ``ttl_ms`` (flexq's short lease)."""
    for job_id in job_ids:
        pipe.pexpire(in_progress_key(job_id), ttl_ms)


def job_exists(pipe: Any, job_id: str) -> None:
    """Queue an EXISTS of the arq job: does arq still hold a job to run for this id?"""
    pipe.exists(job_key(job_id))


def enqueue_keys(queue: str, job_id: str) -> list[str]:
    """The arq keys the enqueue script writes or clears, in its KEYS order (3 to 7)."""
    return [job_key(job_id), queue_key(queue), result_key(job_id), retry_key(job_id), ABORT_SET]
