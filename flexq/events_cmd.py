"""``flexq events``: print the queue's job events, or follow them as they come (``--follow``)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from flexq.exits import UsageError, clean

if TYPE_CHECKING:
    from producer.events import Event
    from producer.settings import ProducerSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C")
    p.add_argument("--from", dest="after", default=None, metavar="ID",
                   help="start after this event id; 0: every event kept (default: 0, or now with --follow)")
    p.add_argument("--job", metavar="ID", help="only this job's events")
    p.add_argument("--group", help="read as a consumer of this group (resumes where the group stopped)")
    p.add_argument("--consumer", help="consumer name within --group (default: host:pid)")
    p.add_argument("--json", action="store_true", help="one JSON object a line")


def line(event: Event) -> str:
    """One event as a console line: time, job, status change, and the attempt the change closed."""
    when = datetime.fromtimestamp(event.at_s, UTC).strftime("%H:%M:%S.%f")[:-3]
    move = f"{event.previous} -> {event.status}" if event.previous else str(event.status)
    parts = [when, clean(event.job_id), move]
    if event.attempt is not None:
        detail = f"attempt {event.attempt} {event.tier or ''}".rstrip()
        if event.outcome:
            detail += f" {event.outcome}"
        if event.http_status is not None:
            detail += f" {event.http_status}"
        if event.latency_ms is not None:
            detail += f" {event.latency_ms} ms"
        if event.retry_in_s is not None:
            detail += f", retry in {event.retry_in_s:g}s"
        parts.append(detail)
    if event.error_kind:
        parts.append(f"error {clean(event.error_kind)}")
    return "  ".join(parts)


async def cmd_events(args: argparse.Namespace, settings: ProducerSettings) -> int:
    from producer.queue import FlexQueue

    if args.consumer and not args.group:
        raise UsageError("--consumer needs --group")
    after = args.after if args.after is not None else ("$" if args.follow else "0")
    queue = await FlexQueue.connect(settings)
    try:
        async for event in queue.events(after=after, group=args.group, consumer=args.consumer, job_id=args.job,
                                        follow=args.follow):
            out = json.dumps(event.to_json()) if args.json else line(event)
            sys.stdout.write(out + "\n")
            sys.stdout.flush()
    finally:
        await queue.close()
    return 0
