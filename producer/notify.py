"""Completion by notification: one reader of the queue's event stream per process wakes every waiter.

``FlexQueue.wait`` and ``wait_many`` register the jobs they wait for here and sleep. One task tails
``{queue}:events`` (``XREAD BLOCK``, up to 1,000 entries a read) and wakes the waiters of each job
that reaches a terminal status. A slow safety net (``safety_poll_s``) checks the waited jobs' status
indexes in chunks (no record read), so a lost event (stream trimmed, events turned off, a Redis
restart that lost the tail) costs latency, never a hang. Redis commands per second stay flat in the
number of waiters: one blocking read per burst of events, plus one pipelined check per 1,000
waiters per ``safety_poll_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from redis.exceptions import RedisError

from producer.events import newest_event_id, text
from producer.status import TERMINAL
from producer.store import JobStore

#: Entries taken per read of the stream.
READ_COUNT = 1000
#: Waited jobs checked per pipelined safety-net read.
CHECK_CHUNK = 1000


class Completions:
    """Wakes waiters when their jobs end. One per ``FlexQueue``; its task starts on the first wait."""

    def __init__(self, store: JobStore, *, block_ms: int = 1000, safety_poll_s: float = 5.0) -> None:
        self.store = store
        self.block_ms = block_ms
        # with events off, the safety net is all there is: look often
        self.safety_poll_s = safety_poll_s if store.events_maxlen > 0 else min(safety_poll_s, 0.5)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_id = "0-0"
        self._started = asyncio.Lock()
        #: Reads of the stream and safety-net checks so far (for the benchmark and tests).
        self.reads = 0
        self.checks = 0

    @property
    def waiting(self) -> int:
        """Jobs with at least one waiter."""
        return len(self._waiters)

    async def start(self) -> None:
        """Fix the stream position (events after it wake waiters) and start the reader, once."""
        async with self._started:
            if self._task is not None and not self._task.done():
                return
            if self.store.events_maxlen > 0:
                self._last_id = await newest_event_id(self.store.redis, self.store.keys.events)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="flexq-completions")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.cancel()
        self._waiters.clear()

    def register(self, job_ids: Iterable[str]) -> dict[str, asyncio.Future[None]]:
        """A future per job, done when the job is seen to end. Call ``start()`` first."""
        loop = asyncio.get_running_loop()
        out: dict[str, asyncio.Future[None]] = {}
        for job_id in job_ids:
            if job_id in out:
                continue
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(job_id, set()).add(future)
            out[job_id] = future
        return out

    def unregister(self, futures: dict[str, asyncio.Future[None]]) -> None:
        for job_id, future in futures.items():
            held = self._waiters.get(job_id)
            if held is not None:
                held.discard(future)
                if not held:
                    del self._waiters[job_id]

    def _wake(self, job_id: str) -> None:
        for future in self._waiters.pop(job_id, ()):
            if not future.done():
                future.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.safety_poll_s
        failures = 0
        while True:
            try:
                if self.store.events_maxlen > 0:
                    await self._read()
                else:
                    await asyncio.sleep(max(0.0, next_check - loop.time()))
                if loop.time() >= next_check or failures:
                    await self.check()
                    next_check = loop.time() + self.safety_poll_s
                failures = 0
            except (RedisError, OSError):
                failures += 1  # Redis away: back off, then check everything waited on once it answers
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)))

    async def _read(self) -> None:
        block_ms = self.block_ms if self._waiters else min(self.block_ms, 200)
        reply = await self.store.redis.xread({self.store.keys.events: self._last_id}, count=READ_COUNT,
                                             block=block_ms)
        self.reads += 1
        terminal = {str(status) for status in TERMINAL}
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._last_id = text(entry_id)
                if not self._waiters:
                    continue
                status = fields.get(b"status", fields.get("status"))
                if status is not None and text(status) in terminal:
                    self._wake(text(fields.get(b"job", fields.get("job", ""))))

    async def check(self) -> None:
        """The safety net: wake the waiters of every waited job a terminal status index holds."""
        ids = list(self._waiters)
        for start in range(0, len(ids), CHECK_CHUNK):
            part = ids[start : start + CHECK_CHUNK]
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for status in TERMINAL:
                    pipe.zmscore(self.store.keys.index(status), part)
                found = await pipe.execute()
            self.checks += 1
            for n, job_id in enumerate(part):
                if any(scores[n] is not None for scores in found):
                    self._wake(job_id)
