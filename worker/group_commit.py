"""Group commit: calls of one script made in the same event-loop turn go to Redis as one call.

A worker with many calls in flight ends (and starts) many attempts at once: each one's script call is a
network round trip and a Redis command of its own. ``GroupCommit.call`` queues the call and, once the
turn's other tasks have queued theirs, sends them all as one call of the script's batch form
(``worker.flow_store.script_with_write``), which runs them one after the other, as
separate calls would, and sends the commands they share once. While one such call is in flight, the
calls made meanwhile wait for it to come back (at most ``HOLD_MAX_S``) and then go together, as one turn
(the classic group commit): a lone call waits for nothing but the end of the turn it was made in, and a
batch grows with the calls that arrive during one round trip, so the saving comes with load, where the
round trips cost most.

Calls sent together share a ``Turn``: the replies of its calls, as their batches come back
(``GroupCommit.call_in_turn``). What the calls go on to do happens together: the flow-control acquire
uses it to rank the calls it admitted in one turn, which are then sent to Gemini in that order
(``worker.flow.Permit.turn_rank``).

Each call's reply is its own: one that raised an error in the script fails alone (``ResponseError``
with the script's message); a Redis error of the whole call fails every call of the batch, as it would
have failed each of them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from producer.events import text

#: Calls sent in one script call at most: a batch's script holds Redis for all of them, and their callers
#: resume in one event-loop turn (see ``worker.runtime.CLAIM_BATCH_MAX`` for the lag this bounds).
MAX_BATCH = 10
#: Calls made while a flush is in flight wait for it to come back (so that batches grow with the load
#: instead of each turn sending its own), but no longer than this (s): a call Redis never answers must not
#: hold up the calls behind it.
HOLD_MAX_S = 0.5

Send = Callable[[list[str], list[Any]], Awaitable[list[Any]]]


class Turn:
    """The calls made in one event-loop turn: ``replies`` holds (keys, reply) of each one that succeeded,
    added as its batch comes back (a turn of more than ``max_batch`` calls is sent as several batches)."""

    __slots__ = ("replies",)

    def __init__(self) -> None:
        self.replies: list[tuple[list[str], Any]] = []


_Pending = tuple[list[str], list[Any], "asyncio.Future[Any]", Turn]


class GroupCommit:
    """One script's calls, batched per event-loop turn. ``send(keys, args)`` runs the batch form."""

    def __init__(self, send: Send, *, max_batch: int = MAX_BATCH) -> None:
        self._send = send
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._turn = Turn()
        #: Batches of the latest flush still in flight (the next flush waits for them), and that flush's number.
        self._sending = 0
        self._generation = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Calls and batches sent so far (for benchmarks and tests).
        self.calls = 0
        self.batches = 0

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        """The reply the call would have had alone."""
        reply, _ = await self.call_in_turn(keys, args)
        return reply

    async def call_in_turn(self, keys: list[str], args: list[Any]) -> tuple[Any, Turn]:
        """The reply the call would have had alone, and the turn it was made in (shared with the calls made
        with it; its ``replies`` grow as the turn's other batches come back)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            self._turn = turn = Turn()
            if self._sending == 0:
                loop.call_soon(self._flush)  # after the tasks already ready in this turn have queued theirs
            else:  # sent when the batch in flight comes back, or after HOLD_MAX_S if it does not
                loop.call_later(HOLD_MAX_S, self._flush_overdue, turn)
        turn = self._turn
        self._pending.append((keys, args, future, turn))
        return await future, turn

    def _flush_overdue(self, turn: Turn) -> None:
        if self._pending and self._turn is turn:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        chunks = [pending[start:start + self._max_batch] for start in range(0, len(pending), self._max_batch)]
        self._generation += 1
        self._sending = len(chunks)
        for chunk in chunks:
            task = asyncio.get_running_loop().create_task(self._run(chunk))
            self._tasks.add(task)  # held until done: a pending task may otherwise be collected
            task.add_done_callback(functools.partial(self._sent, self._generation))

    def _sent(self, generation: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if generation != self._generation:  # an overdue flush went ahead of it: that one holds the gate
            return
        self._sending -= 1
        if self._sending == 0 and self._pending:
            self._flush()  # the calls that came while it was in flight, as one turn

    async def _run(self, batch: list[_Pending]) -> None:
        keys: list[str] = []
        args: list[Any] = []
        for call_keys, call_args, _, _ in batch:
            keys += call_keys
            args += call_args
        self.calls += len(batch)
        self.batches += 1
        try:
            replies = await self._send(keys, args)
        except Exception as err:  # handed to every caller, as each call would have raised it
            for _, _, future, _ in batch:
                if not future.done():
                    future.set_exception(err)
            return
        except BaseException:  # cancelled (shutdown): so are the calls waiting for it
            for _, _, future, _ in batch:
                future.cancel()
            raise
        for (call_keys, _, future, turn), reply in zip(batch, replies, strict=True):
            if int(reply[0]) == 1:
                turn.replies.append((call_keys, reply[1]))
            if future.done():  # its caller was cancelled; the call ran all the same
                continue
            if int(reply[0]) == 1:
                future.set_result(reply[1])
            else:
                future.set_exception(ResponseError(text(reply[1])))
