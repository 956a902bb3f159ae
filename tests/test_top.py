"""``flexq top``: frames from two reads of a real Redis (database 15, flushed per test), seeded the way
producers and workers write the queue (tests/test_metrics.py's ``seed_fleet`` and ``run_attempt``).

What changed between the two reads is made inside ``top``'s ``wait`` (where the live view waits for
its next read), so the counts are exact and nothing sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
from dataclasses import replace
from typing import Any, cast

import pytest
from rich.console import Console

from flexq import top
from flexq.fleet import Fleet, FleetReader
from producer.errors import StoreUnavailableError
from producer.queue import FlexQueue
from producer.stats import summarize
from producer.status import Outcome, Status
from tests.conftest import API_KEY, make_settings
from tests.test_metrics import FLASH, fleet_settings, run_attempt, seed_fleet


def top_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flexq")
    top.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["top", *argv])


def text_console(width: int = 160) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, color_system=None), out


def table_rows(lines: list[str]) -> list[tuple[str, ...]]:
    """The flow-control table's rows: the lines after its header's rule, up to the first blank one,
    cut into cells at runs of two or more spaces (no cell holds two spaces in a row)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("───")) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith(("paused", "QUOTA")):
            break
        rows.append(tuple(re.split(r"\s{2,}", line.strip())))
    return rows


