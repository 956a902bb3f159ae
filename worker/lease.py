"""Bounded leases and repair.

arq sets a job's in-progress key once, for the job timeout (+10 s), and never renews it (arq
#402/#407): a SIGKILLed worker's job would wait out the whole 15-minute timeout. Each worker
process instead keeps its running jobs' keys alive with a short TTL (``FLEXQ_LEASE_S``),
renewed every third of it; a dead worker's jobs are picked up by others within the lease.

The reconciler repairs jobs that arq dropped behind flexq's back ("job expired", aborted before
start, a crash between two writes): an active record whose arq job is gone is rescheduled, or
ended if it was cancelled or is past its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from producer import transitions
from producer.errors import InvalidJobError, JobNotFoundError
from producer.models import JobRecord, utcnow
from producer.status import ACTIVE
from producer.store import JobStore
from worker.flow_store import FlowControl
from worker.logs import get_logger

log = get_logger("flexq.lease")
RECONCILE_EVERY_S = 30.0
RECONCILE_BATCH = 500
#: Ids read from an index per round trip when the reconciler lists every active job.
READ_PAGE = 10_000


class LeaseKeeper:
    """Background task of one worker process: renew leases, heartbeat, reconcile."""

    def __init__(
        self, store: JobStore, leases: set[str], *, lease_s: float, worker_name: str, flow: FlowControl | None = None
    ) -> None:
        self.store = store
        self.flow = flow
        self.leases = leases
        self.lease_s = lease_s
        self.worker_name = worker_name
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reconciler: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name="flexq-lease-keeper")
        # its own task: a long repair pass never delays a lease renewal
        self._reconciler = loop.create_task(self._reconcile_loop(), name="flexq-reconciler")

    async def stop(self) -> None:
        self._stop.set()
        for task in (self._task, self._reconciler):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _loop(self) -> None:
        interval_s = max(0.2, self.lease_s / 3)
        while not self._stop.is_set():
            try:
                await self.renew()
            except Exception as err:  # Redis blips must not kill the keeper
                log.warning("lease_keeper_error", error=f"{type(err).__name__}: {err}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval_s)

    async def _reconcile_loop(self) -> None:
        every_s = max(RECONCILE_EVERY_S, self.lease_s)
        while not self._stop.is_set():  # a pass at start-up, then one every every_s
            try:
                await reconcile(self.store, lock_owner=self.worker_name, lock_s=RECONCILE_EVERY_S, lease_s=self.lease_s)
            except Exception as err:  # Redis blips must not kill the reconciler
                log.warning("reconcile_error", error=f"{type(err).__name__}: {err}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every_s)

    async def renew(self) -> None:
        await self.store.heartbeat(self.worker_name, list(self.leases), lease_s=self.lease_s, now_s=time.time())
        if self.flow is not None:
            await self.flow.renew()


async def reconcile(
    store: JobStore, *, lock_owner: str, lock_s: float, lease_s: float = 60.0, page: int = RECONCILE_BATCH
) -> int:
    """Repair active jobs whose arq job is gone. One worker at a time (a lock key, renewed page by page).

    Pages through every active id; an id whose record is gone is dropped from the indexes, an
    unreadable record is quarantined, and neither stops the pass. A running job whose worker still
    beats (within ``lease_s``) is left to that worker. Returns the number of jobs repaired."""
    lock = store.keys.flow("reconcile-lock")
    if not await store.redis.set(lock, lock_owner, nx=True, ex=max(1, int(lock_s))):
        return 0
    await store.trim_terminal_indexes()
    alive = await store.live_workers(within_s=lease_s)
    ids = await _all_active_ids(store)  # read first: repairs move ids between indexes as we go
    repaired = 0
    for start in range(0, len(ids), page):
        if await store.redis.get(lock) != lock_owner.encode():  # another worker took over: stop
            return repaired
        await store.redis.expire(lock, max(1, int(lock_s)))
        repaired += await _repair_batch(store, ids[start : start + page], alive)
    if repaired:
        log.warning("reconciled", repaired=repaired)
    return repaired


async def _all_active_ids(store: JobStore) -> list[str]:
    """Every id in the active indexes, oldest first per status, read in pages of ``READ_PAGE``."""
    ids: list[str] = []
    for status in ACTIVE:
        start = 0
        while batch := await store.index_page(status, start, READ_PAGE):
            ids.extend(batch)
            start += len(batch)
    return ids


async def _repair_batch(store: JobStore, batch: list[str], alive: set[str]) -> int:
    repaired = 0
    for job_id, exists in zip(batch, await store.arq_jobs_exist(batch), strict=True):
        if exists:
            continue
        try:
            repaired += await repair(store, job_id, alive)
        except JobNotFoundError:  # its record expired (deadline + retention) before its index entry
            await store.forget(job_id)
            log.warning("reconcile_forgot", job_id=job_id, detail="record expired; dropped from the indexes")
        except InvalidJobError as err:  # one bad record fails that job, not the sweep
            await store.quarantine(job_id, str(err))
            log.error("reconcile_quarantined", job_id=job_id, error=str(err))
    return repaired


async def repair(store: JobStore, job_id: str, alive: set[str] | None = None) -> bool:
    """Reschedule, cancel or fail one active job whose arq job is missing (``transitions.settle``).
    A job whose open attempt belongs to a worker in ``alive`` is left to it."""
    now = utcnow()

    def decide(record: JobRecord) -> transitions.Change[None] | None:
        if record.status not in ACTIVE:
            return None
        if record.open_attempt is not None and record.open_attempt.worker in (alive or set()):
            return None  # its worker still beats: its call is in flight and it will record the outcome
        settled = transitions.settle(record, now=now, reason="lost by the queue; recovered")
        counted = (settled.attempts[record.open_attempt.number - 1],) if record.open_attempt else ()
        if settled.terminal:
            return transitions.Change(settled, counted=counted)
        return transitions.Change(settled.model_copy(update={"updated_at": now}), counted=counted, run_in_s=0.0)

    # The job may have been finished or rescheduled since we looked: check again inside the watch.
    if (await store.arq_jobs_exist([job_id]))[0]:
        return False
    return await store.update(job_id, decide) is not None
