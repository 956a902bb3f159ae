"""Human output of the admin CLI: readable tables (rich). ``--json`` bypasses this module."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flexq.exits import clean
from producer.models import JobRecord

__all__ = ["clean", "job_list", "stats", "status"]

def _t(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _short(text: str | None, width: int = 60) -> str:
    """One line, cut to ``width``, with rich markup escaped (prompts may hold ``[[...]]``)."""
    if not text:
        return ""
    text = clean(" ".join(text.split()))
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def status(
    console: Console, record: JobRecord, *, thread: list[str] | None = None, children: list[str] | None = None
) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_row("id", record.id)
    head.add_row("status", f"[bold]{record.status}[/bold]")
    head.add_row("model", record.request.model if record.request else "-")
    head.add_row("created", _t(record.created_at))
    head.add_row("updated", _t(record.updated_at))
    head.add_row("deadline", _t(record.deadline_at))
    head.add_row("tier", str(record.tier))
    head.add_row("fallback", record.fallback)
    if record.channels:
        head.add_row("channels", escape(", ".join(record.channels)))
    if record.batch is not None:
        head.add_row("batch", escape(f"{record.batch.name} since {_t(record.batch.submitted_at)}"))
    if thread and len(thread) > 1:
        head.add_row("thread", escape(" -> ".join(thread)) + f" (turn {len(thread)})")
    if children:
        head.add_row("continued by", escape(", ".join(children)))
    if record.tags:
        head.add_row("tags", escape(clean(", ".join(f"{k}={v}" for k, v in record.tags.items()))))
    if record.cost_usd is not None:
        head.add_row("cost", f"${record.cost_usd:.6f} (standard would be ${record.standard_cost_usd or 0:.6f})")
    if record.error:
        head.add_row("error", escape(clean(f"{record.error.kind}: {record.error.message}")))
    if record.result:
        head.add_row("finish", f"{record.result.finish_reason} on {record.result.tier}")
        head.add_row("text", _short(record.result.text, 200))
        for call in record.result.function_calls:
            head.add_row("function call", escape(_short(f"{call.name}({call.args}) id={call.id}", 200)))
        for image in record.result.images:
            size = f" {image.width}x{image.height}" if image.width and image.height else ""
            head.add_row("image", f"{image.index}: {image.mime_type}{size}, {image.bytes} bytes "
                         f"(flexq result {escape(record.id)} --save DIR)")
    console.print(head)
    if record.attempts:
        console.print(attempts_table(console, record))


#: Tiers in the narrow attempts table.
_TIER = {"standard": "std"}


def attempts_table(console: Console, record: JobRecord) -> Table:
    """One line per attempt: every column when they fit on the console, else (80 columns when piped) the
    start time without the date on the job's creation day, ``std`` for standard, the served tier only
    where it differs, no HTTP status (the error says it), and the error cut to what is left of the line."""
    wide = Table(title="attempts", title_justify="left")
    channels = any(a.channel not in (None, "default") for a in record.attempts)  # FLEXQ_CHANNELS, a batch
    cols = ("#", "tier", "served", *(("channel",) if channels else ()), "started", "latency ms", "outcome", "http",
            "retry in s", "error")
    for col in cols:
        wide.add_column(col, no_wrap=True)
    for a in record.attempts:
        wide.add_row(
            str(a.number), str(a.tier), a.served_tier or "-", *((escape(a.channel or "-"),) if channels else ()),
            _t(a.started_at), "-" if a.latency_ms is None else str(a.latency_ms), str(a.outcome or "in flight"),
            "-" if a.http_status is None else str(a.http_status),
            "-" if a.retry_in_s is None else f"{a.retry_in_s:g}", _short(a.error, 50),
        )
    if console.measure(wide, options=console.options.update_width(10_000)).maximum <= console.width:
        return wide
    table = Table(title="attempts", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    day = record.created_at.date()
    rows = []
    for a in record.attempts:
        asked, served = _TIER.get(str(a.tier), str(a.tier)), _TIER.get(a.served_tier or "", a.served_tier)
        tier = asked if served in (None, asked) else f"{asked}>{served}"
        started = a.started_at.strftime("%H:%M:%S" if a.started_at.date() == day else "%m-%d %H:%M:%S")
        rows.append((
            str(a.number), tier, started, "-" if a.latency_ms is None else str(a.latency_ms),
            str(a.outcome or "in flight"), "-" if a.retry_in_s is None else f"{a.retry_in_s:g}",
            _short(a.error, 200),
        ))
    headers = ("#", "tier", "started", "ms", "outcome", "retry s")
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(headers)]
    for col, fixed in zip(headers, widths, strict=True):  # as wide as their widest cell: only the error gives way
        table.add_column(col, justify="right" if col in ("#", "ms", "retry s") else "left", no_wrap=True,
                         width=fixed)
    # what is left of the line: two columns of padding and divider between two columns
    table.add_column("error", no_wrap=True, overflow="ellipsis",
                     max_width=max(10, console.width - sum(widths) - 2 * len(widths)))
    for row in rows:
        table.add_row(*row)
    return table


def job_list(console: Console, records: list[JobRecord]) -> None:
    table = Table()
    for col in ("id", "status", "model", "attempts", "updated", "detail"):
        table.add_column(col)
    for r in records:
        detail = f"{r.error.kind}: {r.error.message}" if r.error else _short(r.result.text if r.result else "", 40)
        table.add_row(
            r.id, str(r.status), r.request.model if r.request else "-", str(len(r.attempts)),
            _t(r.updated_at), _short(detail, 50),
        )
    console.print(table)
    console.print(f"{len(records)} job(s)")


def stats(console: Console, doc: dict[str, Any]) -> None:
    jobs = Table(title="jobs by status", title_justify="left")
    jobs.add_column("status")
    jobs.add_column("jobs", justify="right")
    for name, count in doc["jobs"].items():
        jobs.add_row(name, str(count))
    console.print(jobs)
    attempts = Table(title=f"attempts by outcome ({doc['attempts']['total']} in all)", title_justify="left")
    attempts.add_column("outcome")
    attempts.add_column("attempts", justify="right")
    for name, count in sorted(doc["attempts"]["by_outcome"].items()):
        attempts.add_row(name, str(count))
    console.print(attempts)
    rates, lat = doc["rates"], doc["latency_ms"]
    console.print(f"503 rate: {_pct(rates['overloaded_503'])}   429 rate: {_pct(rates['rate_limited_429'])}")
    console.print(f"latency (ok attempts, last {lat['samples']}): p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}")
    for tier, toks in sorted(doc["tokens"].items()):
        console.print(f"tokens on {tier}: " + ", ".join(f"{k} {v}" for k, v in sorted(toks.items())))
    cost = doc["cost"]
    unknown = ""
    if cost["jobs_with_unknown_cost"]:
        names = ", ".join(cost.get("unknown_price_models") or {})
        unknown = f"; {cost['jobs_with_unknown_cost']} job(s) on models with no known price" + (
            f": {names}" if names else "")
    console.print(
        f"cost: spent ${cost['spent_usd']:.6f}, standard would be ${cost['standard_equivalent_usd']:.6f}, "
        f"saved ${cost['saved_usd']:.6f}{escape(clean(unknown))}"
    )
    if cost.get("by_tier_usd"):
        console.print("cost by tier: " + ", ".join(f"{t} ${usd:.6f}" for t, usd in sorted(cost["by_tier_usd"].items())))
    by_channel = doc["attempts"].get("by_channel") or {}
    for channel in sorted(set(by_channel) | set(cost.get("by_channel_usd") or {})):
        outcomes = ", ".join(f"{o} {n}" for o, n in sorted(by_channel.get(channel, {}).items())) or "no attempts"
        usd = (cost.get("by_channel_usd") or {}).get(channel, 0.0)
        console.print(f"channel {escape(clean(channel))}: {outcomes}; cost ${usd:.6f}")
    for line in doc.get("flow", []):
        console.print(line)
    for budget in doc.get("budgets", []):
        console.print(
            f"budget {escape(clean(budget['scope']))} per {budget['window']} ({budget['window_id']}): "
            f"spent ${budget['spent_usd']:.6f} of ${budget['limit_usd']:g}, reserved ${budget['reserved_usd']:.6f}, "
            f"left ${budget['left_usd']:.6f}; window ends {budget['ends_at']}"
        )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