@pytest.mark.redis
async def test_once_prints_the_state_of_the_fleet(
    real_queue: FlexQueue, redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = fleet_settings(redis_url)
    await seed_fleet(real_queue, settings)
    monkeypatch.setenv("COLUMNS", "160")
    assert await top.cmd_top(top_args("--once", "--interval-s", "0.05"), settings) == 0
    out = capsys.readouterr().out
    assert API_KEY not in out
    lines = out.splitlines()
    assert re.fullmatch(r"flexq top - .* UTC - 1 worker\(s\) - queue flexq-test", lines[0]), lines[0]
    assert re.fullmatch(r"interval    last 0\.\d\ds", lines[1]), lines[1]
    assert "ended jobs  0: 0.00/s" in lines  # the jobs ended before top started are not throughput
    assert "attempts    0: 0.00/s" in lines
    assert "cost        $0.000000: $0.000000/h ($0.002500 in all)" in lines
    assert "arq queue   due 2, deferred 1" in lines
    assert "jobs        queued 1, running 1, retrying 1" in lines
    rows = set(table_rows(lines))
    assert ("gemini-2.5-flash", "flex", "2/8", "closed", "2%", "-") in rows
    assert ("gemini-2.5-flash-lite", "flex", "0/8", "closed", "-", "-") in rows
    [pro] = [row for row in rows if row[0] == "gemini-2.5-pro"]
    assert pro[:3] == ("gemini-2.5-pro", "standard", "0/8")
    assert re.fullmatch(r"open \d+s x1", pro[3]), pro
    assert any(re.fullmatch(r"paused      gemini-2\.5-flash: (599|600)s more \(maintenance\)", line) for line in lines)
    assert "QUOTA ALERT gemini-2.5-flash-lite: billing quota, 1 x 429: 429 billing" in lines


async def _change(queue: FlexQueue) -> None:
    """What happens between the two reads: 3 jobs end (2 cancelled, 1 succeeds at $0.003 after a 503
    and a 429: 3 attempts)."""
    await queue.cancel("t-1")
    await queue.cancel("t-2")
    await run_attempt(queue, "t-3", outcome=Outcome.OVERLOADED, then="retry", retry_in_s=0.0)
    await run_attempt(queue, "t-3", outcome=Outcome.RATE_LIMITED, then="retry", retry_in_s=0.0)
    await run_attempt(queue, "t-3", outcome=Outcome.OK, then="succeed", usd=0.003, standard_usd=0.006)


async def _enqueue(queue: FlexQueue) -> None:
    for job_id in ("t-0", "t-1", "t-2", "t-3", "t-4", "t-5"):  # t-5 stays queued
        await queue.enqueue({"model": FLASH, "prompt": job_id}, job_id=job_id)
    await queue.cancel("t-0")  # ended before the first read: not counted
    await run_attempt(queue, "t-4", outcome=Outcome.OK, then="succeed", usd=0.5)  # spent before: not counted


@pytest.mark.redis
async def test_the_frame_counts_what_changed_between_two_reads(real_queue: FlexQueue, redis_url: str) -> None:
    await _enqueue(real_queue)
    reader = await FleetReader.connect(fleet_settings(redis_url))
    try:
        since_s = (await reader.read()).now_s - 1  # as top does: from before its first read
        before = await reader.read(ended_since_s=since_s)
        await _change(real_queue)
        after = await reader.read(ended_since_s=since_s)
    finally:
        await reader.close()
    f = top.frame(before, after)
    assert (f.ended, f.attempts, f.shed_503, f.limited_429) == (3, 3, 1, 1)
    assert f.spent_usd == pytest.approx(0.003)
    assert f.interval_s == after.now_s - before.now_s
    assert f.interval_s is not None and f.interval_s > 0
    assert f.per_s(f.ended) == pytest.approx(3 / f.interval_s)
    assert f.cost_per_hour_usd == pytest.approx(0.003 / f.interval_s * 3600)


@pytest.mark.redis
async def test_once_shows_the_interval_it_waited(real_queue: FlexQueue, redis_url: str) -> None:
    await _enqueue(real_queue)
    waited: list[float] = []

    async def wait(interval_s: float) -> None:
        waited.append(interval_s)
        await _change(real_queue)

    console, out = text_console()
    reader = await FleetReader.connect(fleet_settings(redis_url))
    try:
        await top.top(reader, console, interval_s=0.5, once=True, wait=wait)
    finally:
        await reader.close()
    assert waited == [0.5]
    lines = out.getvalue().splitlines()
    shown = {line[:12].strip(): line[12:] for line in lines[1:]}
    assert shown["ended jobs"].startswith("3: ")
    assert shown["attempts"].startswith("3: ")
    assert shown["503s (shed)"].startswith("1: ") and shown["503s (shed)"].endswith("(33.3% of attempts)")
    assert shown["429s"].startswith("1: ") and shown["429s"].endswith("(33.3% of attempts)")
    assert re.fullmatch(r"\$0\.003000: \$[\d.]+/h \(\$0\.503000 in all\)", shown["cost"]), shown["cost"]
    assert shown["arq queue"] == "due 1, deferred 0"  # t-5
    assert shown["jobs"] == "queued 1, running 0, retrying 0"


class FlakyReader:
    """A reader whose third read fails as a Redis restart would."""

    def __init__(self, real: FleetReader) -> None:
        self.real = real
        self.reads = 0

    async def read(self, **kwargs: Any) -> Fleet:
        self.reads += 1
        if self.reads == 3:
            raise StoreUnavailableError("cannot read Redis at redis://***@127.0.0.1:6379/15: ConnectionError")
        return await self.real.read(**kwargs)


@pytest.mark.redis
async def test_the_live_view_redraws_and_rides_out_a_redis_blip(real_queue: FlexQueue, redis_url: str) -> None:
    await real_queue.enqueue({"model": FLASH, "prompt": "x"}, job_id="live-1")
    waits = 0

    async def wait(interval_s: float) -> None:
        nonlocal waits
        waits += 1
        if waits == 3:  # after the failed read: a job ends before the next one
            await real_queue.cancel("live-1")
        if waits == 4:
            raise asyncio.CancelledError  # Ctrl-C

    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)
    reader = await FleetReader.connect(fleet_settings(redis_url))
    flaky = FlakyReader(reader)
    try:
        with pytest.raises(asyncio.CancelledError):
            await top.top(cast(FleetReader, flaky), console, interval_s=2.0, once=False, wait=wait)
    finally:
        await reader.close()
    assert flaky.reads == 4  # the first read, then one after each of the three waits
    screen = out.getvalue()
    assert "first read: rates from the next one" in screen
    assert "cannot read Redis at redis://***@127.0.0.1:6379/15: ConnectionError; showing the last read" in screen
    assert "ended jobs  1: " in screen  # over the two intervals since the last good read


def _fleet(now_s: float, *, ended: int, counters: dict[str, float]) -> Fleet:
    jobs = dict.fromkeys((str(s) for s in Status), 0)
    return Fleet(queue="q", now_s=now_s, jobs=jobs, stats=summarize(counts=jobs, counters=counters, latencies_ms=[]),
                 arq_due=0, arq_deferred=0, workers=0, flow={"scopes": [], "models": {}, "transitions": []},
                 ended=ended)


