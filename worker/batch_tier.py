"""The ``batch`` tier: jobs packed into Gemini Batch API jobs (half price, up to 24 h), polled, and answered
into their records like any other attempt.

A ``batch``-tier job's arq job comes here (``Runner.run`` -> ``BatchTier.run``) on every run until the job
ends or moves on to flex; each run returns how long arq defers it, so every waiting job keeps an arq job
(worker.lease's reconciler re-enqueues an active job without one). The job's record says where it is:

- pending: ``queued``, ``batch`` null. Its id waits in ``{queue}:batch:pending:{model}`` (scored by when it
  started waiting). A run that finds the oldest pending id ``batch_pack_s`` old, or ``batch_max_jobs``
  pending, packs up to ``batch_max_jobs`` of them into one Batch API job (one packer per model: a lock):
  inline requests while their JSON fits ``inline_limit_bytes``, else a JSONL file through the Files API.
  The batch's hash (``{queue}:batch:job:{name}``: model, members) and one pointer per member
  (``{queue}:batch:member:{id}``) are written, and the members leave the pending set, in one transaction
  BEFORE the member records are updated: a crash in between never packs (and pays for) a job twice, the
  job's next run adopts the batch from its pointer.
- waiting: ``queued``, ``batch`` = the BatchRef. A run polls ``batches.get`` if the batch's poll lock is
  free (one poll per ``batch_poll_s`` per batch, whatever its size); the batch's lead member (its first)
  runs every ``batch_poll_s``, the others every ten times that (at most ``MEMBER_POLL_CAP_S``), so the
  batch is still polled when its lead is cancelled.
- answered: when the batch ends, the poller records every member: a ``batch`` attempt (started when the
  batch was created, ``channel`` = the batch's name) closed by ``Runner.record_outcome`` with the member's
  answer (or its error entry, or EXPIRED / SERVER_ERROR for a batch that expired, was cancelled or
  failed); the policy succeeds the job, moves it on to flex, or fails it. A member whose write fails is
  recorded by a later poll (the batch's hash and pointers are kept until every member is recorded; the
  Batch API keeps the results): a paid answer is never dropped while its job waits for it.

JSON only (no pickle). Errors are redacted (``worker.runner.redacted``) before they reach a record or a log.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google import genai
from google.genai import _common, types
from google.genai import batches as sdk_batches
from redis.exceptions import RedisError

from producer import arq_wire, blobs, transitions
from producer.errors import BlobMissingError, JobNotFoundError
from producer.models import BatchRef, JobRecord, utcnow
from producer.request import GenerateRequest
from producer.status import Outcome, Tier
from producer.store import JobStore
from worker import classify
from worker.config import WorkerConfig
from worker.gemini import Answer, sdk_call_args, to_answer
from worker.logs import get_logger
from worker.runner import Runner, interrupted_attempt, judge, redacted

log = get_logger("flexq.batch")

#: The Batch API refuses an inline batch whose create request passes 20 MB: larger packs go through a file.
INLINE_LIMIT_BYTES = 19_000_000
#: A packer holds its model's lock at most this long (a crashed packer's lock lapses).
PACK_LOCK_S = 300
#: A poller recording a batch's results holds the batch's poll lock this long.
RECORD_LOCK_S = 600
#: Members other than the lead run this many poll intervals apart...
MEMBER_POLL_FACTOR = 10.0
#: ...but at least this often (seconds).
MEMBER_POLL_CAP_S = 600.0
#: The batch's hash and member pointers outlive the Batch API's 48 h limit.
KEEP_S = 3 * 24 * 3600
#: Shortest deferral of a waiting job.
MIN_DEFER_S = 0.05
DISPLAY_NAME_CHARS = 128
#: The SDK's names of the Batch API's job states (``BATCH_STATE_*`` on the wire).
SUCCEEDED = "JOB_STATE_SUCCEEDED"
FAILED = "JOB_STATE_FAILED"
CANCELLED = "JOB_STATE_CANCELLED"
EXPIRED = "JOB_STATE_EXPIRED"
#: Not a Batch API state: ``batches.get`` answered 404 (the batch was deleted, or is older than the API keeps).
GONE = "GONE"
ENDED = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED, GONE})
#: google.rpc.Code -> the HTTP status it stands for (a batch entry's ``error.code`` is a google.rpc.Code).
RPC_HTTP_STATUS: dict[int, int] = {
    1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400, 12: 501,
    13: 500, 14: 503, 15: 500, 16: 401,
}
#: Delete a key only if it still holds the value read (a lock's token, a stale pointer).
_DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
#: Add a job to its pending set unless it has been packed (its pointer exists): -1, else ZADD NX's reply. Atomic
#: with the transaction that writes the pointers and empties the pending set, so a packed job is never pending.
_ADD_PENDING = (
    "if redis.call('exists', KEYS[2]) == 1 then return -1 end "
    "return redis.call('zadd', KEYS[1], 'NX', ARGV[1], ARGV[2])"
)


# -- pure helpers (tests/test_batch_tier.py has their truth tables) -------------------------------


def model_key(model: str) -> str:
    """The model's name as the pending set and the batch's create call use it (no ``models/`` prefix)."""
    return model.removeprefix("models/")


def batch_of(record: JobRecord) -> str | None:
    """The Batch API job the job waits in: its ``batch``, or the open ``batch`` attempt a crash left open."""
    if record.batch is not None:
        return record.batch.name
    opened = record.open_attempt
    if opened is not None and opened.tier == Tier.BATCH and opened.channel:
        return opened.channel
    return None


def packable(record: JobRecord, model: str, now: datetime) -> bool:
    """May the job be packed into a new Batch API job of ``model`` now?"""
    return (
        record.request is not None and not record.terminal and not record.cancel_requested
        and record.next_tier == Tier.BATCH and record.batch is None and record.open_attempt is None
        and model_key(record.request.model) == model and now < record.deadline_at
    )


def waiting_in(record: JobRecord, name: str, enqueues: int) -> bool:
    """Does the job (as packed, its ``enqueues`` then) still wait for the answer of batch ``name``? Not once
    it ended, was cancelled, retried (``flexq retry``), or moved on; yes with the batch's attempt left open."""
    if record.request is None or record.terminal or record.cancel_requested or record.enqueues != enqueues:
        return False
    opened = record.open_attempt
    if opened is not None:
        return opened.tier == Tier.BATCH and opened.channel == name
    return record.next_tier == Tier.BATCH and (record.batch is None or record.batch.name == name)


