"""flexq.render: what ``flexq status``, ``flexq list`` and ``flexq stats`` print, as plain text.

Records are built with ``producer.transitions`` and the stats document with ``producer.stats``, as
the CLI gets them; the console writes to a string, wide and without colour.
"""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta

from rich.console import Console

from flexq import render
from producer import transitions
from producer.models import JobError, JobRecord, JobResult, Usage
from producer.request import GenerateRequest
from producer.stats import summarize
from producer.status import Fallback, Outcome, Status, Tier

MODEL = "gemini-2.5-flash"
T0 = datetime(2026, 11, 21, 22, 52, 49, tzinfo=UTC)
USAGE = Usage(prompt_tokens=100, output_tokens=20, thoughts_tokens=30, total_tokens=150)
OVERLOADED = "503 UNAVAILABLE: The model is overloaded. Please try again later."


def printed(draw: object, *args: object) -> str:
    console = Console(file=io.StringIO(), width=240, color_system=None, highlight=False, soft_wrap=False)
    draw(console, *args)  # type: ignore[operator]
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def flat(out: str) -> str:
    """The output with all whitespace runs as one space (a table title wraps to the table's width)."""
    return " ".join(out.split())


def row_with(out: str, *cells: str) -> str:
    """The one table line holding every cell, in order."""
    pattern = re.compile(r".*".join(re.escape(cell) for cell in cells))
    rows = [line for line in out.splitlines() if pattern.search(line)]
    assert len(rows) == 1, f"{cells} in {len(rows)} lines of:\n{out}"
    return rows[0]


def new(job_id: str = "job-1", *, tags: dict[str, str] | None = None, fallback: Fallback = "none") -> JobRecord:
    return transitions.new_record(
        job_id, GenerateRequest(model=MODEL, prompt="Hi"), now=T0, deadline_s=3600, fallback=fallback,
        tags=tags or {},
    )