def test_counters_that_went_back_count_as_no_change() -> None:
    high = {"attempts:ok": 10.0, "attempts:overloaded": 4.0, "attempts:flex:ok": 10.0, "cost_usd:flex": 1.0}
    low = {"attempts:ok": 2.0, "cost_usd:flex": 0.5}  # the stats hash deleted and started again
    f = top.frame(_fleet(100.0, ended=7, counters=high), _fleet(102.0, ended=5, counters=low))
    assert (f.interval_s, f.ended, f.attempts, f.shed_503, f.spent_usd) == (2.0, 0, 0, 0, 0.0)
    assert f.cost_per_hour_usd == 0.0


def test_a_first_frame_has_no_rates() -> None:
    console, out = text_console()
    f = top.frame(None, _fleet(100.0, ended=3, counters={"attempts:ok": 1.0}))
    assert (f.interval_s, f.ended, f.per_s(3), f.cost_per_hour_usd) == (None, None, None, None)
    console.print(top.render(f))
    lines = out.getvalue().splitlines()
    assert "interval    first read: rates from the next one" in lines
    assert "ended jobs  -" in lines
    assert "cost        -: -/h ($0.000000 in all)" in lines
    assert "flow control: no (model, tier) used lately" in lines


def test_control_characters_in_a_pause_reason_are_escaped() -> None:
    fleet = _fleet(100.0, ended=0, counters={})
    flow = {"scopes": [], "transitions": [], "models": {FLASH: {
        "pause": {"left_s": 30.0, "reason": "\x1b[2Jwiped [bold]x[/bold]"}, "quota_alert": None}}}
    console, out = text_console()
    console.print(top.render(top.frame(None, replace(fleet, flow=flow))))
    assert "paused      gemini-2.5-flash: 30s more (\\x1b[2Jwiped [bold]x[/bold])" in out.getvalue().splitlines()


async def test_cmd_top_fails_at_once_when_redis_does_not_answer() -> None:
    settings = make_settings(redis_url="redis://:s3cret-pw@127.0.0.1:1/0")
    with pytest.raises(StoreUnavailableError) as caught:
        await top.cmd_top(top_args("--once"), settings)
    assert "s3cret-pw" not in str(caught.value)


def test_arguments() -> None:
    args = top_args()
    assert (args.interval_s, args.once) == (1.0, False)
    assert top_args("--once", "--interval-s", "0.5").interval_s == 0.5
    for bad in ("0", "-1", "nan", "x"):
        with pytest.raises(SystemExit):
            top_args("--interval-s", bad)


# -- 80 columns and Ctrl-C -----------------------------------------------------------------------------


def _scope(model: str, tier: str, limit: float, in_flight: int, *, state: str = "closed", open_for_s: float = 0.0,
           opens: int = 0, probe_out: bool = False, random_503: float | None = None,
           step: int | None = None) -> dict[str, Any]:
    return {"model": model, "tier": tier, "limit": limit, "in_flight": in_flight,
            "breaker": {"state": state, "open_for_s": open_for_s, "opens": opens, "probe_out": probe_out},
            "random_503_rate": random_503, "capacity_step": step}


LONG_REASON = "GenerateRequestsPerMinutePerProjectPerModel, and then some more words past the edge"


def busy_frame() -> top.Frame:
    """A busy fleet: big counts, three models on two tiers, an open breaker, a probe, a long pause reason."""
    flow = {"transitions": [], "scopes": [
        _scope(FLASH, "flex", 139.0, 1000, random_503=0.25),
        _scope("gemini-2.5-flash-lite", "flex", 31.337, 28, random_503=0.23, step=1000),
        _scope("gemini-2.5-pro", "standard", 1000.0, 12, state="open", open_for_s=287.4, opens=12),
        _scope("gemini-2.5-pro", "flex", 8.0, 1, state="half_open", probe_out=True),
    ], "models": {FLASH: {"pause": {"left_s": 3599.0, "reason": LONG_REASON}, "quota_alert": None}}}
    before = _fleet(1_700_000_000.0, ended=0, counters={"attempts:ok": 10.0})
    counters = {"attempts:ok": 123_456.0, "attempts:overloaded": 98_765.0, "attempts:rate_limited": 4321.0,
                "cost_usd:flex": 12345.678901, "cost_usd:standard": 9876.54321}
    after = replace(_fleet(1_700_000_001.0, ended=99_999, counters=counters), flow=flow, arq_due=123_456,
                    arq_deferred=1_234_567, workers=120, queue="flexq-production",
                    jobs={"queued": 1_234_567, "running": 12_000, "retrying": 123_456})
    return top.frame(before, after)