def entry_http_status(code: int | None) -> int:
    """A batch entry's ``error.code`` as an HTTP status: a google.rpc.Code is mapped, an HTTP status kept."""
    if code is None:
        return 500
    if code >= 100:
        return code
    return RPC_HTTP_STATUS.get(code, 500)


def poll_defer_s(*, lead: bool, poll_s: float, left_s: float) -> float:
    """How long a job waiting in a batch is deferred: the lead polls every ``poll_s``, the others less often;
    never past the deadline (``left_s`` from now), so that a job whose deadline passes ends then."""
    every_s = poll_s if lead else max(poll_s, min(poll_s * MEMBER_POLL_FACTOR, MEMBER_POLL_CAP_S))
    return max(MIN_DEFER_S, min(every_s, left_s + MIN_DEFER_S))


def pack_defer_s(*, oldest_s: float, now_s: float, pack_s: float) -> float:
    """How long a pending job is deferred: until the oldest pending job has waited ``pack_s``."""
    return max(MIN_DEFER_S, min(pack_s, oldest_s + pack_s - now_s))


def batch_verdict(state: str, name: str, message: str | None = None) -> classify.Classified:
    """How a member's attempt ended when its whole batch ended without answers."""
    if state == EXPIRED:
        return classify.Classified(Outcome.EXPIRED, None, f"the Batch API job {name} expired")
    if state == CANCELLED:
        return classify.Classified(Outcome.EXPIRED, None, f"the Batch API job {name} was cancelled")
    if state == GONE:
        return classify.Classified(Outcome.EXPIRED, 404, f"the Batch API job {name} is gone (404)")
    detail = f": {message}" if message else ""
    return classify.Classified(Outcome.SERVER_ERROR, None, f"the Batch API job {name} failed{detail}")


def entry_verdict(entry: types.InlinedResponse | None, name: str) -> classify.Classified | None:
    """A member's entry that is not an answer: missing, or an error. None when it holds a response."""
    if entry is None:
        return classify.Classified(Outcome.SERVER_ERROR, None, f"the Batch API job {name} has no entry for the job")
    if entry.response is not None:
        return None
    if entry.error is None:
        return classify.Classified(Outcome.SERVER_ERROR, None, "its batch entry has neither a response nor an error")
    status = entry_http_status(entry.error.code)
    return classify.Classified(classify.outcome_for_status(status), status, f"{status}: {entry.error.message or ''}")


