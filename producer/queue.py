"""The producer API: what a web app, a pipeline or a script calls.

    queue = await FlexQueue.connect()
    job = await queue.enqueue({"model": "gemini-2.5-flash", "prompt": "Hi"}, job_id="greet-1")
    record = await queue.wait(job.record.id, timeout_s=900)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer import redact, transitions
from producer.blobs import fill, open_blob_store
from producer.errors import (
    BlobMissingError,
    InvalidRequestError,
    JobNotFoundError,
    JobStateError,
    StoreUnavailableError,
    WaitTimeoutError,
    redis_failure,
)
from producer.events import Event, newest_event_id, read_events
from producer.models import ImageRef, JobRecord, Redaction, utcnow
from producer.notify import Completions
from producer.redact import Redactor
from producer.request import (
    STORED,
    GenerateRequest,
    check_channels,
    check_job_id,
    check_tags,
    check_tier,
    parse_request,
)
from producer.settings import ProducerSettings
from producer.stats import summarize
from producer.status import ACTIVE, FALLBACKS, TERMINAL, Fallback, Status, Tier
from producer.store import JobStore
from producer.thread import parse_continue, thread_contents

MAX_DEADLINE_S = transitions.MAX_DEADLINE_S  # (kept here too: the producer API's own vocabulary)


@dataclass(frozen=True)
class JobSpec:
    """One job to enqueue: the request and what the queue should do with it."""

    request: GenerateRequest | Mapping[str, Any]
    job_id: str | None = None
    deadline_s: float | None = None
    fallback: Fallback = "none"
    tags: Mapping[str, str] = field(default_factory=dict)
    cache: bool | None = None  # the response cache (producer.cache); None: the producer's FLEXQ_CACHE
    tier: Tier | str | None = None  # flex | standard | priority | batch; None: flex (or batch, FLEXQ_BATCH_AFTER_S)
    channels: Sequence[str] | None = None  # channels to try in order; None: all the worker has


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
        raise StoreUnavailableError(redis_failure(settings.redis_url_redacted, err)) from None
    return client


class FlexQueue:
    """Enqueue generation jobs and read, wait on, cancel, retry and list them."""

    def __init__(
        self, redis: Redis, settings: ProducerSettings, *, owns_redis: bool = False,
        redactor: Callable[[str], str] | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        #: Runs over every request at enqueue (``FLEXQ_REDACT``, or ``redactor``); None: off.
        self.redactor: Redactor | None = redact.choose(redactor, settings.redact)
        self.store = JobStore(
            redis, queue=settings.queue, retention_s=settings.retention_s,
            blobs=open_blob_store(settings.blob_store, redis=redis, queue=settings.queue),
            events_maxlen=settings.events_maxlen,
        )
        self._owns_redis = owns_redis
        self._completions: Completions | None = None

    @classmethod
    async def connect(
        cls, settings: ProducerSettings | None = None, *, redis: Redis | None = None,
        redactor: Callable[[str], str] | None = None,
    ) -> Self:
        """``redactor``: a ``(text: str) -> str`` to run over every request at enqueue, instead of
        the one ``FLEXQ_REDACT`` names (``producer.redact``)."""
        settings = settings or ProducerSettings()
        chosen = redact.choose(redactor, settings.redact)  # a bad FLEXQ_REDACT fails before Redis is dialled
        if redis is not None:
            return cls(redis, settings, redactor=chosen)
        return cls(await connect_redis(settings), settings, owns_redis=True, redactor=chosen)

    async def close(self) -> None:
        if self._completions is not None:
            await self._completions.close()
            self._completions = None
        if self._owns_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- enqueue ------------------------------------------------------------------------------

    def _prepare(self, spec: JobSpec, parents: Mapping[str, JobRecord]) -> JobRecord:
        parent_id = _parent_of(spec.request)
        data: Any = spec.request
        if parent_id is not None:
            data = self._continuation(spec.request, parents[parent_id])
        request = parse_request(
            data, max_bytes=self.settings.max_request_bytes,
            max_blob_bytes=self.settings.max_blob_bytes, max_job_blob_bytes=self.settings.max_job_blob_bytes,
        )
        redaction: Redaction | None = None
        if self.redactor is not None:  # before the record: what is stored and sent is the redacted text
            request, redaction = redact.apply(request, self.redactor)
        job_id = check_job_id(spec.job_id) if spec.job_id is not None else uuid.uuid4().hex
        deadline_s = self.settings.deadline_s if spec.deadline_s is None else spec.deadline_s
        tier = self._tier(spec, deadline_s)
        if spec.fallback not in FALLBACKS:
            raise InvalidRequestError("fallback: must be 'none', 'flex' or 'standard'", field="fallback")
        if spec.fallback == "flex" and tier != Tier.BATCH:
            raise InvalidRequestError(
                f"fallback: 'flex' is for batch-tier jobs (back to flex when their batch expires); this job's "
                f"tier is {str(tier)!r}", field="fallback",
            )
        channels = check_channels(spec.channels)
        tags = check_tags(dict(spec.tags) if isinstance(spec.tags, Mapping) else spec.tags)
        tag_bytes = len(json.dumps(tags).encode()) if tags else 0
        request_bytes = len(request.model_dump_json(exclude_none=True).encode())
        if tag_bytes + request_bytes > self.settings.max_request_bytes:
            raise InvalidRequestError(
                f"tags: the request and its tags ({request_bytes + tag_bytes} bytes) are over the "
                f"{self.settings.max_request_bytes}-byte limit (FLEXQ_MAX_REQUEST_BYTES)", field="tags",
            )
        record = transitions.new_record(
            job_id, request, now=utcnow(), deadline_s=deadline_s, fallback=spec.fallback, tags=tags,
            parent_id=parent_id, cache=self.settings.cache if spec.cache is None else bool(spec.cache),
            tier=tier, channels=channels,
        )
        return record if redaction is None else record.model_copy(update={"redaction": redaction})

    def _tier(self, spec: JobSpec, deadline_s: float) -> Tier:
        """The job's tier: as given, else ``batch`` when ``FLEXQ_BATCH_AFTER_S`` is set and the deadline is at
        least that far away, else ``flex``."""
        if spec.tier is None:
            after_s = self.settings.batch_after_s
            return Tier.BATCH if after_s is not None and deadline_s >= after_s else Tier.FLEX
        return check_tier(spec.tier)

    @staticmethod
    def _continuation(data: Any, parent: JobRecord) -> GenerateRequest:
        """The whole request of a thread's next turn: parent's contents, parent's answer, the new turn."""
        turn = parse_continue(data)
        if parent.status != Status.SUCCEEDED or parent.result is None or parent.result.content is None:
            state = "succeeded without an answer content" if parent.status == Status.SUCCEEDED else parent.status
            raise InvalidRequestError(
                f"continue_from: job {parent.id!r} is {state}; a thread continues a succeeded job",
                field="continue_from",
            )
        assert parent.request is not None
        contents = thread_contents(parent.request, parent.result.content, turn.turn())
        fields = {
            "model": turn.model or parent.request.model, "contents": contents,
            "system_instruction": turn.system_instruction if turn.system_instruction is not None
            else parent.request.system_instruction,
            "config": turn.config if turn.config is not None else parent.request.config,
        }
        # earlier turns were checked when they were enqueued and hold blob references: not re-checked
        return GenerateRequest.model_validate(fields, context=STORED)

    async def _parents(self, specs: Iterable[JobSpec]) -> dict[str, JobRecord]:
        """The records of the jobs these specs continue; ``InvalidRequestError`` if one does not exist."""
        out: dict[str, JobRecord] = {}
        for spec in specs:
            parent_id = _parent_of(spec.request)
            if parent_id is None or parent_id in out:
                continue
            check_job_id(parent_id)
            try:
                out[parent_id] = await self.store.get(parent_id)
            except JobNotFoundError:
                raise InvalidRequestError(
                    f"continue_from: no job with id {parent_id!r} (never enqueued, or expired)", field="continue_from"
                ) from None
        return out

    async def thread(self, job_id: str) -> list[JobRecord]:
        """The thread ``job_id`` ends: the first job, each continuation, then ``job_id`` itself."""
        chain = [await self.store.get(job_id)]
        while chain[0].parent_id is not None and len(chain) < 1000:
            try:
                chain.insert(0, await self.store.get(chain[0].parent_id))
            except JobNotFoundError:
                break  # an expired early turn: the thread starts where the records do
        return chain

    async def children(self, job_id: str) -> list[str]:
        """Ids of the jobs that continue ``job_id``, sorted."""
        members: set[Any] = await self.redis.smembers(self.store.keys.children(job_id))  # type: ignore[misc]
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def enqueue(
        self,
        request: GenerateRequest | Mapping[str, Any],
        *,
        job_id: str | None = None,
        deadline_s: float | None = None,
        fallback: Fallback = "none",
        tags: Mapping[str, str] | None = None,
        cache: bool | None = None,
        tier: Tier | str | None = None,
        channels: Sequence[str] | None = None,
    ) -> Enqueued:
        """Validate and enqueue one job. An existing ``job_id`` is not enqueued again. ``cache``: answer
        it from the response cache if an identical request was answered lately (``producer.cache``).
        ``tier``: ``flex`` (default), ``standard``, ``priority`` or ``batch``; ``channels``: the worker's
        channels to try, in order (default: all, in the worker's order)."""
        spec = JobSpec(request, job_id=job_id, deadline_s=deadline_s, fallback=fallback, tags=tags or {},
                       cache=cache, tier=tier, channels=channels)
        record = self._prepare(spec, await self._parents([spec]))  # an error names the field, no [index]
        existing = (await self.store.create([record]))[0]
        return Enqueued(record=existing or record, created=existing is None)

    async def enqueue_many(self, specs: Iterable[JobSpec], *, chunk: int = 1000) -> list[Enqueued]:
        """Validate every spec first (nothing is enqueued if one is invalid), then pipeline them.

        An ``InvalidRequestError`` names the item: ``[3] prompt: must not be empty``.
        """
        specs = list(specs)
        records: list[JobRecord] = []
        parents = await self._parents(specs)
        for index, spec in enumerate(specs):
            try:
                records.append(self._prepare(spec, parents))
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

    async def blob(self, sha256: str) -> bytes:
        """The bytes of one blob (an image of a result, inline data of a request)."""
        data = await self.store.blobs.get(sha256)
        if data is None:
            raise BlobMissingError(sha256)
        return data

    async def images(self, job_id: str) -> list[tuple[ImageRef, bytes]]:
        """A succeeded job's images with their bytes, in answer order (empty for a text answer)."""
        record = await self.store.get(job_id)
        if record.result is None:
            return []
        return [(image, await self.blob(image.sha256)) for image in record.result.images]

    async def content(self, job_id: str) -> dict[str, Any] | None:
        """A succeeded job's answer ``Content`` with its bytes filled back in, ready for
        ``types.Content.model_validate``; None when the job has no answer."""
        record = await self.store.get(job_id)
        if record.result is None or record.result.content is None:
            return None
        filled: dict[str, Any] = await fill(record.result.content, self.store.blobs)
        return filled

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord:
        """The job's record once it has ended; ``WaitTimeoutError`` after ``timeout_s``.

        Woken by the queue's event stream (``producer.notify``: one reader per process, however many
        wait), not by polling the record."""
        [record] = await self.wait_many([job_id], timeout_s, partial=False)
        assert record is not None
        return record

    async def wait_many(
        self, job_ids: Iterable[str], timeout_s: float, *, partial: bool = True
    ) -> list[JobRecord | None]:
        """The records of ``job_ids`` (in order) once every one has ended, or when ``timeout_s`` passes:
        then, with ``partial`` (the default), None stands for each job still unfinished; without it,
        ``WaitTimeoutError`` names the first. ``JobNotFoundError`` for an id with no record."""
        ids = list(job_ids)
        completions = self.completions
        await completions.start()  # events after this point wake us
        futures = completions.register(ids)
        try:
            ended = await self._ended(ids)
            for job_id in ended:
                futures[job_id].cancel()
            pending = [future for job_id, future in futures.items() if job_id not in ended]
            if pending:
                await asyncio.wait(pending, timeout=timeout_s)
            done = [job_id for job_id in ids if job_id in ended or futures[job_id].done()]
        finally:
            completions.unregister(futures)
        records = dict(zip(done, await self.store.get_many(done), strict=True)) if done else {}
        out = [records.get(job_id) for job_id in ids]
        if not partial:
            for job_id, record in zip(ids, out, strict=True):
                if record is None or not record.terminal:
                    current = record or await self.store.get(job_id)
                    if not current.terminal:
                        raise WaitTimeoutError(job_id, timeout_s, current.status)
                    out[ids.index(job_id)] = current
        return out

    async def _ended(self, job_ids: list[str]) -> set[str]:
        """Of ``job_ids``, those already ended (their status indexes say); ``JobNotFoundError`` for an
        id no index holds and no record has."""
        statuses = await self.store.statuses(job_ids)
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status is None:
                await self.store.get(job_id)  # raises JobNotFoundError when there is no record
        return {job_id for job_id, status in zip(job_ids, statuses, strict=True) if status in TERMINAL}

    def events(
        self, *, after: str = "$", group: str | None = None, consumer: str | None = None,
        job_id: str | None = None, follow: bool = True, block_s: float = 5.0,
    ) -> AsyncGenerator[Event, None]:
        """The queue's job events, oldest first: ``async for event in queue.events(): ...``.

        ``after``: ``"$"`` (the default) for events from now on, ``"0"`` for every event still kept
        (``FLEXQ_EVENTS_MAXLEN``), or an event id to resume after it. ``group`` / ``consumer``: read as
        one consumer of a Redis consumer group, so a pipeline resumes where it stopped after a restart
        (the group starts at ``after`` when it is first created; each consumer's unacknowledged events
        come again first). ``job_id``: only that job's events. ``follow=False``: stop at the end."""
        return read_events(self.redis, self.store.keys.events, after=after, group=group, consumer=consumer,
                           job_id=job_id, follow=follow, block_s=block_s)

    async def last_event_id(self) -> str:
        """The id of the newest event kept (``"0-0"`` when none): read it *before* a record, then
        ``events(after=it)`` misses nothing that happened to the job after that read."""
        return await newest_event_id(self.redis, self.store.keys.events)

    async def ack_events(self, group: str, *event_ids: str) -> int:
        """Acknowledge events of a consumer group (``events`` does it for each event it moves past)."""
        return int(await self.redis.xack(self.store.keys.events, group, *event_ids)) if event_ids else 0

    @property
    def completions(self) -> Completions:
        """The process's reader of job ends for this queue (started by the first wait)."""
        if self._completions is None:
            self._completions = Completions(self.store)
        return self._completions

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
        await self.store.keep_blobs([change.record], utcnow())  # the new deadline keeps its blobs longer
        return change.record

    async def active_count(self) -> int:
        counts = await self.store.counts()
        return sum(counts[str(s)] for s in ACTIVE)


def _parent_of(request: Any) -> str | None:
    """The ``continue_from`` of a request given as a mapping (a ``GenerateRequest`` never has one)."""
    if isinstance(request, Mapping) and request.get("continue_from") is not None:
        return str(request["continue_from"])
    return None
