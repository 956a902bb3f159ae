"""Job records in Redis: create (idempotently), read, change in a transaction, list, count.

Thin I/O only: what a change *means* lives in ``producer.transitions``; this module writes it,
keeps the per-status index in step, and applies the side effects the change carries (arq
scheduling, leases, counters) in the same transaction. arq's keys and envelope come from
``producer.arq_wire``; the enqueue script is ``producer/lua/enqueue.lua``.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from producer import arq_wire, blobs, events
from producer.blobs import BlobStore, RedisBlobStore
from producer.commands import Commands
from producer.errors import InvalidJobError, JobNotFoundError, StoreUnavailableError, one_line
from producer.keys import Keys
from producer.models import Attempt, JobError, JobRecord, utcnow
from producer.stats import add_up, attempt_counts, cost_counts
from producer.status import TERMINAL, Outcome, Status
from producer.transitions import Change, Cost

#: How long an arq job key outlives its job's deadline, so a deferred job never expires (arq #320).
ARQ_JOB_GRACE_S = 3600
#: Recent latencies kept for p50/p95.
LATENCY_SAMPLES = 10_000

T = TypeVar("T")
Decide = Callable[[JobRecord], "Change[T] | None"]


@cache
def _script(name: str) -> str:
    return resources.files("producer").joinpath("lua", f"{name}.lua").read_text()


def epoch_s(moment: datetime) -> float:
    return moment.timestamp()


@dataclasses.dataclass(frozen=True)
class Write(Generic[T]):
    """One record change as a compare-and-set call: the record's key, the script's arguments (the text
    it was decided from or its sha1, the commands as JSON, the mode) and the change it writes."""

    key: str
    args: list[str]
    change: Change[T]


#: A worker that has not beaten for this long is forgotten (its name leaves the heartbeat set).
WORKER_FORGET_S = 24 * 3600


class JobStore:
    """Reads and writes job records of one queue."""

    def __init__(
        self, redis: Redis, *, queue: str, retention_s: int, blobs: BlobStore | None = None,
        events_maxlen: int = 100_000,
    ) -> None:
        self.redis = redis
        self.keys = Keys(queue)
        self.retention_s = retention_s
        #: Events kept in ``{queue}:events`` (about: trimmed in whole stream nodes); 0 writes none.
        self.events_maxlen = events_maxlen
        #: Image bytes and inline data, apart from records (``producer.blobs``); Redis by default.
        self.blobs: BlobStore = blobs if blobs is not None else RedisBlobStore(redis, queue=queue)
        self._enqueue_script = redis.register_script(_script("enqueue"))
        self._cas_script = redis.register_script(_script("cas"))
        #: fakeredis's Lua lacks redis.sha1hex: compare the record's whole text there instead of its hash
        self._cas_by_text = type(redis).__module__.startswith("fakeredis")

    # -- create -------------------------------------------------------------------------------

    async def create(self, records: Sequence[JobRecord]) -> list[JobRecord | None]:
        """Store new records and schedule their arq jobs, in one round trip.

        For each record: ``None`` if it was created, or the record that already had its id
        (idempotent enqueue: that job is left as it is).
        """
        now = utcnow()
        now_ms = int(now.timestamp() * 1000)
        await self.keep_blobs(records, now)  # before any record refers to them
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                keys = self.keys
                ttl_s = self._record_ttl_s(record, now)
                await self._enqueue_script(
                    keys=[
                        keys.record(record.id), keys.index(Status.QUEUED),
                        *arq_wire.enqueue_keys(keys.queue, record.id), keys.events,
                    ],
                    args=[
                        record.to_json(),
                        record.id,
                        now_ms,
                        now.timestamp(),
                        arq_wire.job_payload(record.id, enqueue_ms=now_ms),
                        self._arq_ttl_ms(record, now),
                        ttl_s,
                        self.events_maxlen,
                    ],
                    client=pipe,
                )
                if record.parent_id is not None:
                    pipe.sadd(keys.children(record.parent_id), record.id)
                    pipe.expire(keys.children(record.parent_id), ttl_s)
            try:
                replies = await pipe.execute()
            except RedisError as err:
                raise StoreUnavailableError(f"could not enqueue: {type(err).__name__}: {err}") from err
        replies = [reply for reply in replies if not isinstance(reply, int)]  # drop SADD/EXPIRE replies
        out: list[JobRecord | None] = []
        for record, reply in zip(records, replies, strict=True):
            out.append(None if reply is None else self._parse(record.id, reply))
        return out

    async def keep_blobs(self, records: Sequence[JobRecord], now: datetime) -> None:
        """Store the records' new inline bytes, and keep every blob they refer to as long as the record."""
        try:
            for record in records:
                if record.request is None or not record.request.contents:
                    continue
                ttl_s = self._record_ttl_s(record, now)
                pending = record.request.pending_blobs
                if pending:
                    await self.blobs.put(pending, ttl_s=ttl_s)
                older = blobs.refs(record.request.contents) - {blob.sha256 for blob in pending}
                if older:
                    await self.blobs.touch(older, ttl_s=ttl_s)
        except RedisError as err:
            raise StoreUnavailableError(f"could not store blobs: {type(err).__name__}: {err}") from err

    # -- read ---------------------------------------------------------------------------------

    def parse(self, job_id: str, raw: bytes | str) -> JobRecord:
        """A record from its stored text; ``InvalidJobError`` when it cannot be read."""
        return self._parse(job_id, raw)

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

    # -- change ---------------------------------------------------------------------------------

    async def get_raw(self, job_id: str) -> bytes:
        """The record's stored text (for ``update(current=...)``); ``JobNotFoundError`` if there is none."""
        raw: bytes | None = await self.redis.get(self.keys.record(job_id))
        if raw is None:
            raise JobNotFoundError(job_id)
        return raw

    async def update(
        self, job_id: str, decide: Decide[T], *, current: str | bytes | None = None, parsed: JobRecord | None = None
    ) -> Change[T] | None:
        """Apply ``decide`` to the current record, atomically: one compare-and-set script call
        (``producer/lua/cas.lua``) that writes the record, its index, its event and the change's side
        effects only if the record is still the text ``decide`` saw.

        ``decide`` returns a ``Change`` (the new record, what it decided, the side effects) or
        ``None`` to leave the job as it is. Returns the change that was written (its ``written``: the
        record's new text, to pass as ``current`` next time), or ``None``. ``current``: the record's
        text as the caller last saw or wrote it, saving a read when it is still current. ``decide``
        may run more than once: when the record changed meanwhile, it is read again. ``parsed``: the
        record ``current`` holds, when the caller has it already (the hot path saves a parse)."""
        raw = current
        old: JobRecord | None = parsed if current is not None else None
        while True:
            if raw is None:
                raw = await self.get_raw(job_id)
            write = self.prepare(job_id, decide, raw, old)
            if write is None:
                return None
            change = self.written(job_id, write, int(await self._cas_script(keys=[write.key], args=write.args)))
            if change is not None:
                return change
            raw, old = None, None  # changed meanwhile: read it again and decide again

    def prepare(
        self, job_id: str, decide: Decide[T], raw: str | bytes, parsed: JobRecord | None = None
    ) -> Write[T] | None:
        """The compare-and-set call that applies ``decide`` to the record text ``raw`` (``parsed``: that
        text as a record, when the caller has it), or None when ``decide`` leaves the job as it is. The
        call is for ``update``, or for a flow-control script that applies it with its own (worker)."""
        old = parsed if parsed is not None else self._parse(job_id, raw)
        change = decide(old)
        if change is None:
            return None
        ops = Commands()  # written down for the script, not sent
        written = self._write(ops, old, change.record, change.counted)
        self._apply(ops, change)
        return Write(self.keys.record(job_id), self._cas_args(raw, ops), dataclasses.replace(change, written=written))

    def _cas_args(self, raw: str | bytes, ops: Commands) -> list[str]:
        """``cas.lua``'s arguments: apply ``ops`` if the record is still the text ``raw``."""
        text = raw if isinstance(raw, bytes) else raw.encode()
        seen = text.decode() if self._cas_by_text else hashlib.sha1(text, usedforsecurity=False).hexdigest()
        return [seen, json.dumps(ops.stack), "text" if self._cas_by_text else "sha1"]

    @staticmethod
    def written(job_id: str, write: Write[T], applied: int) -> Change[T] | None:
        """What the compare-and-set call's reply means: the change (applied), None (the record changed
        meanwhile: read it and decide again), or ``JobNotFoundError`` (the record is gone)."""
        if applied == 1:
            return write.change
        if applied < 0:
            raise JobNotFoundError(job_id)
        return None

    def _apply(self, ops: Commands, change: Change[Any]) -> None:
        record = change.record
        now = utcnow()
        if change.run_in_s is not None:
            arq_wire.schedule(
                ops, self.keys.queue, record.id, now_ms=int(now.timestamp() * 1000),
                delay_ms=int(change.run_in_s * 1000), job_ttl_ms=self._arq_ttl_ms(record, now),
            )
        if change.drop_arq_job:
            arq_wire.unschedule(ops, self.keys.queue, record.id)
        if change.end_run:
            arq_wire.end_run(ops, self.keys.queue, record.id)
        if change.abort:
            arq_wire.request_abort(ops, record.id, now_ms=int(now.timestamp() * 1000))
        if change.lease_s is not None:
            arq_wire.hold_leases(ops, [record.id], ttl_ms=int(change.lease_s * 1000))
        self._count(ops, change.counted, change.cost)

    def _write(
        self, pipe: Pipeline | Commands, old: JobRecord | None, new: JobRecord, closed: Sequence[Attempt] = ()
    ) -> str:
        """Queue the record's write, its index move and its event on ``pipe``; the record's new text."""
        now = utcnow()
        key = self.keys.record(new.id)
        text = new.to_json()
        pipe.set(key, text, ex=self._record_ttl_s(new, now))
        moved = old is None or old.status != new.status
        if moved:
            if old is not None:
                pipe.zrem(self.keys.index(old.status), new.id)
            pipe.zadd(self.keys.index(new.status), {new.id: now.timestamp()})
        if self.events_maxlen > 0 and (moved or closed):
            fields = events.status_event(new, None if old is None else old.status, closed[-1] if closed else None,
                                         at_s=now.timestamp())
            pipe.xadd(self.keys.events, fields, maxlen=self.events_maxlen, approximate=True)  # type: ignore[arg-type]
        return text

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
            arq_wire.unschedule(pipe, self.keys.queue, job_id)
            await pipe.execute()

    async def forget(self, job_id: str) -> None:
        """Drop an id whose record is gone (it expired) from every status index."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for status in Status:
                pipe.zrem(self.keys.index(status), job_id)
            await pipe.execute()

    # -- counters and leases ---------------------------------------------------------------------

    def _count(self, ops: Commands, counted: Sequence[Attempt], cost: Cost | None) -> None:
        """Add closed attempts and a job's cost to the queue's counters (one ``Commands.hadd`` step of the
        compare-and-set call), and each ok attempt's latency to the samples."""
        parts: list[Mapping[str, float]] = [attempt_counts(attempt) for attempt in counted]
        if cost is not None:
            parts.append(cost_counts(cost.tier, cost.usd, cost.standard_usd, model=cost.model, channel=cost.channel))
        amounts = add_up(parts)
        if amounts:
            ops.hadd(self.keys.stats, amounts)
        for attempt in counted:
            if attempt.outcome == Outcome.OK and attempt.latency_ms is not None:
                ops.lpush(self.keys.latencies, attempt.latency_ms)
                ops.ltrim(self.keys.latencies, 0, LATENCY_SAMPLES - 1)

    async def wake_waiting(self, model: str, *, chunk: int = 1000) -> int:
        """Make every queued or retrying job of ``model`` due now (``flexq resume``: the jobs a pause
        deferred come back at once, not when the pause would have ended). The number woken."""
        name = model.removeprefix("models/")
        woken = 0
        now_ms = int(utcnow().timestamp() * 1000)
        for status in (Status.QUEUED, Status.RETRYING):
            ids = [m.decode() if isinstance(m, bytes) else str(m) for m in await self.redis.zrange(
                self.keys.index(status), 0, -1)]
            for start in range(0, len(ids), chunk):
                part = ids[start : start + chunk]
                records = await self.get_many(part)
                due = [r.id for r in records if r is not None and r.request is not None
                       and r.request.model.removeprefix("models/") == name and not r.terminal]
                if due:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for job_id in due:
                            arq_wire.wake(pipe, self.keys.queue, job_id, now_ms=now_ms)
                        await pipe.execute()
                woken += len(due)
        return woken

    async def heartbeat(self, worker: str, job_ids: Iterable[str], *, lease_s: float, now_s: float) -> None:
        """Renew the leases of the jobs a worker runs, and record that the worker is alive."""
        async with self.redis.pipeline(transaction=False) as pipe:
            arq_wire.hold_leases(pipe, job_ids, ttl_ms=int(lease_s * 1000))
            pipe.zadd(self.keys.workers, {worker: now_s})
            pipe.zremrangebyscore(self.keys.workers, "-inf", now_s - WORKER_FORGET_S)  # long-gone processes
            pipe.expire(self.keys.workers, WORKER_FORGET_S)
            await pipe.execute()

    async def arq_jobs_exist(self, job_ids: Sequence[str]) -> builtins.list[bool]:
        """For each id: does arq still hold a job to run for it?"""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                arq_wire.job_exists(pipe, job_id)
            return [bool(found) for found in await pipe.execute()]

    # -- list and count -----------------------------------------------------------------------

    async def index_page(self, status: Status, start: int, count: int) -> builtins.list[str]:
        """``count`` ids of one status index from position ``start``, oldest first."""
        members = await self.redis.zrange(self.keys.index(status), start, start + count - 1)
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    async def statuses(self, job_ids: Sequence[str], *, chunk: int = 1000) -> builtins.list[Status | None]:
        """Each job's status from the status indexes alone (no record read); None when no index holds it."""
        out: builtins.list[Status | None] = []
        for start in range(0, len(job_ids), chunk):
            part = builtins.list(job_ids[start : start + chunk])
            async with self.redis.pipeline(transaction=False) as pipe:
                for status in Status:
                    pipe.zmscore(self.keys.index(status), part)
                found = await pipe.execute()
            for n in range(len(part)):
                out.append(next((status for status, scores in zip(Status, found, strict=True)
                                 if scores[n] is not None), None))
        return out

    async def live_workers(self, *, within_s: float) -> set[str]:
        """Workers whose heartbeat is at most ``within_s`` old."""
        cutoff = utcnow().timestamp() - within_s
        members = await self.redis.zrangebyscore(self.keys.workers, cutoff, "+inf")
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def trim_terminal_indexes(self) -> None:
        """Drop ended jobs older than the retention from the status indexes (their records expired)."""
        await self._trim_terminal_indexes()

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
        return one_line(err)
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