def rendered(f: top.Frame, width: int) -> list[str]:
    console, out = text_console(width)
    console.print(top.render(f))
    return [line.rstrip() for line in out.getvalue().splitlines()]


def test_a_busy_frame_fits_80_columns_without_wrapping() -> None:
    narrow, wide = rendered(busy_frame(), 80), rendered(busy_frame(), 200)
    assert max(len(line) for line in narrow) <= 80, "\n".join(line for line in narrow if len(line) > 80)
    assert len(narrow) == len(wide)  # nothing wrapped onto a line of its own
    assert narrow[:-1] == wide[:-1]  # nor cut, but for the pause's free text (below)
    assert table_rows(narrow) == [
        (FLASH, "flex", "1000/139", "closed", "25%", "-"),
        ("gemini-2.5-flash-lite", "flex", "28/31.34", "closed", "23%", "~1000"),
        ("gemini-2.5-pro", "standard", "12/1000", "open 287s x12", "-", "-"),
        ("gemini-2.5-pro", "flex", "1/8", "probing", "-", "-"),
    ]
    assert "jobs        queued 1234567, running 12000, retrying 123456" in narrow
    assert wide[-1] == f"paused      {FLASH}: 3599s more ({LONG_REASON})"
    assert len(narrow[-1]) == 80 and narrow[-1].endswith("…") and wide[-1].startswith(narrow[-1][:-1])


def test_a_long_model_name_folds_in_its_column_and_is_not_lost() -> None:
    f = busy_frame()
    scopes = [_scope("gemini-3-pro-image-preview", "standard", 8.0, 8, state="open", open_for_s=300, opens=12)]
    f = f._replace(fleet=replace(f.fleet, flow={**f.fleet.flow, "scopes": scopes}))
    narrow = rendered(f, 80)
    assert max(len(line) for line in narrow) <= 80
    start = next(i for i, line in enumerate(narrow) if line.startswith("───")) + 1
    assert "".join(line.split()[0] for line in narrow[start:start + 2]) == "gemini-3-pro-image-preview"


@pytest.mark.redis
def test_ctrl_c_ends_the_live_view_cleanly(redis_url: str) -> None:
    """``flexq top`` on a terminal (a pseudo-terminal 80 columns wide), interrupted as Ctrl-C does."""
    import fcntl
    import os
    import pty
    import select
    import signal
    import struct
    import subprocess
    import sys
    import termios
    import time

    from tests.helpers import ROOT

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_", "COLUMNS", "LINES"))}
    env.update(REDIS_URL=redis_url, FLEXQ_QUEUE="flexq-test", TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-m", "flexq", "top", "--interval-s", "0.2"], cwd=ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""

    def read_until(done: Any, timeout_s: float) -> None:
        nonlocal out
        give_up = time.monotonic() + timeout_s
        while not done() and time.monotonic() < give_up:
            ready, _, _ = select.select([master], [], [], 0.1)  # waits for output, at most 0.1 s
            if ready:
                try:
                    out += os.read(master, 65536)
                except OSError:  # the other end closed: the process is gone
                    return

    try:
        read_until(lambda: out.count(b"interval    last") >= 2, 30)  # the first frames, redrawn
        assert out.count(b"interval    last") >= 2, out.decode(errors="replace")[-2000:]
        proc.send_signal(signal.SIGINT)
        read_until(lambda: proc.poll() is not None, 15)  # a deadline: a loaded machine exits slowly
        code = proc.wait(timeout=1)  # it has exited already, or this fails the test
        read_until(lambda: False, 0.3)  # what it wrote last
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = out.decode(errors="replace")
    assert code == 0, text[-2000:]  # Ctrl-C is how a live view ends: not an error
    assert "Traceback" not in text, text[-2000:]
    assert text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l"), "the cursor was left hidden"
    assert "flexq top - " in text and "queue flexq-test" in text
