"""The producer API: what a web app, a pipeline or a script calls.

    queue = await FlexQueue.connect()
    job = await queue.enqueue({"model": "gemini-2.5-flash", "prompt": "Hi"}, job_id="greet-1")
    record = await queue.wait(job.record.id, timeout_s=900)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer import transitions
from producer.errors import InvalidRequestError, JobStateError, StoreUnavailableError, WaitTimeoutError
from producer.models import JobRecord, utcnow
from producer.request import GenerateRequest, check_job_id, parse_request
from producer.settings import ProducerSettings
from producer.stats import summarize
from producer.status import ACTIVE, TERMINAL, Fallback, Status
from producer.store import JobStore

MAX_DEADLINE_S = transitions.MAX_DEADLINE_S  # (kept here too: the producer API's own vocabulary)


@dataclass(frozen=True)
class JobSpec:
    """One job to enqueue: the request and what the queue should do with it."""

    request: GenerateRequest | Mapping[str, Any]
    job_id: str | None = None
    deadline_s: float | None = None
    fallback: Fallback = "none"
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Enqueued:
    """What enqueue did: ``created`` is False when the id existed and the existing job is returned."""

    record: JobRecord
    created: bool

    @property
    def id(self) -> str:
        return self.record.id


async def connect_redis(settings: ProducerSettings) -> Redis:
    """A Redis client for ``REDIS_URL``; fails with the URL redacted if Redis cannot be reached."""
    client: Redis = Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=5, health_check_interval=30
    )
    try:
        await client.ping()
    except (RedisError, OSError) as err:
        await client.aclose()
        raise StoreUnavailableError(
            f"cannot reach Redis at {settings.redis_url_redacted}: {type(err).__name__}"
        ) from None
    return client


class FlexQueue:
    """Enqueue generation jobs and read, wait on, cancel, retry and list them."""

    def __init__(self, redis: Redis, settings: ProducerSettings, *, owns_redis: bool = False) -> None:
        self.redis = redis
        self.settings = settings
        self.store = JobStore(redis, queue=settings.queue, retention_s=settings.retention_s)
        self._owns_redis = owns_redis

    @classmethod
    async def connect(cls, settings: ProducerSettings | None = None, *, redis: Redis | None = None) -> Self:
        settings = settings or ProducerSettings()
        if redis is not None:
            return cls(redis, settings)
        return cls(await connect_redis(settings), settings, owns_redis=True)

    async def close(self) -> None:
        if self._owns_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- enqueue ------------------------------------------------------------------------------

    def _prepare(self, spec: JobSpec) -> JobRecord:
        request = parse_request(spec.request, max_bytes=self.settings.max_request_bytes)
        job_id = check_job_id(spec.job_id) if spec.job_id is not None else uuid.uuid4().hex
        deadline_s = self.settings.deadline_s if spec.deadline_s is None else spec.deadline_s
        if spec.fallback not in ("none", "standard"):
            raise InvalidRequestError("fallback: must be 'none' or 'standard'", field="fallback")
        tags = {str(k): str(v) for k, v in spec.tags.items()}
        return transitions.new_record(
            job_id, request, now=utcnow(), deadline_s=deadline_s, fallback=spec.fallback, tags=tags
        )

    async def enqueue(
        self,
        request: GenerateRequest | Mapping[str, Any],
        *,
        job_id: str | None = None,
        deadline_s: float | None = None,
        fallback: Fallback = "none",
        tags: Mapping[str, str] | None = None,
    ) -> Enqueued:
        """Validate and enqueue one job. An existing ``job_id`` is not enqueued again."""
        spec = JobSpec(request, job_id=job_id, deadline_s=deadline_s, fallback=fallback, tags=tags or {})
        record = self._prepare(spec)  # a single request's error names the field without an [index]
        existing = (await self.store.create([record]))[0]
        return Enqueued(record=existing or record, created=existing is None)

    async def enqueue_many(self, specs: Iterable[JobSpec], *, chunk: int = 1000) -> list[Enqueued]:
        """Validate every spec first (nothing is enqueued if one is invalid), then pipeline them.

        An ``InvalidRequestError`` names the item: ``[3] prompt: must not be empty``.
        """
        records: list[JobRecord] = []
        for index, spec in enumerate(specs):
            try:
                records.append(self._prepare(spec))
            except InvalidRequestError as err:
                raise InvalidRequestError(f"[{index}] {err}", field=err.field) from None
        out: list[Enqueued] = []
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            for record, existing in zip(part, await self.store.create(part), strict=True):
                out.append(Enqueued(record=existing or record, created=existing is None))
        return out

    # -- read ---------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord:
        return await self.store.get(job_id)

    async def wait(self, job_id: str, timeout_s: float, *, poll_s: float = 0.5) -> JobRecord:
        """Poll until the job is terminal; ``WaitTimeoutError`` after ``timeout_s``."""
        give_up = time.monotonic() + timeout_s
        delay_s = min(0.05, poll_s)
        while True:
            record = await self.store.get(job_id)
            if record.status in TERMINAL:
                return record
            if time.monotonic() >= give_up:
                raise WaitTimeoutError(job_id, timeout_s, record.status)
            await asyncio.sleep(min(delay_s, max(0.0, give_up - time.monotonic())))
            delay_s = min(poll_s, delay_s * 2)

    async def list(self, status: Status | str | None = None, *, limit: int = 50) -> list[JobRecord]:
        return await self.store.list(Status(status) if status is not None else None, limit=limit)

    async def stats(self) -> dict[str, Any]:
        return summarize(
            counts=await self.store.counts(),
            counters=await self.store.counters(),
            latencies_ms=await self.store.latencies_ms(),
        )

    # -- cancel and retry ---------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a waiting one never runs again; a running one is aborted by its worker."""

        def decide(record: JobRecord) -> transitions.Change[None]:
            if record.status in TERMINAL:
                raise JobStateError(job_id, record.status, "only queued, retrying or running jobs can be cancelled")
            now = utcnow()
            if record.status == Status.RUNNING:  # its worker aborts the call (allow_abort_jobs=True)
                return transitions.Change(transitions.request_cancel(record, now=now), abort=True)
            return transitions.Change(transitions.cancel(record, now=now), drop_arq_job=True)

        change = await self.store.update(job_id, decide)
        assert change is not None
        return change.record

    async def retry(self, job_id: str, *, deadline_s: float | None = None) -> JobRecord:
        """Run a failed or cancelled job again, keeping and extending its attempt history."""
        deadline = transitions.check_deadline_s(self.settings.deadline_s if deadline_s is None else deadline_s)

        def decide(record: JobRecord) -> transitions.Change[None]:
            if record.status not in (Status.FAILED, Status.CANCELLED):
                raise JobStateError(job_id, record.status, "only failed or cancelled jobs can be retried")
            if record.request is None:
                raise JobStateError(job_id, record.status, "its record is unreadable (invalid_job)")
            return transitions.Change(transitions.requeue(record, now=utcnow(), deadline_s=deadline), run_in_s=0.0)

        change = await self.store.update(job_id, decide)
        assert change is not None
        return change.record

    async def active_count(self) -> int:
        counts = await self.store.counts()
        return sum(counts[str(s)] for s in ACTIVE)
