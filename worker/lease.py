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
from typing import Any

from producer import transitions
from producer.models import ACTIVE, JobRecord, Status, utcnow
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
        ttl_ms = int(self.lease_s * 1000)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for job_id in list(self.leases):
                pipe.pexpire(self.store.keys.arq_in_progress(job_id), ttl_ms)
            pipe.zadd(self.store.keys.workers, {self.worker_name: time.time()})
            await pipe.execute()
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
        async with store.redis.pipeline(transaction=True) as pipe:
            for job_id in batch:
                pipe.exists(store.keys.arq_job(job_id))
            exists = await pipe.execute()
        for job_id, alive in zip(batch, exists, strict=True):
            if not alive and await repair(store, job_id):
                repaired += 1
    if repaired:
        log.warning("reconciled", repaired=repaired)
    return repaired


async def repair(store: JobStore, job_id: str) -> bool:
    """Reschedule, cancel or fail one active job whose arq job is missing."""
    now = utcnow()

    def mutate(record: JobRecord) -> JobRecord | None:
        if record.status not in ACTIVE:
            return None
        if record.cancel_requested:
            return transitions.cancel(record, now=now)
        record = transitions.interrupt_open_attempt(record, now=now, reason="lost by the queue; recovered")
        if now >= record.deadline_at:
            return transitions.fail(record, kind="deadline_exceeded", message="deadline passed", now=now)
        if record.status == Status.RUNNING:
            record = transitions.schedule_retry(record, next_tier=record.next_tier, now=now)
        return record.model_copy(update={"updated_at": now})

    def on_commit(pipe: Any, old: JobRecord, new: JobRecord) -> None:
        if new.status in ACTIVE:
            store.schedule(pipe, new)
        if old.open_attempt is not None:
            store.count_attempt(pipe, transitions.interrupt_open_attempt(old, now=now, reason=""))

    # The job may have been finished or rescheduled since we looked: check again inside the watch.
    if await store.redis.exists(store.keys.arq_job(job_id)):
        return False
    _, changed = await store.update(job_id, mutate, on_commit=on_commit)
    return changed
