"""One run of one job: open an attempt, call Gemini, let the policy decide, record it.

Free of arq: ``run`` returns how long to defer (or ``None`` when the job is done) and the arq
task in ``worker.runtime`` turns that into ``Retry(defer=...)``. No sleep on the retry path.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from producer import blobs, cache, transitions
from producer.errors import BlobMissingError, InvalidJobError, JobNotFoundError
from producer.models import Attempt, JobRecord, utcnow
from producer.pricing import cost_usd
from producer.request import DEFAULT_CHANNEL, GenerateRequest
from producer.status import CALL_TIERS, Outcome, Status, Tier
from producer.store import JobStore, Write
from producer.transitions import Cost
from worker import classify, outputs, policy
from worker.budget import BUDGET_EXCEEDED, BudgetStore, Hold, Refusal, applying, estimate_usd, on_refusal
from worker.config import WorkerConfig
from worker.flow import Admission, FlowConfig, Permit, Release, defer_s, estimate_tokens
from worker.flow_store import FlowControl
from worker.gemini import Answer
from worker.logs import get_logger, redact
from worker.metrics import WorkerMetrics, calling

log = get_logger("flexq.worker")
T = TypeVar("T")
#: While Redis is unreachable, a result write is tried again after this long, doubling up to the cap.
REDIS_RETRY_BASE_S = 0.2
REDIS_RETRY_MAX_S = 5.0
#: Shortest per-attempt timeout, even when the deadline is closer.
MIN_ATTEMPT_TIMEOUT_S = 1.0
#: Why a success was recorded into an attempt that had been given up on (its worker lost the lease).
LATE_ANSWER = "answered after its lease was lost; a paid answer is kept while the job is unfinished"


class Generator(Protocol):
    async def generate(self, request: Any, *, tier: Tier, timeout_s: float) -> Answer: ...


class BatchRoute(Protocol):
    """Where ``batch``-tier jobs go (worker.batch_tier): one run of such a job, returning its deferral."""

    #: The channel its Batch API jobs are created on (its price factor applies to their answers).
    channel: str | None

    async def run(self, runner: Runner, record: JobRecord, raw: bytes) -> float | None: ...


@dataclass
class Runner:
    store: JobStore
    gemini: Generator
    settings: WorkerConfig
    worker_name: str
    rand: Callable[[], float] = field(default=random.random)
    #: Job ids whose arq in-progress key this process keeps alive (see worker.lease).
    leases: set[str] = field(default_factory=set)
    #: Jobs this process lost to another worker mid-attempt: arq's finish leaves their arq state alone.
    disowned: set[str] = field(default_factory=set)
    #: Jobs whose arq run this process ended in the attempt's record write (claimed runs, see
    #: ``worker.runtime``): arq's own finish of that run is skipped.
    arq_ended: set[str] = field(default_factory=set)
    #: Shared flow control (AIMD permits, breaker, 429 pauses, RPM/TPM); None when FLEXQ_FLOW=0.
    flow: FlowControl | None = None
    #: This process's Prometheus metrics (FLEXQ_METRICS_PORT); None when not served.
    metrics: WorkerMetrics | None = None
    #: Spending limits (FLEXQ_BUDGETS); None when there are none.
    budget: BudgetStore | None = None
    #: The Batch API route of ``batch``-tier jobs; None: such jobs move on to flex or fail (no Batch API).
    batch: BatchRoute | None = None
    #: Channel name -> its client, in preference order (FLEXQ_CHANNELS); empty: ``gemini`` is the one
    #: ``default`` channel.
    clients: dict[str, Generator] = field(default_factory=dict)
    #: Channel name -> what it charges relative to list prices (1.0 when not given).
    price_factors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = BudgetStore.of(self.store.redis, self.store.keys, self.settings)

    async def run(self, job_id: str, *, raw: bytes | None = None, claimed: bool = False) -> float | None:
        """Run one attempt of ``job_id``. Returns the deferral in seconds, or None when done.
        ``claimed``: the worker read the record as it claimed the job (``raw``, None when there was none)."""
        try:
            raw = raw if claimed else await self.store.get_raw(job_id)
            if raw is None:  # claimed, and the record is gone
                raise JobNotFoundError(job_id)
            record = self.store.parse(job_id, raw)
            if await self._from_cache(record, raw):
                return None  # answered from the response cache: no permit, no call
            if record.next_tier == Tier.BATCH and record.request is not None and not record.terminal:
                return await self._batch(record, raw)
            channels = self._channels_for(record)
            if not channels:
                await self._no_channel(record)
                return None
            hold: Hold | None = None
            # a claimed run's in-progress key was set to the lease as the worker claimed it (worker/lua/claim.lua)
            admission, channel, begun = await self._admit_and_begin(record, raw, channels, lease=not claimed)
            if admission is not None and not admission.admitted:
                assert self.flow is not None
                delay_s = defer_s(admission, self.flow.cfg, self.rand)  # no permit: not an attempt
                if admission.reason == "paused" and await self._pause_outlasts_deadline(job_id, delay_s):
                    return None
                return delay_s
            permit = admission.permit if admission is not None else None
            if begun is not None:  # admitted and opened in one call (no budget applies)
                record, opened, written = begun
            else:
                reserved = await self._reserve(record)
                if isinstance(reserved, Refusal):  # over a budget: not an attempt
                    await self._release(permit, None)
                    return await self._over_budget(record, reserved)
                hold = reserved
                record, opened, written = await self._begin(job_id, raw, channel, parsed=record, lease=not claimed)
        except JobNotFoundError:
            log.warning("job_missing", job_id=job_id, detail="no record (expired or never enqueued)")
            return None
        except InvalidJobError as err:
            log.error("job_invalid", job_id=job_id, reason=err.reason)
            await self.store.quarantine(job_id, err.reason)
            return None
        if not opened:
            await self._release(permit, None)
            await self._settle(hold, None)
            return None
        attempt = record.attempts[-1]
        self.leases.add(job_id)
        try:
            return await self._attempt(record, attempt.number, attempt.tier, permit, written, hold, end_run=claimed)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(permit, Outcome.INTERRUPTED))
            await asyncio.shield(self._settle(hold, None))
            await asyncio.shield(self._interrupted(job_id, attempt.number))
            raise
        finally:
            self.leases.discard(job_id)

    async def _batch(self, record: JobRecord, raw: bytes) -> float | None:
        """A ``batch``-tier job: packed into a Batch API job, polled, answered (worker.batch_tier). Without
        a Batch API (only Vertex AI channels), an attempt says so and the job moves on to flex or fails."""
        if self.batch is not None:
            return await self.batch.run(self, record, raw)
        record, opened, written = await self._begin(record.id, raw)
        if not opened:
            return None
        reason = "no channel has the Gemini Batch API (Vertex AI batch prediction is not supported)"
        classified = classify.Classified(Outcome.EXPIRED, None, reason)
        return await self.record_outcome(record.id, record.attempts[-1].number, Tier.BATCH, classified, None,
                                         current=written)

    @property
    def channel_names(self) -> list[str]:
        """This worker's channels in preference order."""
        return list(self.clients) or [DEFAULT_CHANNEL]

    def _channels_for(self, record: JobRecord) -> list[str]:
        """The job's channels to try, in order: its own preference among this worker's channels, else all."""
        if record.channels is None:
            return self.channel_names
        return [name for name in record.channels if name in self.channel_names]

    async def _no_channel(self, record: JobRecord) -> None:
        """None of the job's channels is configured on this worker: a configuration error, failed at once."""
        message = (f"none of the job's channels ({', '.join(record.channels or [])}) is a channel of this worker "
                   f"(FLEXQ_CHANNELS: {', '.join(self.channel_names)})")
        now = utcnow()

        def decide(current: JobRecord) -> transitions.Change[None] | None:
            if current.terminal:
                return None
            settled = transitions.settle(current, now=now, reason="no channel to run on")  # a cancel comes first
            if settled.terminal:
                return transitions.Change(settled, counted=interrupted_attempt(current, settled))
            return transitions.Change(transitions.fail(settled, kind="unknown_channel", message=message, now=now),
                                      counted=interrupted_attempt(current, settled))

        change = await self.store.update(record.id, decide)
        if change is not None:
            self.log_terminal(change.record)
        return None

    async def _admit_and_begin(
        self, record: JobRecord, raw: bytes, channels: list[str], *, lease: bool
    ) -> tuple[Admission | None, str, tuple[JobRecord, bool, str | None] | None]:
        """The admission (``_admit``) and the channel; with them, when flow control could open the attempt
        in the same call, what ``_begin`` returns (else None: the caller opens it)."""
        folded = await self._admit_opening(record, raw, channels, lease=lease)
        if folded is not None:
            return folded
        admission, channel = await self._admit(record, channels)
        return admission, channel, None

    async def _admit_opening(
        self, record: JobRecord, raw: bytes, channels: list[str], *, lease: bool
    ) -> tuple[Admission, str, tuple[JobRecord, bool, str | None] | None] | None:
        """Flow control's permit and the attempt's opening in one call (``FlowControl.acquire(write=...)``)
        when nothing stands between them: one channel, no budget applies, the job would run. Returns the
        admission, the channel and, if admitted, what ``_begin`` returns; None: take the separate steps."""
        if (
            self.flow is None or len(channels) != 1 or not _will_call(record)
            or (self.budget is not None and applying(self.budget.budgets, record.tags))
        ):
            return None
        channel = channels[0]
        write = self.store.prepare(record.id, self._opening(utcnow(), channel, lease=lease), raw, record)
        if write is None or write.change.record.status != Status.RUNNING:
            return None  # the job ends instead (settled): no permit needed
        admission = await self._acquire(record, channel, write)
        if not admission.admitted:
            return admission, channel, None
        if admission.written == 1:
            return admission, channel, (write.change.record, True, write.change.written)
        if admission.written == -1:
            await self._release(admission.permit, None)
            raise JobNotFoundError(record.id)
        return admission, channel, await self._begin(record.id, None, channel, lease=lease)  # changed: read again

    async def _admit(self, record: JobRecord, channels: list[str]) -> tuple[Admission | None, str]:
        """Ask flow control for a permit on the job's first channel that is neither open nor paused, unless
        the job will not call (ended, cancelled, past deadline). Also the channel chosen."""
        job_id = record.id
        if self.flow is None or not _will_call(record):
            return None, channels[0]
        refused: list[tuple[Admission, str]] = []
        for channel in channels:
            admission = await self._acquire(record, channel)
            if admission.admitted:
                if refused:
                    log.info("failover", job_id=job_id, channel=channel,
                             skipped=[f"{name}:{a.reason}" for a, name in refused])
                return admission, channel
            if admission.reason not in FAILOVER_REASONS:
                return admission, channel  # usable but busy: the job waits in line on this channel
            refused.append((admission, channel))
        # every channel open or paused: wait for the one whose refusal ends first
        return min(refused, key=lambda item: item[0].wait_s)

    async def _acquire(self, record: JobRecord, channel: str, write: Write[Any] | None = None) -> Admission:
        """Flow control's admission of the job's next attempt on ``channel`` (carrying ``write``, if any)."""
        assert self.flow is not None
        assert record.request is not None
        est = estimate_tokens(record.request, output_tokens_default=self.flow.cfg.output_tokens_default)
        return await self.flow.acquire(
            record.id, record.request.model, str(record.next_tier), est, since_s=record.created_at.timestamp(),
            channel=channel, write=write,
        )

    async def _reserve(self, record: JobRecord) -> Hold | Refusal | None:
        """Reserve the attempt's estimated cost against the job's budgets (None: none apply, or no call)."""
        if self.budget is None or record.request is None or not _will_call(record):
            return None
        budgets = applying(self.budget.budgets, record.tags)
        if not budgets:
            return None
        default = self.flow.cfg.output_tokens_default if self.flow is not None else FlowConfig().output_tokens_default
        usd = estimate_usd(record.request, record.next_tier, output_tokens_default=default)
        return await self.budget.reserve(record.id, budgets, usd or 0.0)  # an unknown price reserves 0

    async def _settle(self, hold: Hold | None, usd: float | None) -> None:
        """Replace a reservation by the actual cost (None: nothing was billed to the record)."""
        if self.budget is None or hold is None:
            return
        try:
            await self.budget.settle(hold, usd or 0.0)
        except Exception as err:  # the reservation lapses by itself; the attempt is recorded regardless
            log.warning("budget_settle_failed", job_id=hold.id.rpartition(":")[0], error=f"{type(err).__name__}: {err}")

    async def _over_budget(self, record: JobRecord, refusal: Refusal) -> float | None:
        """A job over one of its budgets waits for the budget's window to end, or fails if that is too late."""
        verdict = on_refusal(refusal, deadline_s=record.deadline_at.timestamp(), now_s=time.time(), rand=self.rand)
        if verdict.wait_s is not None:
            log.info("budget_wait", job_id=record.id, budget=refusal.budget.name, wait_s=verdict.wait_s,
                     detail=verdict.message)
            return verdict.wait_s
        now = utcnow()

        def decide(current: JobRecord) -> transitions.Change[None] | None:
            if current.terminal:
                return None
            return transitions.Change(transitions.fail(current, kind=BUDGET_EXCEEDED, message=verdict.message, now=now))

        change = await self.store.update(record.id, decide)
        if change is not None:
            self.log_terminal(change.record)
        return None

    async def _from_cache(self, record: JobRecord, raw: bytes) -> bool:
        """A job that opted in to the response cache and whose request was answered lately succeeds
        with that answer (a ``cached`` attempt, no cost). False when there is nothing to do so."""
        if not record.cache or record.request is None or record.terminal or record.cancel_requested:
            return False
        key = cache.request_key(record.request)
        hit = cache.load(found) if (found := await self.store.redis.get(self.store.keys.cache(key))) else None
        if hit is None:
            return False
        if hit.images:  # the answer's images must outlive the record that now refers to them
            await self.store.blobs.touch({image.sha256 for image in hit.images}, ttl_s=self.store.retention_s)
        now = utcnow()

        def decide(current: JobRecord) -> transitions.Change[None] | None:
            if current.terminal or current.cancel_requested or current.open_attempt is not None:
                return None
            done = transitions.answer_from_cache(
                current, result=hit, tier=current.next_tier, worker=self.worker_name, now=now
            )
            return transitions.Change(done, counted=(done.attempts[-1],))

        change = await self.store.update(record.id, decide, current=raw)
        if change is None:
            return False
        log.info("attempt", job_id=record.id, attempt=change.record.attempts[-1].number, outcome=str(Outcome.CACHED),
                 tier=str(change.record.attempts[-1].tier), job_status=str(change.record.status), cost_usd=0.0,
                 cache_key=key[:16])
        return True

    async def _keep_in_cache(self, record: JobRecord) -> None:
        """Store a fresh answer of a job that opted in to the response cache (best effort)."""
        if not record.cache or record.request is None or record.result is None or self.settings.cache_ttl_s <= 0:
            return
        try:
            await self.store.redis.set(
                self.store.keys.cache(cache.request_key(record.request)), cache.dump(record.result),
                ex=self.settings.cache_ttl_s,
            )
        except RedisError as err:  # the job has succeeded; a missed cache entry costs one call later
            log.warning("cache_write_failed", job_id=record.id, error=f"{type(err).__name__}: {err}")

    async def _pause_outlasts_deadline(self, job_id: str, delay_s: float) -> bool:
        """A model paused (a 429, or ``flexq pause``) past this job's deadline: fail the job now rather
        than let it wait the pause out. The pause covers both tiers (one project quota): no fallback."""
        now = utcnow()

        def decide(record: JobRecord) -> transitions.Change[None] | None:
            if record.terminal or now.timestamp() + delay_s < record.deadline_at.timestamp():
                return None
            message = f"its model is paused for {delay_s:.0f}s more (a 429 or `flexq pause`), past the deadline"
            return transitions.Change(transitions.fail(record, kind="deadline_exceeded", message=message, now=now))

        change = await self.store.update(job_id, decide)
        if change is not None:
            self.log_terminal(change.record)
        return change is not None

    async def _release(
        self, permit: Permit | None, outcome: Outcome | None, classified: classify.Classified | None = None,
        answer: Answer | None = None, write: Write[Any] | None = None,
    ) -> Release | None:
        if self.flow is None or permit is None:
            return None
        try:
            return await self.flow.release(
                permit, str(outcome) if outcome is not None else None,
                retry_after_s=classified.retry_after_s if classified else None,
                quota=str(classified.quota) if classified and classified.quota else None,
                used_tokens=answer.usage.total_tokens if answer is not None else None,
                reason=(classified.quota_id or "") if classified else "",
                write=write,
            )
        except Exception as err:  # the permit lapses by TTL; the attempt itself must still be recorded
            log.warning("flow_release_failed", job_id=permit.job_id, error=f"{type(err).__name__}: {err}")
            return None

    # -- begin ----------------------------------------------------------------------------------

    async def _begin(
        self, job_id: str, current: bytes | None = None, channel: str | None = None, *,
        parsed: JobRecord | None = None, lease: bool = True,
    ) -> tuple[JobRecord, bool, str | None]:
        """Open an attempt, unless the job has ended or must end first (``transitions.settle``).
        Returns the record, whether an attempt is open, and the record's text as written. ``lease``: also
        set the run's lease (False: the worker's claim set it a moment ago)."""
        change = await self.store.update(
            job_id, self._opening(utcnow(), channel, lease=lease), current=current, parsed=parsed)
        if change is None:
            return await self.store.get(job_id), False, None
        if change.record.terminal:
            self.log_terminal(change.record)
        return change.record, change.record.status == Status.RUNNING, change.written

    def _opening(
        self, now: datetime, channel: str | None, *, lease: bool = True
    ) -> Callable[[JobRecord], transitions.Change[None] | None]:
        """The decision that opens an attempt on ``channel`` (or ends the job first: ``transitions.settle``)."""

        def decide(record: JobRecord) -> transitions.Change[None] | None:
            if record.request is None or record.terminal:
                return None  # quarantined, or already finished / cancelled: nothing to run
            settled = transitions.settle(
                record, now=now, reason="worker died or lost its lease", max_interrupts=self.settings.max_interrupts
            )
            counted = interrupted_attempt(record, settled)
            if settled.terminal:
                return transitions.Change(settled, counted=counted)
            begun = transitions.begin_attempt(
                settled, tier=settled.next_tier, worker=self.worker_name, now=now, channel=channel
            )
            # a short lease, renewed by this process, not arq's job-timeout-long one
            return transitions.Change(begun, counted=counted, lease_s=self.settings.lease_s if lease else None)

        return decide

    # -- attempt --------------------------------------------------------------------------------

    async def _attempt(
        self, record: JobRecord, number: int, tier: Tier, permit: Permit | None, written: str | None = None,
        hold: Hold | None = None, *, end_run: bool = False,
    ) -> float | None:
        assert record.request is not None
        left_s = record.deadline_at.timestamp() - time.time()
        timeout_s = max(MIN_ATTEMPT_TIMEOUT_S, min(self.settings.request_timeout_s, left_s))
        answer: Answer | None = None
        parsed: Any = None
        try:
            request = await self._sendable(record.request)
            client = self.clients.get(record.attempts[number - 1].channel or DEFAULT_CHANNEL, self.gemini)
            with calling(self.metrics, record.request.model, str(tier)):
                answer = await client.generate(request, tier=tier, timeout_s=timeout_s)
        except asyncio.CancelledError:
            raise
        except BlobMissingError as err:  # not a call: the request cannot be sent as it was enqueued
            classified = classify.Classified(Outcome.CLIENT_ERROR, None, f"the request cannot be sent: {err}")
        except Exception as exc:  # every failure is classified; none escapes to arq
            classified = classify.classify_exception(exc)
        else:
            classified, parsed = judge(record.request, answer)
        classified = redacted(classified)
        if permit is not None and not _has_blobs(classified, answer):
            # the permit back and the outcome recorded in one call (an answer's blobs are stored first)
            return await self._finish(record.id, number, tier, classified, answer, None, parsed, written, hold,
                                      end_run=end_run, current_record=record, permit=permit)
        learned = await self._release(permit, classified.outcome, classified, answer)
        return await self.record_outcome(
            record.id, number, tier, classified, answer, learned.verdict if learned else None, parsed, written, hold,
            end_run=end_run, current_record=record,
        )

    async def record_outcome(
        self, job_id: str, number: int, tier: Tier, classified: classify.Classified, answer: Answer | None,
        verdict: str | None = None, parsed: Any = None, current: str | None = None, hold: Hold | None = None,
        *, end_run: bool = False, current_record: JobRecord | None = None,
    ) -> float | None:
        """Record how open attempt ``number`` ended (its answer's bytes first) and apply the policy's
        decision; the deferral, or None when the job is done. Also the Batch API's way in (worker.batch_tier).
        ``end_run``: when the job ends, end its arq run in that write (``arq_ended``), unless another owns it."""
        if _has_blobs(classified, answer):
            assert answer is not None
            # the bytes go in first: a record never refers to a blob that is not there
            blobs_ = answer.blobs
            await self.through_outage(lambda: self.store.blobs.put(blobs_, ttl_s=self.store.retention_s), job_id=job_id)
        return await self._finish(job_id, number, tier, classified, answer, verdict, parsed, current, hold,
                                  end_run=end_run, current_record=current_record)

    async def _sendable(self, request: GenerateRequest) -> GenerateRequest:
        """The request with its inline bytes put back from the blob store (a no-op for most requests)."""
        if not request.contents or not blobs.refs(request.contents):
            return request
        contents = await blobs.fill(request.contents, self.store.blobs)
        return request.model_copy(update={"contents": contents})

    def _budget(self, record: JobRecord, tier: Tier, now_s: float) -> policy.RetryBudget:
        on_tier = [a for a in record.attempts if a.tier == tier and a.outcome in classify.RETRYABLE]
        flex = [a for a in record.attempts if a.tier == Tier.FLEX and a.outcome != Outcome.INTERRUPTED]
        unusable = [a for a in record.attempts if a.outcome in classify.UNUSABLE]
        return policy.RetryBudget(
            now_s=now_s,
            deadline_s=record.deadline_at.timestamp(),
            fallback=record.fallback,
            tier=tier,
            tier_failures=len(on_tier),
            flex_attempts=len(flex),
            output_failures=len(unusable),
            max_output_retries=self.settings.max_output_retries,
            max_flex_attempts=self.settings.max_flex_attempts,
            base_s=self.settings.retry_base_s,
            cap_s=self.settings.retry_max_s,
            overload_base_s=self.flow.cfg.shed_backoff_base_s if self.flow is not None else None,
            overload_cap_s=self.flow.cfg.shed_backoff_max_s if self.flow is not None else None,
            unreachable_since_s=_unreachable_since_s(record),
            unreachable_fail_s=self.settings.unreachable_fail_s,
        )

    async def _finish(
        self, job_id: str, number: int, tier: Tier, classified: classify.Classified, answer: Answer | None,
        verdict: str | None = None, parsed: Any = None, current: str | None = None,
        hold: Hold | None = None, *, end_run: bool = False, current_record: JobRecord | None = None,
        permit: Permit | None = None,
    ) -> float | None:
        """Close the attempt and apply the policy's decision; the deferral, or None when done.
        ``current``: the record's text as the attempt's start wrote it (most often still current)."""
        now = utcnow()

        def decide(record: JobRecord) -> transitions.Change[policy.Decision] | None:
            closing = _close(record, number, classified, answer, now)
            if closing is None:
                return None  # the job's newer attempt, or its end, owns it
            closed, superseded, late = closing
            decision = policy.decide(classified, self._budget(closed, tier, now.timestamp()), self.rand)
            if late:
                decision = replace(decision, reason=LATE_ANSWER)
            ended = end_run and not late  # the job's end ends this arq run in the same write
            if decision.action == policy.Action.SUCCEED and answer is not None:
                cost = self._cost(closed, number, tier, answer)
                result = answer.result(str(tier), parsed)
                done = transitions.succeed(
                    closed, result=result, now=now, cost_usd=cost.usd, standard_cost_usd=cost.standard_usd
                )
                return transitions.Change(
                    done, decided=decision, counted=(done.attempts[number - 1], *superseded), cost=cost,
                    abort=bool(superseded),  # a newer attempt's call is still running: stop it
                    end_run=ended,
                )
            if decision.action == policy.Action.RETRY:
                closed.attempts[-1].retry_in_s = decision.delay_s  # this function's own copy
                retrying = transitions.schedule_retry(closed, next_tier=decision.tier, now=now)
                # deferred: arq re-scores the job (``Retry(defer=...)``, worker.runtime)
                return transitions.Change(retrying, decided=decision, counted=(retrying.attempts[-1],))
            failed = transitions.fail(
                closed, kind=decision.error_kind or "failed", message=decision.reason, now=now,
                http_status=classified.http_status,
            )
            return transitions.Change(failed, decided=decision, counted=(failed.attempts[-1],), end_run=ended)

        change: transitions.Change[policy.Decision] | None = None
        if permit is not None:  # release the permit, with the record's change when its text is known
            change, verdict = await self._release_writing(permit, classified, answer, decide, current, current_record)
        if change is None:  # no permit, the record changed meanwhile, or the release failed: write it alone
            change = await self.through_outage(
                lambda: self.store.update(job_id, decide, current=current, parsed=current_record), job_id=job_id
            )
        await self._settle(hold, _billed_usd(change))
        if change is None:
            log.warning("lease_lost", job_id=job_id, attempt=number, outcome=str(classified.outcome),
                        detail="outcome not recorded: a newer attempt, or the job's end, owns the job")
            self.disowned.add(job_id)  # arq's finish must not touch the new owner's arq state
            return None
        decision = change.decided
        assert decision is not None
        if change.end_run:
            self.arq_ended.add(job_id)
        if decision.reason == LATE_ANSWER:
            log.warning("late_answer_kept", job_id=job_id, attempt=number, detail=LATE_ANSWER)
        self._log_attempt(change.record, classified, decision, verdict)  # with the job's end, if it ended
        if self.metrics is not None:
            self.metrics.attempt(change.record, number)
        if decision.action == policy.Action.SUCCEED:
            await self._keep_in_cache(change.record)
        return decision.delay_s if decision.action == policy.Action.RETRY else None

    def _cost(self, closed: JobRecord, number: int, tier: Tier, answer: Answer) -> Cost:
        """What a successful attempt's answer cost, billed as served (a flex request the API served, and
        bills, at standard costs standard) and times its channel's price factor."""
        assert closed.request is not None
        model = closed.request.model
        billed = Tier(answer.served_tier) if answer.served_tier in CALL_TIERS else tier
        channel = closed.attempts[number - 1].channel  # a batch attempt's: its batch's name
        if tier == Tier.BATCH:
            channel = self.batch.channel if self.batch is not None else None
        factor = self.price_factors.get(channel or DEFAULT_CHANNEL, 1.0)  # a relay's markup, a discount
        usd, standard_usd = (_times(cost_usd(model, answer.usage, billed), factor),
                             _times(cost_usd(model, answer.usage, Tier.STANDARD), factor))
        return Cost(str(billed), usd, standard_usd, model, channel)

    async def _release_writing(
        self, permit: Permit, classified: classify.Classified, answer: Answer | None,
        decide: Callable[[JobRecord], transitions.Change[T] | None], current: str | None,
        current_record: JobRecord | None,
    ) -> tuple[transitions.Change[T] | None, str | None]:
        """Release the attempt's permit carrying the record's change decided from ``current`` (one call).
        The change if it was written (None: write it alone), and the release's verdict on the outcome."""
        write = self.store.prepare(permit.job_id, decide, current, current_record) if current is not None else None
        learned = await self._release(permit, classified.outcome, classified, answer, write=write)
        verdict = learned.verdict if learned is not None else None
        if write is not None and learned is not None and learned.written == 1:
            return write.change, verdict
        return None, verdict

    async def through_outage(self, write: Callable[[], Awaitable[T]], **where: str) -> T:
        """A write that must not be lost (an attempt's end, a paid answer, a batch just created): tried
        again, with capped backoff, while Redis is unreachable (a restart, a failover), for up to
        ``redis_outage_s``. ``where``: what the log lines name (``job_id=...``, ``batch=...``)."""
        give_up = time.monotonic() + self.settings.redis_outage_s
        wait_s = REDIS_RETRY_BASE_S
        while True:
            try:
                return await write()
            except (RedisError, OSError) as err:
                if time.monotonic() + wait_s > give_up:
                    log.error("redis_write_failed", **where, error=f"{type(err).__name__}: {err}",
                              detail=f"gave up after FLEXQ_REDIS_OUTAGE_S={self.settings.redis_outage_s:g}")
                    raise
                if wait_s == REDIS_RETRY_BASE_S:
                    log.warning("redis_write_waiting", **where, error=f"{type(err).__name__}: {err}")
                await asyncio.sleep(wait_s)  # waiting for Redis to come back, with the answer in hand
                wait_s = min(REDIS_RETRY_MAX_S, wait_s * 2)

    # -- interruption -----------------------------------------------------------------------------

    async def _interrupted(self, job_id: str, number: int) -> None:
        """The task was cancelled: a ``flexq cancel`` (abort) or a worker shutdown."""
        now = utcnow()

        def decide(record: JobRecord) -> transitions.Change[None] | None:
            current = record.open_attempt
            if current is None or current.number != number:
                return None
            settled = transitions.settle(
                record, now=now, reason="worker shut down mid-attempt", max_interrupts=self.settings.max_interrupts
            )
            return transitions.Change(settled, counted=interrupted_attempt(record, settled))

        try:
            change = await self.store.update(job_id, decide)
        except Exception as err:  # the reconciler repairs what this could not write
            log.error("interrupt_not_recorded", job_id=job_id, error=f"{type(err).__name__}: {err}")
            return
        if change is not None:
            log.info("attempt", job_id=job_id, attempt=number, outcome=str(Outcome.INTERRUPTED),
                     status=str(change.record.status))
            if self.metrics is not None:
                self.metrics.attempt(change.record, number)

    # -- logging --------------------------------------------------------------------------------

    def _log_attempt(
        self, record: JobRecord, classified: classify.Classified, decision: policy.Decision, verdict: str | None
    ) -> None:
        attempt = record.attempts[-1]
        usage = attempt.usage
        assert record.request is not None
        log.info(
            "attempt",
            job_id=record.id,
            attempt=attempt.number,
            tier=str(attempt.tier),
            served_tier=attempt.served_tier,
            model=record.request.model,
            outcome=str(classified.outcome),
            http_status=classified.http_status,
            latency_ms=attempt.latency_ms,
            retry_in_s=attempt.retry_in_s,
            next_tier=str(decision.tier) if decision.action == policy.Action.RETRY else None,
            quota=str(classified.quota) if classified.quota else None,
            shed=verdict or None,  # what the shared limit took a 503 for: capacity | excess | random
            prompt_tokens=usage.prompt_tokens if usage else None,
            output_tokens=usage.output_tokens if usage else None,
            thoughts_tokens=usage.thoughts_tokens if usage else None,
            error=attempt.error,
            job_status=str(record.status),  # one line per attempt: the job's end is on its last one
            error_kind=record.error.kind if record.error else None,
            cost_usd=record.cost_usd,
        )

    def log_terminal(self, record: JobRecord) -> None:
        log.info(
            "job_" + str(record.status),
            job_id=record.id,
            attempts=len(record.attempts),
            error_kind=record.error.kind if record.error else None,
            cost_usd=record.cost_usd,
        )