def parse_responses(data: bytes) -> dict[str, types.InlinedResponse]:
    """A responses file (JSONL: ``{"key", "response"}`` or ``{"key", "error"}`` per line) by key."""
    out: dict[str, types.InlinedResponse] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            log.warning("batch_response_unreadable", detail="a responses file line is not JSON")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        out[entry["key"]] = _inlined_response(entry)
    return out


def _inlined_response(entry: dict[str, Any]) -> types.InlinedResponse:
    """One wire entry (``response`` / ``error``) as the SDK's type, converted as the SDK converts inline ones."""
    converted = sdk_batches._InlinedResponse_from_mldev(entry)
    return types.InlinedResponse._from_response(response=converted, kwargs={})


@dataclass(frozen=True)
class BatchInfo:
    """What flexq keeps of a Batch API job it created (``{queue}:batch:job:{name}``)."""

    name: str
    model: str
    members: tuple[tuple[str, int], ...]  # (job id, its enqueues when packed), lead first
    submitted_at: datetime
    channel: str | None = None
    route: str = "inline"  # inline | file

    @property
    def lead(self) -> str:
        return self.members[0][0]

    def ref(self) -> BatchRef:
        return BatchRef(name=self.name, submitted_at=self.submitted_at, channel=self.channel)

    def to_hash(self) -> dict[str, str]:
        return {
            "name": self.name, "model": self.model, "members": json.dumps(self.members), "lead": self.lead,
            "submitted_at": self.submitted_at.isoformat(), "channel": self.channel or "", "route": self.route,
        }

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> BatchInfo | None:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            members = tuple((str(m[0]), int(m[1])) for m in json.loads(fields["members"]))
            return cls(
                fields["name"], fields["model"], members, datetime.fromisoformat(fields["submitted_at"]),
                fields.get("channel") or None, fields.get("route", "inline"),
            )
        except (KeyError, ValueError, TypeError, IndexError):
            return None


def member_pointer(name: str, enqueues: int) -> str:
    return json.dumps({"name": name, "enqueues": enqueues})


def parse_pointer(raw: bytes | str | None) -> tuple[str, int] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return str(value["name"]), int(value["enqueues"])
    except (ValueError, KeyError, TypeError):
        return None


# -- the tier -----------------------------------------------------------------------------------


