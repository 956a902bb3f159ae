"""Job records in Redis: create (idempotently), read, update in a transaction, list, count.

Thin I/O only: what a transition *means* lives in ``producer.transitions``; this module writes it,
keeps the per-status index in step, and schedules or unschedules the arq job in the same
transaction. flexq writes arq's job keys itself (the envelope arq's own ``enqueue_job`` writes, in
JSON) so that enqueue is one atomic script and ``flexq retry`` can reuse an id (arq #432).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from producer.errors import InvalidJobError, JobNotFoundError, StoreUnavailableError
from producer.keys import ARQ_ABORT_SET, Keys
from producer.models import TERMINAL, JobError, JobRecord, Outcome, Status, utcnow
from producer.serializer import arq_job_payload

#: How long an arq job key outlives its job's deadline, so a deferred job never expires (arq #320).
ARQ_JOB_GRACE_S = 3600
#: Recent latencies kept for p50/p95.
LATENCY_SAMPLES = 10_000

# KEYS: record, queued index, arq job, arq queue, arq result, arq retry, arq abort set
# ARGV: record json, job id, run-at ms, now s, arq payload, arq job ttl ms, record ttl s
_ENQUEUE_LUA = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
redis.call('DEL', KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[2])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
return false
"""

Mutation = Callable[[JobRecord], JobRecord | None]
OnCommit = Callable[[Pipeline, JobRecord, JobRecord], None]


def epoch_s(moment: datetime) -> float:
    return moment.timestamp()


