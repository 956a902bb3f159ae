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
        self._last_reconcile = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="flexq-lease-keeper")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        interval_s = max(0.2, self.lease_s / 3)
        while not self._stop.is_set():
            try:
                await self.renew()
                if time.monotonic() - self._last_reconcile >= max(RECONCILE_EVERY_S, self.lease_s):
                    self._last_reconcile = time.monotonic()
                    await reconcile(self.store, lock_owner=self.worker_name, lock_s=RECONCILE_EVERY_S)
            except Exception as err:  # Redis blips must not kill the keeper
                log.warning("lease_keeper_error", error=f"{type(err).__name__}: {err}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval_s)

    async def renew(self) -> None:
        await self.store.heartbeat(self.worker_name, list(self.leases), lease_s=self.lease_s, now_s=time.time())
        if self.flow is not None:
            await self.flow.renew()


async def reconcile(store: JobStore, *, lock_owner: str, lock_s: float) -> int:
    """Repair active jobs whose arq job is gone. One worker at a time (a lock key). Returns repairs."""
    lock = store.keys.flow("reconcile-lock")
    if not await store.redis.set(lock, lock_owner, nx=True, ex=max(1, int(lock_s))):
        return 0
    ids = await store.ids(ACTIVE, limit=100_000, newest_first=False)
    repaired = 0
    for start in range(0, len(ids), RECONCILE_BATCH):
        batch = ids[start : start + RECONCILE_BATCH]
        for job_id, alive in zip(batch, await store.arq_jobs_exist(batch), strict=True):
            if alive:
                continue
            try:
                repaired += await repair(store, job_id)
            except JobNotFoundError:  # its record expired (deadline + retention) before its index entry
                await store.forget(job_id)
                log.warning("reconcile_forgot", job_id=job_id, detail="record expired; dropped from the indexes")
            except InvalidJobError as err:  # one bad record fails that job, not the sweep
                await store.quarantine(job_id, str(err))
                log.error("reconcile_quarantined", job_id=job_id, error=str(err))
    if repaired:
        log.warning("reconciled", repaired=repaired)
    return repaired


async def repair(store: JobStore, job_id: str) -> bool:
    """Reschedule, cancel or fail one active job whose arq job is missing (``transitions.settle``)."""
    now = utcnow()

    def decide(record: JobRecord) -> transitions.Change[None] | None:
        if record.status not in ACTIVE:
            return None
        settled = transitions.settle(record, now=now, reason="lost by the queue; recovered")
        counted = (settled.attempts[record.open_attempt.number - 1],) if record.open_attempt else ()
        if settled.terminal:
            return transitions.Change(settled, counted=counted)
        return transitions.Change(settled.model_copy(update={"updated_at": now}), counted=counted, run_in_s=0.0)

    # The job may have been finished or rescheduled since we looked: check again inside the watch.
    if (await store.arq_jobs_exist([job_id]))[0]:
        return False
    return await store.update(job_id, decide) is not None