class BatchTier:
    """The Batch API route of ``batch``-tier jobs (``Runner.batch``). One per worker process.

    ``client``: the google-genai client of a Gemini API channel (``GeminiClient.sdk``; Vertex AI's batch
    prediction is not supported). ``inline_limit_bytes``: packs whose requests' JSON is larger go through a
    JSONL file (tests make it tiny). ``channel``: the channel's name, kept in each job's ``batch``."""

    def __init__(
        self, client: genai.Client, settings: WorkerConfig, *, channel: str | None = None,
        inline_limit_bytes: int = INLINE_LIMIT_BYTES, rand: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.settings = settings
        self.channel = channel
        self.inline_limit_bytes = inline_limit_bytes
        self.rand = rand

    async def run(self, runner: Runner, record: JobRecord, raw: bytes) -> float | None:
        """One run of a ``batch``-tier job: wait to be packed, pack, poll, or record; its deferral."""
        try:
            return await self._run(runner, record, raw)
        except (RedisError, OSError) as err:  # the job keeps its arq job: it runs again after the deferral
            log.warning("batch_run_failed", job_id=record.id, error=f"{type(err).__name__}: {err}")
            return self._jitter(min(self.settings.batch_pack_s, self.settings.batch_poll_s))

    async def _run(self, runner: Runner, record: JobRecord, raw: bytes) -> float | None:
        name = batch_of(record)
        if record.cancel_requested or (name is None and utcnow() >= record.deadline_at):
            return await self._settle(runner, record, raw)
        if name is None:
            adopted = await self._adopt(runner.store, record)
            if adopted is None:
                return await self._pending(runner, record)
            record, name = adopted, batch_of(adopted)
            assert name is not None
        return await self._waiting(runner, record, name)

    # -- ending without a batch ------------------------------------------------------------------

    async def _settle(self, runner: Runner, record: JobRecord, raw: bytes) -> float | None:
        """A cancel asked for, or the deadline passed before the job was packed (``transitions.settle``)."""
        now = utcnow()

        def decide(current: JobRecord) -> transitions.Change[None] | None:
            if current.terminal:
                return None
            settled = transitions.settle(current, now=now, reason="cancelled while waiting in a batch")
            counted = interrupted_attempt(current, settled)
            return transitions.Change(settled, counted=counted) if settled is not current else None

        change = await runner.store.update(record.id, decide, current=raw)
        await self._forget(runner.store, record)
        if change is None or not change.record.terminal:
            return None if change is None else MIN_DEFER_S
        runner.log_terminal(change.record)
        return None

    async def _forget(self, store: JobStore, record: JobRecord) -> None:
        if record.request is None:
            return
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(store.keys.batch_pending(model_key(record.request.model)), record.id)
            pipe.delete(store.keys.batch_member(record.id))
            await pipe.execute()

    # -- pending ---------------------------------------------------------------------------------

    async def _adopt(self, store: JobStore, record: JobRecord) -> JobRecord | None:
        """A job packed into a batch whose record a crash left without it: its pointer says which."""
        key = store.keys.batch_member(record.id)
        raw = await store.redis.get(key)
        if raw is None:
            return None
        pointer = parse_pointer(raw)
        info = await self._info(store, pointer[0]) if pointer is not None and pointer[1] == record.enqueues else None
        if pointer is None or info is None:  # stale: from before a `flexq retry`, or its batch is forgotten
            await store.redis.eval(_DELETE_IF, 1, key, raw)  # type: ignore[misc]
            return None
        now = utcnow()

        def decide(current: JobRecord) -> transitions.Change[None] | None:
            if not waiting_in(current, info.name, pointer[1]) or batch_of(current) is not None:
                return None
            return transitions.Change(transitions.packed(current, ref=info.ref(), now=now))

        change = await store.update(record.id, decide)
        if change is None:
            return None
        log.info("batch_adopted", job_id=record.id, batch=info.name)
        return change.record

    async def _pending(self, runner: Runner, record: JobRecord) -> float | None:
        assert record.request is not None
        store, model = runner.store, model_key(record.request.model)
        pending = store.keys.batch_pending(model)
        now_s = time.time()
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.eval(_ADD_PENDING, 2, pending, store.keys.batch_member(record.id), repr(now_s), record.id)
            pipe.zcard(pending)
            pipe.zrange(pending, 0, 0, withscores=True)
            added, count, oldest = await pipe.execute()
        if added == -1:  # packed meanwhile: its next run adopts the batch
            return MIN_DEFER_S
        if added:
            log.info("batch_pending", job_id=record.id, model=model, pending=count)
        oldest_s = float(oldest[0][1]) if oldest else now_s
        pack_s = self.settings.batch_pack_s
        if count < self.settings.batch_max_jobs and now_s - oldest_s < pack_s:
            return self._jitter(pack_defer_s(oldest_s=oldest_s, now_s=now_s, pack_s=pack_s))
        if not await self._pack(runner, model):
            return self._jitter(pack_s / 4)  # another worker is packing
        try:
            after = await store.get(record.id)
        except JobNotFoundError:
            return None
        if after.terminal:
            return None
        name = batch_of(after)
        if name is None:
            return self._jitter(pack_s)  # not packed (the create call failed): try again later
        return await self._defer_waiting(store, after, name)

    async def _pack(self, runner: Runner, model: str) -> bool:
        """Pack the oldest pending jobs of ``model`` into one Batch API job; False if another worker packs."""
        redis, lock, token = runner.store.redis, runner.store.keys.batch_lock(f"pack:{model}"), uuid.uuid4().hex
        if not await redis.set(lock, token, nx=True, ex=PACK_LOCK_S):
            return False
        try:
            await self._pack_locked(runner, model)
        finally:
            try:
                await redis.eval(_DELETE_IF, 1, lock, token)  # type: ignore[misc]
            except RedisError as err:  # it lapses by itself
                log.warning("batch_unlock_failed", lock=lock, error=f"{type(err).__name__}: {err}")
        return True

    async def _pack_locked(self, runner: Runner, model: str) -> None:
        store = runner.store
        pending = store.keys.batch_pending(model)
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in await store.redis.zrange(
            pending, 0, self.settings.batch_max_jobs - 1)]
        chosen = await self._choose(store, model, ids)
        requests: list[tuple[JobRecord, GenerateRequest]] = []
        for record in chosen:
            assert record.request is not None
            try:
                requests.append((record, await _sendable(store, record.request)))
            except BlobMissingError as err:  # not a call: the request cannot be sent as it was enqueued
                await store.redis.zrem(pending, record.id)
                verdict = classify.Classified(Outcome.CLIENT_ERROR, None, f"the request cannot be sent: {err}")
                await self._close(runner, record.id, record.enqueues, None, verdict)
        if requests:
            await self._create(runner, model, requests)

    async def _choose(self, store: JobStore, model: str, ids: list[str]) -> list[JobRecord]:
        """The pending jobs that may be packed; the others leave the pending set (ended, moved on, packed)."""
        if not ids:
            return []
        now = utcnow()
        records = await store.get_many(ids)
        pointers = await store.redis.mget([store.keys.batch_member(job_id) for job_id in ids])
        chosen: list[JobRecord] = []
        dropped: list[str] = []
        for job_id, record, raw_pointer in zip(ids, records, pointers, strict=True):
            pointer = parse_pointer(raw_pointer)
            if record is None or not packable(record, model, now) or (pointer and pointer[1] == record.enqueues):
                dropped.append(job_id)  # a past-deadline job ends on its own next run
            else:
                chosen.append(record)
        if dropped:
            await store.redis.zrem(store.keys.batch_pending(model), *dropped)
        return chosen

    async def _create(self, runner: Runner, model: str, requests: list[tuple[JobRecord, GenerateRequest]]) -> None:
        store = runner.store
        inlined = [inlined_request(record.id, request) for record, request in requests]
        wire = [wire_request(self.client, item) for item in inlined]
        size = sum(len(json.dumps(item, separators=(",", ":")).encode()) for item in wire)
        route = "file" if size > self.inline_limit_bytes else "inline"
        display = f"flexq {store.keys.queue} {model} {requests[0][0].id} +{len(requests) - 1}"[:DISPLAY_NAME_CHARS]
        try:
            src: Any = inlined if route == "inline" else await self._upload(requests, wire, display)
            job = await self.client.aio.batches.create(
                model=model, src=src, config=types.CreateBatchJobConfig(display_name=display)
            )
        except Exception as exc:  # classified; a transient failure leaves the jobs pending, to be packed again
            await self._not_created(runner, model, requests, redacted(classify.classify_exception(exc)))
            return
        if not job.name:
            log.error("batch_create_unnamed", model=model, jobs=len(requests))
            return
        submitted_at = job.create_time or utcnow()
        info = BatchInfo(
            job.name, model, tuple((record.id, record.enqueues) for record, _ in requests),
            submitted_at if submitted_at.tzinfo else submitted_at.replace(tzinfo=UTC), self.channel, route,
        )
        await runner.through_outage(lambda: self._remember(store, info), batch=info.name)
        log.info("batch_created", batch=info.name, model=model, jobs=len(info.members), route=route, bytes=size,
                 display_name=display)
        now = utcnow()
        for record, _ in requests:
            await self._mark_packed(store, record, info, now)

    async def _upload(self, requests: list[tuple[JobRecord, GenerateRequest]], wire: list[dict[str, Any]],
                      display: str) -> str:
        lines = "".join(
            json.dumps({"key": record.id, "request": item["request"]}, separators=(",", ":")) + "\n"
            for (record, _), item in zip(requests, wire, strict=True)
        )
        uploaded = await self.client.aio.files.upload(
            file=io.BytesIO(lines.encode()), config=types.UploadFileConfig(mime_type="jsonl", display_name=display)
        )
        if not uploaded.name:
            raise RuntimeError("the Files API gave the uploaded requests no name")
        return uploaded.name

    async def _not_created(self, runner: Runner, model: str, requests: list[tuple[JobRecord, GenerateRequest]],
                           verdict: classify.Classified) -> None:
        if verdict.outcome not in classify.PERMANENT:
            log.warning("batch_create_failed", model=model, jobs=len(requests), outcome=str(verdict.outcome),
                        error=verdict.message, detail="the jobs stay pending")
            return
        log.error("batch_create_refused", model=model, jobs=len(requests), outcome=str(verdict.outcome),
                  error=verdict.message)
        await runner.store.redis.zrem(runner.store.keys.batch_pending(model), *[r.id for r, _ in requests])
        for record, _ in requests:
            await self._close(runner, record.id, record.enqueues, None, verdict)

    async def _remember(self, store: JobStore, info: BatchInfo) -> None:
        """The batch's hash and its members' pointers, and the members out of the pending set: at once."""
        async with store.redis.pipeline(transaction=True) as pipe:
            pipe.hset(store.keys.batch(info.name), mapping=info.to_hash())
            pipe.expire(store.keys.batch(info.name), KEEP_S)
            for job_id, enqueues in info.members:
                pipe.set(store.keys.batch_member(job_id), member_pointer(info.name, enqueues), ex=KEEP_S)
            pipe.zrem(store.keys.batch_pending(info.model), *[job_id for job_id, _ in info.members])
            await pipe.execute()

    async def _mark_packed(self, store: JobStore, record: JobRecord, info: BatchInfo, now: datetime) -> None:
        def decide(current: JobRecord) -> transitions.Change[None] | None:
            if not waiting_in(current, info.name, record.enqueues) or batch_of(current) is not None:
                return None
            return transitions.Change(transitions.packed(current, ref=info.ref(), now=now))

        try:
            await store.update(record.id, decide)
        except (RedisError, OSError, JobNotFoundError) as err:  # its pointer makes its next run adopt the batch
            log.warning("batch_mark_failed", job_id=record.id, batch=info.name, error=f"{type(err).__name__}: {err}")

    # -- waiting -----------------------------------------------------------------------------------

    async def _waiting(self, runner: Runner, record: JobRecord, name: str) -> float | None:
        store = runner.store
        lock = store.keys.batch_lock(f"poll:{name}")
        if await store.redis.set(lock, runner.worker_name, nx=True, ex=max(1, math.ceil(self.settings.batch_poll_s))):
            recorded = await self._poll(runner, record, name, lock)
            if record.id in recorded:
                return recorded[record.id]
        if utcnow() >= record.deadline_at:  # the batch has not answered in time
            ref = record.batch or BatchRef(name=name, submitted_at=utcnow())
            verdict = classify.Classified(Outcome.EXPIRED, None, f"the deadline passed while its Batch API job {name} "
                                          "was still running")
            done, deferral = await self._close(runner, record.id, record.enqueues, ref, verdict)
            return deferral if done else None
        return await self._defer_waiting(store, record, name)

    async def _defer_waiting(self, store: JobStore, record: JobRecord, name: str) -> float:
        lead: bytes | None = await store.redis.hget(store.keys.batch(name), "lead")  # type: ignore[misc]
        is_lead = lead is None or lead.decode() == record.id  # no hash: the job polls for itself
        left_s = record.deadline_at.timestamp() - time.time()
        return self._jitter(poll_defer_s(lead=is_lead, poll_s=self.settings.batch_poll_s, left_s=left_s))

    async def _poll(self, runner: Runner, record: JobRecord, name: str, lock: str) -> dict[str, float | None]:
        """Look at the batch; if it ended, record every member. The members recorded, with their deferrals."""
        job: types.BatchJob | None = None
        try:
            job = await self.client.aio.batches.get(name=name)
        except Exception as exc:
            verdict = redacted(classify.classify_exception(exc))
            if verdict.http_status != 404:
                log.warning("batch_poll_failed", batch=name, job_id=record.id, error=verdict.message)
                return {}
            state = GONE
        else:
            state = str(job.state.value) if job.state is not None else "JOB_STATE_UNSPECIFIED"
        info = await self._info(runner.store, name)
        await self._note_state(runner.store, name, state, info)
        if state not in ENDED:
            return {}
        await runner.store.redis.expire(lock, RECORD_LOCK_S)  # one poller records the results
        try:
            return await self._record_all(runner, record, name, info, job, state, lock)
        except Exception:
            await runner.store.redis.expire(lock, max(1, math.ceil(self.settings.batch_poll_s)))
            raise

    async def _note_state(self, store: JobStore, name: str, state: str, info: BatchInfo | None) -> None:
        """One log line per state change of a batch (its last seen state is kept in its hash)."""
        if info is None:
            log.info("batch_state", batch=name, state=state, detail="not in Redis: polled for one job")
            return
        before: bytes | None = await store.redis.hget(store.keys.batch(name), "state")  # type: ignore[misc]
        if before is None or before.decode() != state:
            await store.redis.hset(store.keys.batch(name), "state", state)  # type: ignore[misc]
            log.info("batch_state", batch=name, state=state, jobs=len(info.members))

    async def _record_all(
        self, runner: Runner, record: JobRecord, name: str, info: BatchInfo | None, job: types.BatchJob | None,
        state: str, lock: str,
    ) -> dict[str, float | None]:
        store = runner.store
        members = info.members if info is not None else ((record.id, record.enqueues),)
        ref = info.ref() if info is not None else (record.batch or BatchRef(
            name=name, submitted_at=(job.create_time if job is not None and job.create_time else utcnow())))
        try:
            entries = await self._entries(job, members) if state == SUCCEEDED and job is not None else {}
        except Exception as exc:  # e.g. the responses file's download failed: the next poll tries again
            log.warning("batch_results_unread", batch=name, error=redacted(classify.classify_exception(exc)).message)
            await store.redis.expire(lock, max(1, math.ceil(self.settings.batch_poll_s)))
            return {}
        message = job.error.message if job is not None and job.error is not None else None
        if state == FAILED and message is None:
            message = await self._failure_message(name)
        records = await store.get_many([job_id for job_id, _ in members])
        recorded: dict[str, float | None] = {}
        complete = True
        for (job_id, enqueues), current in zip(members, records, strict=True):
            if current is None or not waiting_in(current, name, enqueues):
                continue  # ended, cancelled, retried or recorded already
            assert current.request is not None
            try:
                verdict, answer, parsed = self._verdict(current.request, state, name, message, entries.get(job_id))
                done, deferral = await self._close(runner, job_id, enqueues, ref, verdict, answer, parsed)
            except Exception as err:  # a later poll records it: the batch's hash and the results are kept
                complete = False
                log.error("batch_result_not_recorded", job_id=job_id, batch=name, error=f"{type(err).__name__}: {err}")
                continue
            if done:
                recorded[job_id] = deferral
        await self._wake(store, [job_id for job_id in recorded if job_id != record.id])
        if complete:
            await self._drop(store, name, members, lock)
        else:
            await store.redis.expire(lock, max(1, math.ceil(self.settings.batch_poll_s)))
        log.info("batch_recorded", batch=name, state=state, jobs=len(members), recorded=len(recorded),
                 complete=complete)
        return recorded

    async def _failure_message(self, name: str) -> str | None:
        """A failed batch's ``error.message``, read from the operation itself: the SDK's BatchJob leaves it
        out on the Gemini API. Best effort (None when it cannot be read)."""
        try:
            raw = await self.client._api_client.async_request("get", name, {})
            error = json.loads(raw.body or "{}").get("error")
        except Exception as err:
            log.warning("batch_error_unread", batch=name, error=f"{type(err).__name__}")
            return None
        message = error.get("message") if isinstance(error, dict) else None
        return str(message) if message else None

    async def _entries(
        self, job: types.BatchJob, members: Sequence[tuple[str, int]]
    ) -> dict[str, types.InlinedResponse]:
        """The batch's entries by job id: inline (matched by their metadata key), or from its responses file."""
        dest = job.dest
        if dest is None:
            return {}
        if dest.inlined_responses is not None:
            out: dict[str, types.InlinedResponse] = {}
            for index, entry in enumerate(dest.inlined_responses):
                key = (entry.metadata or {}).get("key")
                if key is None and index < len(members):
                    key = members[index][0]  # no metadata echoed: the API keeps the requests' order
                if key is not None:
                    out[key] = entry
            return out
        if dest.file_name:
            return parse_responses(await self.client.aio.files.download(file=dest.file_name))
        return {}

    @staticmethod
    def _verdict(
        request: GenerateRequest, state: str, name: str, message: str | None, entry: types.InlinedResponse | None
    ) -> tuple[classify.Classified, Answer | None, Any]:
        if state != SUCCEEDED:
            return redacted(batch_verdict(state, name, message)), None, None
        problem = entry_verdict(entry, name)
        if problem is not None:
            return redacted(problem), None, None
        assert entry is not None
        assert entry.response is not None
        answer = to_answer(entry.response)
        classified, parsed = judge(request, answer)
        return redacted(classified), answer, parsed

    async def _close(
        self, runner: Runner, job_id: str, enqueues: int, ref: BatchRef | None, verdict: classify.Classified,
        answer: Answer | None = None, parsed: Any = None,
    ) -> tuple[bool, float | None]:
        """Open the job's ``batch`` attempt (or take the one a crash left open) and record how it ended
        (``Runner.record_outcome``: cost, logs, metrics, cache, the policy). (recorded?, the job's deferral)."""
        now = utcnow()
        left_open: list[int] = []

        def decide(current: JobRecord) -> transitions.Change[int] | None:
            if ref is None:  # not packed (its request cannot be sent, or the create call was refused)
                if not packable(current, model_key(current.request.model) if current.request else "", now) \
                        or current.enqueues != enqueues:
                    return None
                begun = transitions.begin_attempt(current, tier=Tier.BATCH, worker=runner.worker_name, now=now)
                return transitions.Change(begun, decided=begun.attempts[-1].number)
            if not waiting_in(current, ref.name, enqueues):
                return None
            if current.open_attempt is not None:
                left_open.append(current.open_attempt.number)
                return None
            begun = transitions.begin_batch_attempt(current, ref=ref, worker=runner.worker_name, now=now)
            return transitions.Change(begun, decided=begun.attempts[-1].number)

        change = await runner.through_outage(lambda: runner.store.update(job_id, decide), job_id=job_id)
        if change is None and not left_open:
            return False, None
        number = change.decided if change is not None else left_open[-1]
        assert number is not None
        deferral = await runner.record_outcome(
            job_id, number, Tier.BATCH, verdict, answer, parsed=parsed, current=change.written if change else None
        )
        runner.disowned.discard(job_id)  # no arq run of this job was displaced: its arq finish must go on
        return True, deferral

    async def _wake(self, store: JobStore, job_ids: list[str]) -> None:
        """Members whose outcome was recorded run now (to end, or to go on to flex), not at their deferral."""
        if not job_ids:
            return
        now_ms = int(time.time() * 1000)
        async with store.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                arq_wire.wake(pipe, store.keys.queue, job_id, now_ms=now_ms)
            await pipe.execute()

    async def _drop(self, store: JobStore, name: str, members: Sequence[tuple[str, int]], lock: str) -> None:
        """Every member recorded (or gone): the batch's hash and pointers go."""
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.delete(store.keys.batch(name), lock, *[store.keys.batch_member(job_id) for job_id, _ in members])
            await pipe.execute()

    # -- helpers -----------------------------------------------------------------------------------

    async def _info(self, store: JobStore, name: str) -> BatchInfo | None:
        raw: dict[bytes, bytes] = await store.redis.hgetall(store.keys.batch(name))  # type: ignore[misc]
        return BatchInfo.from_hash(raw) if raw else None

    def _jitter(self, delay_s: float) -> float:
        """A deferral spread by up to 10% (jobs deferred together do not all run at the same moment)."""
        return round(delay_s * (1.0 + 0.1 * self.rand()), 3)


