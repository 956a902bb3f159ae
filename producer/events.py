"""Job events: what ``{queue}:events`` (a Redis Stream, capped at ``FLEXQ_EVENTS_MAXLEN``) holds.

The store appends one event in the same transaction as each change it writes: ``queued`` when a job
is created, then one per status change (``running``, ``retrying``, ``succeeded``...), carrying the
attempt that change closed (its number, tier, outcome, HTTP status, latency, delay chosen). Fields
are flat strings on the wire; ``Event`` is their typed reading. No request or answer text is in an
event: a consumer reads the record (``FlexQueue.get``) when it needs them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from producer.models import Attempt, JobRecord
from producer.status import TERMINAL, Status


@dataclass(frozen=True)
class Event:
    """One job event. ``id`` is the stream entry id (``<ms>-<seq>``): pass it back to resume after it."""

    id: str
    job_id: str
    status: Status
    previous: Status | None = None
    at_s: float = 0.0
    attempt: int | None = None
    tier: str | None = None
    outcome: str | None = None
    http_status: int | None = None
    latency_ms: int | None = None
    retry_in_s: float | None = None
    error_kind: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_json(self) -> dict[str, Any]:
        """As plain JSON data (``flexq events --json``), without the fields an event does not carry."""
        out: dict[str, Any] = {"id": self.id, "job_id": self.job_id, "status": str(self.status)}
        for name in ("previous", "at_s", "attempt", "tier", "outcome", "http_status", "latency_ms", "retry_in_s",
                     "error_kind"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value) if name == "previous" else value
        return out


def status_event(record: JobRecord, previous: Status | None, closed: Attempt | None, *, at_s: float) -> dict[str, str]:
    """The stream fields of one change of ``record`` (``closed``: the attempt the change ended)."""
    fields = {"job": record.id, "status": str(record.status), "at": repr(round(at_s, 6))}
    if previous is not None:
        fields["from"] = str(previous)
    if closed is not None:
        fields["attempt"] = str(closed.number)
        fields["tier"] = str(closed.tier)
        if closed.outcome is not None:
            fields["outcome"] = str(closed.outcome)
        if closed.http_status is not None:
            fields["http_status"] = str(closed.http_status)
        if closed.latency_ms is not None:
            fields["latency_ms"] = str(closed.latency_ms)
        if closed.retry_in_s is not None:
            fields["retry_in_s"] = repr(closed.retry_in_s)
    elif record.status == Status.RUNNING and record.attempts:
        fields["attempt"] = str(record.attempts[-1].number)
        fields["tier"] = str(record.attempts[-1].tier)
    if record.error is not None and record.status in TERMINAL:
        fields["error"] = record.error.kind
    return fields


def text(value: Any) -> str:
    """A Redis reply value (bytes, or str on a decoding client) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_event(entry_id: Any, raw: dict[Any, Any]) -> Event | None:
    """An ``Event`` from one stream entry; None for an entry that is not a readable job event."""
    fields = {text(k): text(v) for k, v in raw.items()}
    try:
        status = Status(fields["status"])
        previous = Status(fields["from"]) if "from" in fields else None
        return Event(
            id=text(entry_id), job_id=fields["job"], status=status, previous=previous,
            at_s=float(fields.get("at", 0.0)),
            attempt=int(fields["attempt"]) if "attempt" in fields else None,
            tier=fields.get("tier"), outcome=fields.get("outcome"),
            http_status=int(fields["http_status"]) if "http_status" in fields else None,
            latency_ms=int(fields["latency_ms"]) if "latency_ms" in fields else None,
            retry_in_s=float(fields["retry_in_s"]) if "retry_in_s" in fields else None,
            error_kind=fields.get("error"),
        )
    except (KeyError, ValueError):
        return None


async def read_events(
    redis: Any, key: str, *, after: str = "$", group: str | None = None, consumer: str | None = None,
    job_id: str | None = None, follow: bool = True, block_s: float = 5.0, count: int = 500,
) -> AsyncGenerator[Event, None]:
    """Events of one stream, oldest first (``FlexQueue.events`` documents the arguments).

    With a ``group``, each event is acknowledged when the loop asks for the next one: the event a loop
    stopped on (a break, an error, a crash) stays pending and comes again first when the same
    ``consumer`` reads next (at least once), unless ``FlexQueue.ack_events`` acknowledged it."""
    block_ms = max(1, int(block_s * 1000)) if follow else None
    entries = (_tail(redis, key, after, block_ms, count) if group is None
               else _group(redis, key, group, consumer or _consumer_name(), after, block_ms, count))
    async for entry_id, fields in entries:
        event = parse_event(entry_id, fields) if fields else None  # a trimmed pending entry has no fields
        if event is not None and (job_id is None or event.job_id == job_id):
            yield event


async def newest_event_id(redis: Any, key: str) -> str:
    """The id of the newest entry of stream ``key`` (``"0-0"`` when it is empty or missing): a position
    to read after, fixed before anything else is read, so that nothing later is missed."""
    newest = await redis.xrevrange(key, "+", "-", count=1)
    return text(newest[0][0]) if newest else "0-0"


async def _tail(redis: Any, key: str, after: str, block_ms: int | None, count: int) -> AsyncIterator[tuple[Any, Any]]:
    last = await newest_event_id(redis, key) if after == "$" else after  # "$": from now on
    while True:
        reply = await redis.xread({key: last}, count=count, block=block_ms)
        if not reply and block_ms is None:
            return
        for _stream, batch in reply or ():
            for entry_id, fields in batch:
                last = text(entry_id)
                yield entry_id, fields


async def _group(
    redis: Any, key: str, group: str, consumer: str, after: str, block_ms: int | None, count: int,
) -> AsyncIterator[tuple[Any, Any]]:
    try:
        await redis.xgroup_create(key, group, id=after, mkstream=True)
    except ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise
    backlog = True  # this consumer's pending events first (delivered before, never acknowledged)
    while True:
        reply = await redis.xreadgroup(group, consumer, {key: "0" if backlog else ">"}, count=count,
                                       block=None if backlog else block_ms)
        batch = [entry for _stream, entries in reply or () for entry in entries]
        if backlog and not batch:
            backlog = False
            continue
        if not batch and block_ms is None:
            return
        for entry_id, fields in batch:
            yield entry_id, fields
            await redis.xack(key, group, entry_id)


def _consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
