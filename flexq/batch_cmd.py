"""``flexq batch`` and ``flexq demo``: argument parsing, progress display and the summary."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from flexq import exits, render
from flexq.batch import BatchJob, journal_path, summarize_batch
from flexq.batch import Progress as BatchProgress
from flexq.embedded import open_runtime
from flexq.interrupt import Interrupt
from producer.pricing import unpriced_models, unpriced_warning
from producer.status import FALLBACKS, Tier
from simulator import SimConfig
from worker import logs
from worker.config import WorkerConfig

PLAIN_EVERY_S = 5.0
#: The demo's simulator: a peak hour on a shared flex pool. It serves 24 of our calls at once and
#: sheds the rest with an immediate 503 (capacity); besides, 30% of calls are shed whatever our load
#: (other customers' demand), 2% get a 429 with RetryInfo, and answers take seconds. Shared flow
#: control learns the capacity and keeps it full without treating the random 503s as a full pool.
DEMO_SIM = SimConfig(
    latency_s=1.5, latency_dist="exp", capacity=24, rate_503=0.30, rate_429=0.02, retry_delay_s=1.0, seed=2026
)
DEMO_KNOBS = {"retry_base_s": 0.5, "retry_max_s": 4.0}


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = exits.Parser(prog=prog)
    if prog.endswith("batch"):
        parser.add_argument("input", type=Path, help="JSONL requests, one a line")
        parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL results, in input order")
        parser.add_argument("--simulate", action="store_true", help="use the bundled simulator, not the real API")
    else:
        parser.add_argument("-o", "--output", type=Path, default=None, help="results file (default: a temp dir)")
    parser.add_argument("--concurrency", type=exits.count(1), default=None,
                        help="in-process jobs in flight (default 100)")
    parser.add_argument("--workers", type=exits.count(0), default=1,
                        help="in-process workers (0: rely on `flexq worker`s)")
    parser.add_argument("--deadline-s", type=exits.seconds, default=None, help="per-job deadline (default 24 h)")
    parser.add_argument("--fallback", choices=FALLBACKS, default="none",
                        help="standard: may end on the standard tier; flex: batch-tier lines whose batch expires run "
                        "on flex")
    parser.add_argument("--tier", choices=[str(t) for t in Tier], default=None,
                        help="every line's tier unless the line has its own (`tier`): flex (default), standard, "
                        "priority, batch (the Gemini Batch API)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: Sequence[str]) -> int:
    command, rest = argv[0], list(argv[1:])
    args = build_parser(f"flexq {command}").parse_args(rest)
    out = args.output
    hint = (f"interrupted; finished jobs are saved in {journal_path(out) if out else 'the journal'}; "
            "run the same command again to resume")
    return exits.run(lambda: asyncio.run(run(command, args)), interrupted=hint, after_progress=True)


KEY_NAMES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def missing_key_message(environ: Mapping[str, str]) -> str:
    """Why a batch without a key is refused, naming a variable that looks like a misspelt key (never its value)."""
    near = sorted({name for name in environ if name not in KEY_NAMES and environ[name]
                   and difflib.get_close_matches(name.upper(), KEY_NAMES, n=1, cutoff=0.8)})
    typo = f" ({', '.join(near)} is set: a typo?)" if near else ""
    return ("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) to call the real API, or pass --simulate "
            f"to answer from the bundled simulator{typo}")


async def run(command: str, args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    interrupt = Interrupt(task)
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupt)
    try:
        return await _prepare(command, args, interrupt)
    except asyncio.CancelledError:
        if interrupt.requested:
            raise KeyboardInterrupt from None
        raise


async def _prepare(command: str, args: argparse.Namespace, interrupt: Interrupt) -> int:
    settings = WorkerConfig()
    demo = command == "demo"
    embedded = "REDIS_URL" not in os.environ
    has_key = bool(settings.channels) or settings.vertex or (  # channels and Vertex AI are checked at start-up
        settings.gemini_api_key is not None and bool(settings.gemini_api_key.get_secret_value()))
    simulate = demo or args.simulate
    if embedded and args.workers == 0:
        raise exits.UsageError("--workers 0 needs REDIS_URL: no `flexq worker` can reach the in-process Redis "
                               "stand-in, so nothing would run the jobs")
    if not simulate and not has_key and args.workers > 0:  # never answer from the simulator unasked
        raise exits.UsageError(missing_key_message(os.environ))
    if demo:
        settings = settings.model_copy(update=DEMO_KNOBS)
        source = Path(str(resources.files("flexq") / "data" / "demo.jsonl"))
        output = args.output or Path(tempfile.mkdtemp(prefix="flexq-demo-")) / "demo-out.jsonl"
        output.unlink(missing_ok=True)
        journal_path(output).unlink(missing_ok=True)
    else:
        source, output = args.input, args.output
    err = Console(stderr=True, soft_wrap=True)
    if embedded:
        err.print("[yellow]note:[/] REDIS_URL is not set: using an in-process Redis stand-in; job state is not "
                  "durable (the output journal is). Set REDIS_URL=redis://HOST:6379/0 to use a real Redis.")
    if simulate:
        why = "demo" if demo else "--simulate"
        err.print(f"[yellow]note:[/] calling the bundled Gemini simulator in-process ({why}), not the real API.")
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = output.with_name(output.name + ".log")
    with log_path.open("a", encoding="utf-8") as log_file:
        logs.configure("json", stream=log_file)
        return await _run(settings, args, source, output, embedded=embedded, simulate=simulate,
                          sim=DEMO_SIM if demo else None, log_path=log_path, console=err, interrupt=interrupt)


async def _run(
    settings: WorkerConfig, args: argparse.Namespace, source: Path, output: Path, *, embedded: bool,
    simulate: bool, sim: SimConfig | None, log_path: Path, console: Console, interrupt: Interrupt,
) -> int:
    runtime = await open_runtime(settings, embedded=embedded, simulate=simulate, sim_config=sim)
    try:
        display = Display(console)
        job = BatchJob(runtime.queue, source, output, deadline_s=args.deadline_s, fallback=args.fallback,
                       tier=args.tier, on_progress=display.update)
        lines, bad = job.parse()
        for error in bad:
            console.print(f"[red]{source}:[/] {error}")
        if sim is None:  # the demo's file names a made-up model on purpose
            for model in unpriced_models(line.model for line in lines):
                console.print(f"[yellow]warning:[/] {escape(unpriced_warning(model))}", highlight=False)
        if not lines:
            console.print("flexq: no valid lines to run")
            return 1
        if args.workers > 0:
            await runtime.start_workers(args.workers, args.concurrency or settings.concurrency)
        with display:
            result = await job.run(lines, bad)
    finally:
        interrupt.closing = True
        await runtime.close()
    summary = summarize_batch(result)
    summary["batch"]["output"], summary["batch"]["log"] = str(output), str(log_path)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        print_summary(Console(soft_wrap=True), summary)
    return 0


class Display:
    """A live bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self._bar = Progress(
            TextColumn("[bold]flexq batch"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self._task = self._bar.add_task("", total=None)
        self._last_plain = 0.0

    def __enter__(self) -> Display:
        if self.live:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._bar.stop()

    def update(self, p: BatchProgress) -> None:
        if self.live:
            self._bar.update(self._task, total=p.total, completed=p.done, description=p.line())
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_EVERY_S or p.done == p.total:
            self._last_plain = now
            self.console.print(f"progress: {p.line()}", highlight=False)


def print_summary(console: Console, s: dict[str, Any]) -> None:
    """The same report as ``flexq stats`` (scoped to this batch's jobs), then what only a batch has."""
    batch = s["batch"]
    console.print(f"\n[bold]flexq batch summary[/] ({batch['lines']} jobs in {batch['elapsed_s']}s)")
    render.stats(console, s)
    if batch["reused_from_earlier_run"]:
        console.print(f"resumed: {batch['reused_from_earlier_run']} result(s) reused from an earlier run")
    failures = list(batch["failures"].items())
    for job_id, reason in failures[:20]:
        console.print(render.clean(f"failed {job_id}: {reason}"), highlight=False, markup=False)
    if len(failures) > 20:
        console.print(f"… and {len(failures) - 20} more failures (see the output file)")
    console.print(f"answers: {batch['output']}   log: {batch['log']}", highlight=False)

