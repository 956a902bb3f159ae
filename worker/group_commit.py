"""Group commit: calls of one script made in the same event-loop turn go to Redis as one call.

A worker with many calls in flight ends (and starts) many attempts at once: each one's script call is a
network round trip and a Redis command of its own. ``GroupCommit.call`` queues the call and, once the
turn's other tasks have queued theirs, sends them all as one call of the script's batch form
(``worker.flow_store.script_with_write``), which runs them one after the other, as
separate calls would, and sends the commands they share once. A lone call waits for nothing but the end
of the turn it was made in; a batch grows only with the calls that are ready at the same moment, so the
saving comes with load, where the round trips cost most.

Each call's reply is its own: one that raised an error in the script fails alone (``ResponseError``
with the script's message); a Redis error of the whole call fails every call of the batch, as it would
have failed each of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from producer.events import text

#: Calls sent in one script call at most: a batch's script holds Redis for all of them, and their callers
#: resume in one event-loop turn (see ``worker.runtime.CLAIM_BATCH_MAX`` for the lag this bounds).
MAX_BATCH = 10

Send = Callable[[list[str], list[Any]], Awaitable[list[Any]]]


class GroupCommit:
    """One script's calls, batched per event-loop turn. ``send(keys, args)`` runs the batch form."""

    def __init__(self, send: Send, *, max_batch: int = MAX_BATCH) -> None:
        self._send = send
        self._max_batch = max_batch
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: Calls and batches sent so far (for benchmarks and tests).
        self.calls = 0
        self.batches = 0

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        """The reply the call would have had alone."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the tasks already ready in this turn have queued theirs
        self._pending.append((keys, args, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self._max_batch):
            task = asyncio.get_running_loop().create_task(self._run(pending[start:start + self._max_batch]))
            self._tasks.add(task)  # held until done: a pending task may otherwise be collected
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        keys: list[str] = []
        args: list[Any] = []
        for call_keys, call_args, _ in batch:
            keys += call_keys
            args += call_args
        self.calls += len(batch)
        self.batches += 1
        try:
            replies = await self._send(keys, args)
        except Exception as err:  # handed to every caller, as each call would have raised it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        except BaseException:  # cancelled (shutdown): so are the calls waiting for it
            for _, _, future in batch:
                future.cancel()
            raise
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled; the call ran all the same
                continue
            if int(reply[0]) == 1:
                future.set_result(reply[1])
            else:
                future.set_exception(ResponseError(text(reply[1])))