def judge(request: GenerateRequest, answer: Answer) -> tuple[classify.Classified, Any]:
    """How a 200 answer to ``request`` ended (usable, blocked, unusable as asked) and its parsed JSON, if
    JSON was asked for."""
    parsed: Any = None
    output_error = None
    if outputs.wants_json(request) and answer.has_candidates and not answer.function_calls:
        parsed, output_error = outputs.check_json(answer.text, outputs.json_schema(request), answer.finish_reason)
    classified = classify.classify_response(
        has_candidates=answer.has_candidates,
        finish_reason=answer.finish_reason,
        block_reason=answer.block_reason,
        wants_image=outputs.wants_image(request),
        has_image=bool(answer.images),
        has_content=answer.content is not None,
        text=answer.text,
        output_error=output_error,
        finish_message=answer.finish_message,
    )
    return classified, parsed


def redacted(classified: classify.Classified) -> classify.Classified:
    """The classification with its message's secrets redacted and cut at 1,000 characters."""
    if not classified.message:
        return classified
    return classify.Classified(
        classified.outcome, classified.http_status, redact(classified.message)[:1000],
        classified.retry_after_s, classified.quota, classified.quota_id,
    )


#: Admission refusals that send an attempt on to the job's next channel: the channel is not usable now.
FAILOVER_REASONS = frozenset({"paused", "circuit_open", "probe_busy"})


