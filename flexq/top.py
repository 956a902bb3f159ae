"""``flexq top``: a live view of the whole fleet, redrawn every ``--interval-s`` from two reads of Redis.

What happened in the last interval is the difference of two ``flexq.fleet`` reads: jobs ended
(throughput), attempts, 503s and 429s, dollars spent (cost per hour). The rest is the state at the
second read: queue depth, workers, per (model, tier) limit, in flight and breaker, pauses and quota
alerts. ``--once`` reads twice, ``--interval-s`` apart, prints that one frame and exits.

A frame fits 80 columns: no line is wrapped; a line of free text (a pause's reason) that is wider than
the terminal is cut with an ellipsis, and only a model name too long for its column folds.

Nothing heavy is imported at load: ``flexq`` builds its parser with :func:`add_commands` on every start.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from flexq.exits import clean, seconds

if TYPE_CHECKING:
    from rich.console import Console, JustifyMethod, RenderableType
    from rich.text import Text

    from flexq.fleet import Fleet, FleetReader
    from worker.config import WorkerConfig

DEFAULT_INTERVAL_S = 1.0
#: The flow-control table's columns: (header, justify).
FLOW_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("model", "left"), ("tier", "left"), ("in flight/limit", "right"), ("breaker", "left"),
    ("rand 503", "right"), ("step", "right"),
)


class Frame(NamedTuple):
    """What one screen shows: the latest read, and what changed since the one before (None: no earlier read)."""

    fleet: Fleet
    interval_s: float | None = None
    ended: int | None = None
    attempts: int | None = None
    shed_503: int | None = None
    limited_429: int | None = None
    spent_usd: float | None = None

    def per_s(self, n: float | None) -> float | None:
        return None if n is None or not self.interval_s else n / self.interval_s

    @property
    def cost_per_hour_usd(self) -> float | None:
        rate = self.per_s(self.spent_usd)
        return None if rate is None else rate * 3600


def frame(previous: Fleet | None, current: Fleet) -> Frame:
    """The frame of ``current``, with the interval's changes since ``previous`` (counters never go
    backwards; a counter found lower, e.g. the stats hash deleted, counts as no change)."""
    if previous is None:
        return Frame(current)
    before, after = previous.attempts_by_outcome, current.attempts_by_outcome

    def grew(outcome: str) -> int:
        return max(0, after.get(outcome, 0) - before.get(outcome, 0))

    return Frame(
        current,
        interval_s=max(0.0, current.now_s - previous.now_s),
        ended=max(0, current.ended - previous.ended),
        attempts=max(0, current.attempts_total - previous.attempts_total),
        shed_503=grew("overloaded"),
        limited_429=grew("rate_limited"),
        spent_usd=max(0.0, current.spent_usd - previous.spent_usd),
    )


# -- rendering -------------------------------------------------------------------------------------


def _count_rate(f: Frame, n: int | None) -> str:
    """``n`` in the interval and per second; ``-`` before there are two reads."""
    rate = f.per_s(n)
    return "-" if n is None else f"{n}: {'-' if rate is None else f'{rate:.2f}'}/s"


def _share(part: int | None, whole: int | None) -> str:
    return "-" if part is None or not whole else f"{part / whole * 100:.1f}%"


def render(f: Frame) -> RenderableType:
    """The screen: a few lines of figures, then the flow-control table, then pauses and alerts."""
    from datetime import UTC, datetime

    from rich import box
    from rich.console import Group
    from rich.table import Table

    fleet = f.fleet
    when = datetime.fromtimestamp(fleet.now_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    span = "first read: rates from the next one" if f.interval_s is None else f"last {f.interval_s:.2f}s"
    jobs = fleet.jobs
    lines = [
        f"flexq top - {when} - {fleet.workers} worker(s) - queue {fleet.queue}",  # live: a fresh heartbeat
        f"interval    {span}",
        f"ended jobs  {_count_rate(f, f.ended)}",
        f"attempts    {_count_rate(f, f.attempts)}",
        f"503s (shed) {_count_rate(f, f.shed_503)} ({_share(f.shed_503, f.attempts)} of attempts)",
        f"429s        {_count_rate(f, f.limited_429)} ({_share(f.limited_429, f.attempts)} of attempts)",
        f"cost        {_usd(f.spent_usd)}: {_usd(f.cost_per_hour_usd)}/h ({_usd(fleet.spent_usd)} in all)",
        f"arq queue   due {fleet.arq_due}, deferred {fleet.arq_deferred}",
        "jobs        " + ", ".join(f"{status} {jobs.get(status, 0)}" for status in ("queued", "running", "retrying")),
    ]
    parts: list[RenderableType] = [_line(line) for line in lines]
    scopes = fleet.flow["scopes"]
    if scopes:
        # no vertical rules and two spaces between columns: the table fits 80 columns
        table = Table(title="flow control", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                      pad_edge=False, padding=(0, 1, 0, 0))
        for name, justify in FLOW_COLUMNS:
            table.add_column(name, justify=justify, overflow="fold")
        for scope in scopes:
            table.add_row(*_scope_row(scope))
        parts.append(table)
    else:
        parts.append(_line("flow control: no (model, tier) used lately"))
    parts.extend(_line(line) for line in _model_lines(fleet.flow["models"]))
    return Group(*parts)


def _line(text: str) -> RenderableType:
    """A line that is never wrapped: cut with an ellipsis at the terminal's width."""
    from rich.text import Text

    return Text(text, no_wrap=True, overflow="ellipsis")


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def _scope_row(scope: dict[str, Any]) -> list[Text]:
    """model, tier, in flight/limit, breaker (``open 12s x3``: 12 s more, opened 3 times in a row;
    ``probing``: half-open with its probe out), load-independent 503 share, capacity step."""
    from rich.text import Text

    breaker = scope["breaker"]
    state = str(breaker["state"]).replace("_", "-")
    if breaker["state"] == "open":
        state += f" {breaker['open_for_s']:.0f}s x{breaker['opens']}"
    elif breaker["probe_out"]:
        state = "probing"
    random_503 = scope["random_503_rate"]
    cells = [
        scope["model"], scope["tier"], f"{scope['in_flight']}/{scope['limit']:.4g}", state,
        "-" if random_503 is None else f"{random_503 * 100:.0f}%",
        "-" if scope["capacity_step"] is None else f"~{scope['capacity_step']}",
    ]
    return [Text(cell) for cell in cells]  # Text: a model name or reason is never read as markup