class JobStore:
    """Reads and writes job records of one queue."""

    def __init__(self, redis: Redis, *, queue: str, retention_s: int) -> None:
        self.redis = redis
        self.keys = Keys(queue)
        self.retention_s = retention_s
        self._enqueue_script = redis.register_script(_ENQUEUE_LUA)

    # -- create -------------------------------------------------------------------------------

    async def create(self, records: Sequence[JobRecord]) -> list[JobRecord | None]:
        """Store new records and schedule their arq jobs, in one round trip.

        For each record: ``None`` if it was created, or the record that already had its id
        (idempotent enqueue: that job is left as it is).
        """
        now = utcnow()
        now_ms = int(now.timestamp() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                keys = self.keys
                ttl_s = self._record_ttl_s(record, now)
                await self._enqueue_script(
                    keys=[
                        keys.record(record.id),
                        keys.index(Status.QUEUED),
                        keys.arq_job(record.id),
                        keys.arq_queue,
                        keys.arq_result(record.id),
                        keys.arq_retry(record.id),
                        ARQ_ABORT_SET,
                    ],
                    args=[
                        record.to_json(),
                        record.id,
                        now_ms,
                        now.timestamp(),
                        arq_job_payload(record.id, enqueue_ms=now_ms),
                        self._arq_ttl_ms(record, now),
                        ttl_s,
                    ],
                    client=pipe,
                )
            try:
                replies = await pipe.execute()
            except RedisError as err:
                raise StoreUnavailableError(f"could not enqueue: {type(err).__name__}: {err}") from err
        out: list[JobRecord | None] = []
        for record, reply in zip(records, replies, strict=True):
            out.append(None if reply is None else self._parse(record.id, reply))
        return out

    # -- read ---------------------------------------------------------------------------------

    def _parse(self, job_id: str, raw: bytes | str) -> JobRecord:
        try:
            return JobRecord.from_json(raw)
        except (ValidationError, ValueError) as err:
            raise InvalidJobError(job_id, _short(err)) from None

    async def get(self, job_id: str) -> JobRecord:
        raw = await self.redis.get(self.keys.record(job_id))
        if raw is None:
            raise JobNotFoundError(job_id)
        return self._parse(job_id, raw)

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Records in the order asked; ``None`` for a missing or unreadable one."""
        if not job_ids:
            return []
        raws = await self.redis.mget([self.keys.record(job_id) for job_id in job_ids])
        out: list[JobRecord | None] = []
        for job_id, raw in zip(job_ids, raws, strict=True):
            try:
                out.append(None if raw is None else self._parse(job_id, raw))
            except InvalidJobError:
                out.append(None)
        return out

    # -- update -------------------------------------------------------------------------------

    async def update(
        self, job_id: str, mutate: Mutation, *, on_commit: OnCommit | None = None
    ) -> tuple[JobRecord, bool]:
        """Apply ``mutate`` to the current record in an optimistic transaction (WATCH).

        ``mutate`` returns the new record, or ``None`` to leave it unchanged. ``on_commit`` may add
        commands (arq scheduling, counters) to the same MULTI. Returns (record now, changed?).
        """
        key = self.keys.record(job_id)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise JobNotFoundError(job_id)
                    old = self._parse(job_id, raw)
                    new = mutate(old)
                    if new is None:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return old, False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._write(pipe, old, new)
                    if on_commit is not None:
                        on_commit(pipe, old, new)
                    await pipe.execute()
                    return new, True
                except WatchError:
                    continue

    def _write(self, pipe: Pipeline, old: JobRecord | None, new: JobRecord) -> None:
        now = utcnow()
        key = self.keys.record(new.id)
        pipe.set(key, new.to_json(), ex=self._record_ttl_s(new, now))
        if old is None or old.status != new.status:
            if old is not None:
                pipe.zrem(self.keys.index(old.status), new.id)
            pipe.zadd(self.keys.index(new.status), {new.id: now.timestamp()})

    def _record_ttl_s(self, record: JobRecord, now: datetime) -> int:
        if record.status in TERMINAL:
            return self.retention_s
        return max(1, int(epoch_s(record.deadline_at) - now.timestamp())) + self.retention_s

    def _arq_ttl_ms(self, record: JobRecord, now: datetime) -> int:
        return int((max(0.0, epoch_s(record.deadline_at) - now.timestamp()) + ARQ_JOB_GRACE_S) * 1000)

    async def quarantine(self, job_id: str, reason: str) -> None:
        """Replace an unreadable record by a ``failed``/``invalid_job`` one, keeping the raw text."""
        now = utcnow()
        raw = await self.redis.get(self.keys.record(job_id))
        record = JobRecord(
            id=job_id,
            status=Status.FAILED,
            created_at=now,
            updated_at=now,
            deadline_at=now,
            request=None,
            error=JobError(kind="invalid_job", message=f"unreadable job record: {reason}"),
            tags={"raw_record": (raw or b"")[:2000].decode("utf-8", "replace")},
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            for status in Status:
                pipe.zrem(self.keys.index(status), job_id)
            self._write(pipe, None, record)
            self.unschedule(pipe, job_id)
            await pipe.execute()

    # -- arq scheduling (inside a caller's MULTI) -------------------------------------------------

    def schedule(self, pipe: Pipeline, record: JobRecord, *, delay_s: float = 0.0) -> None:
        """(Re)create the arq job for ``record`` to run after ``delay_s``."""
        now = utcnow()
        now_ms = int(now.timestamp() * 1000)
        job_id = record.id
        pipe.delete(self.keys.arq_result(job_id), self.keys.arq_retry(job_id), self.keys.arq_in_progress(job_id))
        pipe.zrem(ARQ_ABORT_SET, job_id)
        pipe.set(
            self.keys.arq_job(job_id),
            arq_job_payload(job_id, enqueue_ms=now_ms),
            px=self._arq_ttl_ms(record, now),
        )
        pipe.zadd(self.keys.arq_queue, {job_id: now_ms + int(delay_s * 1000)})

    def unschedule(self, pipe: Pipeline, job_id: str) -> None:
        pipe.delete(self.keys.arq_job(job_id), self.keys.arq_retry(job_id))
        pipe.zrem(self.keys.arq_queue, job_id)

    def count_attempt(self, pipe: Pipeline, record: JobRecord) -> None:
        """Add the last closed attempt of ``record`` to the queue's counters."""
        attempt = record.attempts[-1]
        outcome = attempt.outcome or Outcome.INTERRUPTED
        stats = self.keys.stats
        pipe.hincrby(stats, f"attempts:{outcome}", 1)
        pipe.hincrby(stats, f"attempts:{attempt.tier}:{outcome}", 1)
        if attempt.usage is not None:
            pipe.hincrby(stats, f"tokens:{attempt.tier}:prompt", attempt.usage.prompt_tokens)
            pipe.hincrby(stats, f"tokens:{attempt.tier}:output", attempt.usage.output_tokens)
            pipe.hincrby(stats, f"tokens:{attempt.tier}:thoughts", attempt.usage.thoughts_tokens)
        if outcome == Outcome.OK and attempt.latency_ms is not None:
            pipe.lpush(self.keys.latencies, attempt.latency_ms)
            pipe.ltrim(self.keys.latencies, 0, LATENCY_SAMPLES - 1)

    def count_cost(self, pipe: Pipeline, tier: str, cost_usd: float | None, standard_usd: float | None) -> None:
        if cost_usd is not None:
            pipe.hincrbyfloat(self.keys.stats, f"cost_usd:{tier}", cost_usd)
        if standard_usd is not None:
            pipe.hincrbyfloat(self.keys.stats, "standard_cost_usd", standard_usd)
        if cost_usd is None:
            pipe.hincrby(self.keys.stats, "cost_unknown_jobs", 1)

    # -- list and count -----------------------------------------------------------------------

    async def _trim_terminal_indexes(self) -> None:
        cutoff = utcnow().timestamp() - self.retention_s
        async with self.redis.pipeline(transaction=False) as pipe:
            for status in TERMINAL:
                pipe.zremrangebyscore(self.keys.index(status), "-inf", cutoff)
            await pipe.execute()

    async def ids(self, statuses: Iterable[Status], *, limit: int, newest_first: bool = True) -> list[str]:
        """Job ids in the given statuses, ordered by when they entered it."""
        await self._trim_terminal_indexes()
        scored: list[tuple[float, str]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for status in statuses:
                if newest_first:
                    pipe.zrevrange(self.keys.index(status), 0, limit - 1, withscores=True)
                else:
                    pipe.zrange(self.keys.index(status), 0, limit - 1, withscores=True)
            for members in await pipe.execute():
                scored.extend((score, member.decode()) for member, score in members)
        scored.sort(reverse=newest_first)
        return [job_id for _, job_id in scored[:limit]]

    async def list(self, status: Status | None = None, *, limit: int = 50) -> list[JobRecord]:
        statuses = [status] if status is not None else list(Status)
        ids = await self.ids(statuses, limit=limit)
        return [record for record in await self.get_many(ids) if record is not None]

    async def counts(self) -> dict[str, int]:
        await self._trim_terminal_indexes()
        async with self.redis.pipeline(transaction=False) as pipe:
            for status in Status:
                pipe.zcard(self.keys.index(status))
            sizes = await pipe.execute()
        return {str(status): int(size) for status, size in zip(Status, sizes, strict=True)}

    async def counters(self) -> dict[str, float]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.keys.stats)  # type: ignore[misc]
        return {k.decode(): float(v) for k, v in raw.items()}

    async def latencies_ms(self) -> builtins.list[int]:
        values: builtins.list[bytes] = await self.redis.lrange(self.keys.latencies, 0, -1)  # type: ignore[misc]
        return [int(v) for v in values]


def _short(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return f"{loc}: {first['msg']}" if loc else str(first["msg"])
    if isinstance(err, json.JSONDecodeError):
        return f"not JSON ({err.msg})"
    return str(err)[:200]


def jsonable(value: Any) -> Any:
    """A record or list of records as plain JSON data (for ``--json`` output)."""
    if isinstance(value, JobRecord):
        return json.loads(value.to_json())
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