def _will_call(record: JobRecord) -> bool:
    """Whether the job's next run would call Gemini (it has a request, has not ended, no cancel is asked,
    its deadline is ahead); else the run only settles the record and needs no permit or reservation."""
    return (
        record.request is not None and not record.terminal and not record.cancel_requested
        and utcnow() < record.deadline_at
    )


def _close(
    record: JobRecord, number: int, classified: classify.Classified, answer: Answer | None, now: datetime
) -> tuple[JobRecord, tuple[Attempt, ...], bool] | None:
    """Attempt ``number`` closed with its outcome: the record, the newer attempt it supersedes (a late
    answer of an attempt whose lease was lost, kept while the job is unfinished) and whether it was
    late; None when the attempt is no longer this worker's to close."""
    current = record.open_attempt
    usage = answer.usage if answer is not None else None
    served = answer.served_tier if answer else None
    if current is not None and current.number == number:
        closed = transitions.close_attempt(
            record, number=number, now=now, outcome=classified.outcome, http_status=classified.http_status,
            error=classified.message, served_tier=served, usage=usage,
        )
        return closed, (), False
    late_ok = classified.outcome == Outcome.OK and answer is not None and 0 < number <= len(record.attempts)
    if record.terminal or not late_ok:
        return None
    closed = transitions.close_late_attempt(
        record, number=number, now=now, outcome=classified.outcome, http_status=classified.http_status,
        served_tier=served, usage=usage,
    )
    return closed, ((closed.attempts[-1],) if current is not None else ()), True