def after(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def shed_then_answered(
    text: str = "Hello there", *, tags: dict[str, str] | None = None, fallback: Fallback = "none"
) -> JobRecord:
    record = transitions.begin_attempt(new(tags=tags, fallback=fallback), tier=Tier.FLEX, worker="w1", now=after(1))
    record = transitions.close_attempt(
        record, number=1, now=after(1.014), outcome=Outcome.OVERLOADED, http_status=503, error=OVERLOADED,
        retry_in_s=0.092,
    )
    record = transitions.schedule_retry(record, next_tier=Tier.FLEX, now=after(1.014))
    record = transitions.begin_attempt(record, tier=Tier.FLEX, worker="w1", now=after(2))
    record = transitions.close_attempt(
        record, number=2, now=after(3.25), outcome=Outcome.OK, http_status=200, served_tier="flex", usage=USAGE
    )
    result = JobResult(text=text, finish_reason="STOP", usage=USAGE, model_version=MODEL, tier="flex")
    return transitions.succeed(record, result=result, now=after(3.25), cost_usd=7.8e-05, standard_cost_usd=1.55e-04)


# -- status ----------------------------------------------------------------------------------------


def test_status_of_a_succeeded_job_with_its_history() -> None:
    out = printed(render.status, shed_then_answered(tags={"team": "search", "run": "7"}, fallback="standard"))
    assert row_with(out, "id", "job-1")
    assert row_with(out, "status", "succeeded")
    assert row_with(out, "model", MODEL)
    assert row_with(out, "created", "2026-11-21 22:52:49")
    assert row_with(out, "updated", "2026-11-21 22:52:52")
    assert row_with(out, "deadline", "2026-11-21 23:52:49")
    assert row_with(out, "fallback", "standard")
    assert row_with(out, "tags", "team=search, run=7")
    assert row_with(out, "cost", "$0.000078 (standard would be $0.000155)")
    assert row_with(out, "finish", "STOP on flex")
    assert row_with(out, "text", "Hello there")
    assert "error" not in out.split("attempts")[0]
    assert "attempts" in out
    assert row_with(out, "#", "tier", "served", "started", "latency ms", "outcome", "http", "retry in s", "error")
    assert row_with(out, "1", "flex", "-", "2026-11-21 22:52:50", "14", "overloaded", "503", "0.092", "503 UNAVAILABLE")
    assert row_with(out, "2", "flex", "flex", "2026-11-21 22:52:51", "1250", "ok", "200", "-")


def test_status_of_a_job_in_flight() -> None:
    record = transitions.begin_attempt(new(), tier=Tier.STANDARD, worker="w1", now=after(1))
    out = printed(render.status, record)
    assert row_with(out, "status", "running")
    assert row_with(out, "1", "standard", "-", "2026-11-21 22:52:50", "-", "in flight", "-", "-")
    assert "cost" not in out and "finish" not in out


def test_status_of_a_failed_job_shows_the_error() -> None:
    record = transitions.fail(new(), kind="client_error", message="400 INVALID_ARGUMENT: bad", now=after(2),
                              http_status=400)
    out = printed(render.status, record)
    assert row_with(out, "status", "failed")
    assert row_with(out, "error", "client_error: 400 INVALID_ARGUMENT: bad")
    assert "attempts" not in out  # no attempt table without attempts


def test_status_of_a_quarantined_record() -> None:
    record = JobRecord(
        id="broken", status=Status.FAILED, created_at=T0, updated_at=T0, deadline_at=T0, request=None,
        error=JobError(kind="invalid_job", message="unreadable job record: not JSON"),
    )
    out = printed(render.status, record)
    assert row_with(out, "model", "-")
    assert row_with(out, "error", "invalid_job: unreadable job record: not JSON")


def test_markup_in_user_text_is_printed_as_is() -> None:
    record = shed_then_answered(text="Echo: [[fault:503]] and [bold]not bold[/bold]", tags={"note": "[red]x[/red]"})
    record = record.model_copy(update={"error": JobError(kind="blocked", message="prompt [blink]blocked[/blink]")})
    out = printed(render.status, record)
    assert "Echo: [[fault:503]] and [bold]not bold[/bold]" in out
    assert "note=[red]x[/red]" in out
    assert "blocked: prompt [blink]blocked[/blink]" in out


def test_long_text_is_one_line_and_cut() -> None:
    text = "first line\n\nsecond   line " + "y" * 500
    out = printed(render.status, shed_then_answered(text=text))
    line = row_with(out, "text", "first line second line")
    shown = line.split("text", 1)[1].strip()
    assert len(shown) == 200 and shown.endswith("…")
    error_cell = row_with(out, "overloaded", "503").split("0.092", 1)[1].strip(" │")
    assert error_cell == OVERLOADED[:49] + "…"  # attempt errors are cut at 50


# -- list ------------------------------------------------------------------------------------------


def test_job_list() -> None:
    failed = transitions.fail(new("f-1"), kind="deadline_exceeded", message="deadline passed", now=after(5))
    records = [shed_then_answered(text="A fine answer"), failed, new("q-1")]
    out = printed(render.job_list, records)
    assert row_with(out, "id", "status", "model", "attempts", "updated", "detail")
    assert row_with(out, "job-1", "succeeded", MODEL, "2", "2026-11-21 22:52:52", "A fine answer")
    assert row_with(out, "f-1", "failed", MODEL, "0", "2026-11-21 22:52:54", "deadline_exceeded: deadline passed")
    assert row_with(out, "q-1", "queued", MODEL, "0", "2026-11-21 22:52:49")
    assert out.rstrip().endswith("3 job(s)")


def test_empty_job_list() -> None:
    assert printed(render.job_list, []).rstrip().endswith("0 job(s)")


# -- stats -----------------------------------------------------------------------------------------


def test_stats() -> None:
    doc = summarize(
        counts={"queued": 3, "running": 1, "retrying": 0, "succeeded": 5, "failed": 1, "cancelled": 0},
        counters={
            "attempts:ok": 6, "attempts:overloaded": 2, "attempts:rate_limited": 1, "attempts:client_error": 1,
            "attempts:flex:ok": 6, "tokens:flex:prompt": 600, "tokens:flex:output": 120, "tokens:flex:thoughts": 0,
            "tokens:standard:prompt": 10, "cost_usd:flex": 0.000465, "standard_cost_usd": 0.00093,
            "cost_unknown_jobs": 2,
        },
        latencies_ms=[100, 200, 300, 400],
    )
    doc["flow"] = ["flow gemini-2.5-flash flex: limit 32, in flight 1, breaker closed"]
    out = printed(render.stats, doc)
    assert "jobs by status" in out
    assert row_with(out, "succeeded", "5") and row_with(out, "queued", "3")
    assert "attempts by outcome (10 in all)" in flat(out)
    assert row_with(out, "overloaded", "2") and row_with(out, "client_error", "1")
    outcome_row = re.compile(r"^\W*(ok|overloaded|rate_limited|client_error) ")
    outcomes = [line.split()[1] for line in out.splitlines() if outcome_row.match(line)]
    assert len(outcomes) == 4 and outcomes == sorted(outcomes)  # outcomes in name order
    assert "503 rate: 20.0%   429 rate: 10.0%" in out
    assert "latency (ok attempts, last 4): p50 200 ms  p95 400 ms" in out
    assert "tokens on flex: output 120, prompt 600, thoughts 0" in out
    assert "tokens on standard: prompt 10" in out
    assert (
        "cost: spent $0.000465, standard would be $0.000930, saved $0.000465; "
        "2 job(s) on models with no known price\n"
    ) in out
    assert out.rstrip().endswith("flow gemini-2.5-flash flex: limit 32, in flight 1, breaker closed")


def test_stats_names_the_models_with_no_known_price() -> None:
    doc = summarize(counts={"succeeded": 3}, counters={
        "cost_unknown_jobs": 3, "cost_unknown_model:gemini-2.5-flsh": 2, "cost_unknown_model:gemini-9-ultra": 1,
    }, latencies_ms=[])
    out = printed(render.stats, doc)
    assert "; 3 job(s) on models with no known price: gemini-2.5-flsh, gemini-9-ultra\n" in out


def test_stats_of_an_empty_queue() -> None:
    doc = summarize(counts={str(s): 0 for s in Status}, counters={}, latencies_ms=[])
    out = printed(render.stats, doc)
    assert "attempts by outcome (0 in all)" in flat(out)
    assert "503 rate: -   429 rate: -" in out
    assert "latency (ok attempts, last 0): p50 -  p95 -" in out
    assert "tokens on" not in out and "no known price" not in out
    assert "cost: spent $0.000000, standard would be $0.000000, saved $0.000000" in out


# -- narrow terminals -------------------------------------------------------------------------------


def test_attempts_table_at_80_columns_has_one_line_per_attempt() -> None:
    """Piped output is 80 columns wide: every attempt stays one readable line, the error cut to fit."""
    unreachable = "ClientConnectorDNSError: Cannot connect to host generativelanguage.googleapis.com:443 ssl:default"
    record = transitions.begin_attempt(new(), tier=Tier.FLEX, worker="w1", now=after(1))
    record = transitions.close_attempt(record, number=1, now=after(1.014), outcome=Outcome.OVERLOADED,
                                       http_status=503, error=OVERLOADED, retry_in_s=0.092)
    record = transitions.schedule_retry(record, next_tier=Tier.FLEX, now=after(1.014))
    record = transitions.begin_attempt(record, tier=Tier.FLEX, worker="w1", now=after(2))
    record = transitions.close_attempt(record, number=2, now=after(2.5), outcome=Outcome.CONNECTION_ERROR,
                                       error=unreachable, retry_in_s=86400)
    record = transitions.schedule_retry(record, next_tier=Tier.STANDARD, now=after(2.5))
    record = transitions.begin_attempt(record, tier=Tier.STANDARD, worker="w1", now=after(86402))  # the next day
    console = Console(width=80, record=True, color_system=None)
    render.status(console, record)
    out = console.export_text()
    lines = [line.rstrip() for line in out.splitlines()]
    assert max(len(line) for line in lines) <= 80
    table = lines[lines.index("attempts") + 1:]
    assert table[0].split() == ["#", "tier", "started", "ms", "outcome", "retry", "s", "error"]
    rows = [line for line in table if re.match(r"^\s*\d+\s", line)]
    assert len(rows) == len(table) - 2 == 3, out  # one line each, nothing wrapped (header and rule apart)
    assert rows[0].split()[:6] == ["1", "flex", "22:52:50", "14", "overloaded", "0.092"]
    assert "503 UNAVAILABLE: The" in rows[0] and rows[0].endswith("…")
    assert rows[1].split()[:6] == ["2", "flex", "22:52:51", "500", "connection_error", "86400"]
    assert "ClientConnectorDNS" in rows[1] and rows[1].endswith("…")
    assert rows[2].split() == ["3", "std", "11-22", "22:52:51", "-", "in", "flight", "-"]  # another day


def test_attempts_table_shows_every_column_where_they_fit() -> None:
    console = Console(width=200, record=True, color_system=None)
    render.status(console, shed_then_answered())
    out = console.export_text()
    assert row_with(out, "#", "tier", "served", "started", "latency ms", "outcome", "http", "retry in s", "error")
    assert row_with(out, "1", "flex", "-", "2026-11-21 22:52:50", "14", "overloaded", "503", "0.092")


def test_stats_show_cost_by_tier_and_each_channel() -> None:
    doc = summarize(counts={"succeeded": 3}, counters={
        "attempts:ok": 3, "cost_usd:flex": 0.002, "cost_usd:priority": 0.0072, "channel_attempts:studio:ok": 2,
        "channel_attempts:studio:overloaded": 4, "channel_attempts:vx:ok": 1, "channel_cost_usd:studio": 0.002,
        "channel_cost_usd:vx": 0.0072,
    }, latencies_ms=[])
    out = printed(render.stats, doc)
    assert "cost by tier: flex $0.002000, priority $0.007200" in out
    assert "channel studio: ok 2, overloaded 4; cost $0.002000" in out
    assert "channel vx: ok 1; cost $0.007200" in out
    empty = printed(render.stats, summarize(counts={}, counters={}, latencies_ms=[]))
    assert "channel " not in empty and "cost by tier" not in empty