def _model_lines(models: dict[str, Any]) -> list[str]:
    lines = []
    for model, info in sorted(models.items()):
        if info["pause"]:
            pause = info["pause"]
            lines.append(clean(f"paused      {model}: {pause['left_s']:.0f}s more ({pause['reason']})"))
        if info["quota_alert"]:
            alert = info["quota_alert"]
            lines.append(clean(f"QUOTA ALERT {model}: {alert['kind']} quota, {alert['count']} x 429: "
                               f"{alert['reason']}"))
    return lines


# -- the loop ----------------------------------------------------------------------------------------


async def top(
    reader: FleetReader, console: Console, *, interval_s: float, once: bool,
    wait: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Show frames until cancelled (``once``: print one and return). ``wait`` is how the loop waits
    between two reads (default ``asyncio.sleep``; tests change the queue there instead of sleeping)."""
    import asyncio
    import time

    from producer.errors import StoreUnavailableError

    wait = wait or asyncio.sleep
    since_s = time.time()  # jobs ended from now on count towards throughput

    async def read() -> Fleet:
        return await reader.read(ended_since_s=since_s, latencies=False)

    previous = await read()
    if once:
        await wait(interval_s)
        console.print(render(frame(previous, await read())))
        return
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    shown = frame(None, previous)
    with Live(render(shown), console=console, auto_refresh=False) as live:
        while True:
            await wait(interval_s)
            try:
                current = await read()
            except StoreUnavailableError as err:  # Redis restarting: keep the last frame, say so, try again
                note = Text(f"{err}; showing the last read, trying again every {interval_s:g}s")
                live.update(Group(render(shown), note), refresh=True)
                continue
            shown = frame(previous, current)
            live.update(render(shown), refresh=True)
            previous = current


async def cmd_top(args: argparse.Namespace, settings: WorkerConfig) -> int:
    """The live view (``--once``: one frame, for a pipe or a test)."""
    import asyncio
    import signal

    from rich.console import Console

    from flexq.fleet import FleetReader
    from flexq.interrupt import Interrupt

    reader = await FleetReader.connect(settings)
    task = asyncio.current_task()
    assert task is not None
    interrupt = Interrupt(task)  # Ctrl-C ends the view even if a read swallows one cancellation
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        await top(reader, Console(), interval_s=args.interval_s, once=args.once)
    except asyncio.CancelledError:
        if not interrupt.requested:
            raise
    finally:
        interrupt.closing = True
        loop.remove_signal_handler(signal.SIGINT)
        await reader.close()
    return 0  # Ctrl-C is how a live view ends: not an error


def add_commands(sub: Any) -> None:
    """Add ``flexq top`` to the CLI's subparsers."""
    p = sub.add_parser("top", help="live view of the fleet: throughput, 503/429 rates, flow control, cost per hour")
    p.add_argument("--interval-s", type=seconds, default=DEFAULT_INTERVAL_S,
                   help=f"seconds between two reads (default {DEFAULT_INTERVAL_S:g})")
    p.add_argument("--once", action="store_true", help="print one frame (two reads --interval-s apart) and exit")