def _has_blobs(classified: classify.Classified, answer: Answer | None) -> bool:
    """An answer with bytes to store before the record refers to them (images, inline data)."""
    return classified.outcome == Outcome.OK and answer is not None and bool(answer.blobs)


def _billed_usd(change: transitions.Change[Any] | None) -> float | None:
    """What a written change billed (None: nothing, or nothing was written)."""
    return change.cost.usd if change is not None and change.cost is not None else None


def _times(usd: float | None, factor: float) -> float | None:
    return None if usd is None else round(usd * factor, 10)


def _unreachable_since_s(record: JobRecord) -> float | None:
    """When every attempt of the job so far (since its last ``flexq retry``, which keeps the history,
    counted too) ended in a connection error: the first one's start; else None."""
    closed = [a for a in record.attempts if a.outcome is not None and a.outcome != Outcome.INTERRUPTED]
    if not closed or any(a.outcome != Outcome.CONNECTION_ERROR for a in closed):
        return None
    return closed[0].started_at.timestamp()


def interrupted_attempt(before: JobRecord, after: JobRecord) -> tuple[Attempt, ...]:
    """The attempt ``settle`` closed as interrupted, to count it (none if nothing was open)."""
    if before.open_attempt is None:
        return ()
    return (after.attempts[before.open_attempt.number - 1],)