# -- requests ---------------------------------------------------------------------------------------


async def _sendable(store: JobStore, request: GenerateRequest) -> GenerateRequest:
    """The request with its inline bytes put back from the blob store (as ``Runner`` sends it)."""
    if not request.contents or not blobs.refs(request.contents):
        return request
    contents = await blobs.fill(request.contents, store.blobs)
    return request.model_copy(update={"contents": contents})


def inlined_request(job_id: str, request: GenerateRequest) -> types.InlinedRequest:
    """The request as one inline request of a batch: what ``generate`` would send, without a tier (the
    batch is the tier), keyed by the job id (``metadata.key``) so that its answer finds the job."""
    _model, contents, config = sdk_call_args(request)
    return types.InlinedRequest(contents=contents, config=config, metadata={"key": job_id})


def wire_request(client: genai.Client, inlined: types.InlinedRequest) -> dict[str, Any]:
    """The inline request as JSON on the wire (``{"request": {...}, "metadata": {...}}``), converted by the
    SDK's own converter: its size decides inline vs file, and a file's lines are these ``request``s."""
    converted = sdk_batches._InlinedRequest_to_mldev(client._api_client, inlined)
    wire: dict[str, Any] = _common.encode_unserializable_types(_common.convert_to_dict(converted))
    return wire
