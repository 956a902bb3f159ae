"""``flexq``: the admin CLI. Errors are one line on stderr and a non-zero exit, never a traceback.

Start-up is kept short: this module imports only what the parser needs; each command imports what it
uses (pydantic, redis, rich, the SDK) when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexq import events_cmd
from flexq.exits import EXIT_ERROR, Parser, UsageError, clean, count, duration, run, seconds
from flexq.metrics import add_commands as add_metrics_commands
from flexq.metrics import cmd_metrics
from flexq.top import add_commands as add_top_commands
from flexq.top import cmd_top
from producer.status import FALLBACKS, Status, Tier

if TYPE_CHECKING:
    from producer.queue import FlexQueue
    from producer.settings import ProducerSettings
    from worker.config import WorkerConfig


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _console() -> Any:
    from rich.console import Console

    return Console()


def _jsonable(value: Any) -> Any:
    from producer.store import jsonable

    return jsonable(value)


async def _with_queue(settings: ProducerSettings, body: Callable[[FlexQueue], Awaitable[int]]) -> int:
    from producer.errors import JobNotFoundError
    from producer.queue import FlexQueue

    queue = await FlexQueue.connect(settings)
    try:
        return await body(queue)
    except JobNotFoundError as err:  # say where it looked: a wrong REDIS_URL or FLEXQ_QUEUE shows at once
        if err.where is None:
            err.where = settings.searched
        raise
    finally:
        await queue.close()


def _render() -> Any:
    from flexq import render

    return render


# -- commands ------------------------------------------------------------------------------------


def _policy_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--tier`` and ``--channel`` as enqueue keywords (left out when not given: the queue's defaults)."""
    out: dict[str, Any] = {}
    if args.tier is not None:
        out["tier"] = args.tier
    if args.channel:
        out["channels"] = list(args.channel)
    return out


async def cmd_enqueue(args: argparse.Namespace, settings: ProducerSettings) -> int:
    from flexq.jsonl import parse_jsonl

    if args.file:
        if args.prompt or args.model:
            raise UsageError("give either --file or --model/--prompt, not both")
        text = Path(args.file).read_text(encoding="utf-8")  # noqa: ASYNC240 - one read before any I/O starts
        from flexq.jsonl import stable_line_id

        # an id-less line gets the id `flexq batch` would give it: enqueueing the file again bills nothing twice
        lines, errors = parse_jsonl(
            text.splitlines(), max_bytes=settings.max_request_bytes,
            default_id=stable_line_id(str(Path(args.file).resolve())),  # noqa: ASYNC240 - before any I/O starts
            deadline_s=args.deadline_s, fallback=args.fallback, cache=True if args.cache else None,
            **_policy_args(args),
        )
        for error in errors:
            print(f"flexq: {args.file}: {error}", file=sys.stderr)
        _warn_unpriced(line.model for line in lines)

        async def many(queue: FlexQueue) -> int:
            done = await queue.enqueue_many([line.spec for line in lines])
            for item in done:
                print(item.id if item.created else f"{item.id} (exists: {item.record.status})")
            print(f"enqueued {sum(d.created for d in done)}, already there {sum(not d.created for d in done)}, "
                  f"bad lines {len(errors)}", file=sys.stderr)
            return EXIT_ERROR if errors else 0

        return await _with_queue(settings, many)
    if args.continue_from:
        if not args.prompt:
            raise UsageError("enqueue --continue-from ID needs --prompt (the next user turn)")
        request: dict[str, Any] = {"continue_from": args.continue_from, "prompt": args.prompt}
        if args.model:
            request["model"] = args.model
    elif not args.model or not args.prompt:
        raise UsageError("enqueue needs --model and --prompt (or --file F.jsonl, or --continue-from ID)")
    else:
        request = {"model": args.model, "prompt": args.prompt}
    tags = dict(_kv(t) for t in args.tag or [])
    from producer.request import MODEL_RE

    if args.model and MODEL_RE.fullmatch(args.model):  # a name that is not a model name is refused at enqueue
        _warn_unpriced([args.model])

    async def one(queue: FlexQueue) -> int:
        done = await queue.enqueue(
            request, job_id=args.id, deadline_s=args.deadline_s, fallback=args.fallback, tags=tags,
            cache=True if args.cache else None, **_policy_args(args),
        )
        if done.created:
            print(done.id)
        else:
            print(f"{done.id} (already enqueued, status {done.record.status}: not enqueued again)")
        return 0

    return await _with_queue(settings, one)


def _warn_unpriced(models: Iterable[str | None]) -> None:
    """A warning on stderr for each model missing from the price table (a typo?); enqueued all the same."""
    from producer.pricing import unpriced_models, unpriced_warning

    for model in unpriced_models(models):
        print(clean(f"flexq: warning: {unpriced_warning(model)}"), file=sys.stderr)


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--tag expects KEY=VALUE, got {text!r}")
    return key, value


async def cmd_status(args: argparse.Namespace, settings: ProducerSettings) -> int:
    async def body(queue: FlexQueue) -> int:
        record = await queue.get(args.id)
        if args.json:
            _print_json(_jsonable(record))
        else:
            thread = await queue.thread(record.id) if record.parent_id else [record]
            _render().status(_console(), record, thread=[r.id for r in thread],
                             children=await queue.children(record.id))
        return 0

    return await _with_queue(settings, body)


async def cmd_result(args: argparse.Namespace, settings: ProducerSettings) -> int:
    """A succeeded job's answer: text, function calls, parsed JSON; images saved with --save DIR."""

    async def body(queue: FlexQueue) -> int:
        record = await queue.get(args.id)
        if record.result is None:
            why = f": {record.error.message}" if record.error else ""
            message = f"flexq: job {record.id!r} is {record.status} and has no answer{why}"
            print(clean(message), file=sys.stderr)
            return EXIT_ERROR
        result = record.result
        saved: list[str | None] = []
        for image in result.images:
            if args.save is None:
                saved.append(None)
                continue
            data = await queue.blob(image.sha256)
            from producer.blobs import extension

            target = Path(args.save) / f"{record.id}-{image.index}{extension(image.mime_type)}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            saved.append(str(target))
        if args.json:
            _print_json({
                "id": record.id, "text": result.text, "function_calls": _jsonable(result.function_calls),
                "parsed": result.parsed,
                "images": [{**_jsonable(image), "path": p} for image, p in zip(result.images, saved, strict=True)],
            })
            return 0
        if result.text is not None:
            print(clean(result.text))
        for call in result.function_calls:
            print(clean(f"function call {call.name}({json.dumps(call.args)}) id={call.id}"))
        if result.parsed is not None and result.text is None:
            _print_json(result.parsed)
        for image, path in zip(result.images, saved, strict=True):
            size = f"{image.width}x{image.height} " if image.width and image.height else ""
            where = path or "(use --save DIR to write it)"
            print(f"image {image.index}: {image.mime_type} {size}{image.bytes} bytes -> {where}")
        return 0

    return await _with_queue(settings, body)


async def cmd_wait(args: argparse.Namespace, settings: ProducerSettings) -> int:
    async def body(queue: FlexQueue) -> int:
        record = await queue.wait(args.id, args.timeout_s)
        _print_json(_jsonable(record)) if args.json else _render().status(_console(), record)
        return 0 if record.status == Status.SUCCEEDED else EXIT_ERROR

    return await _with_queue(settings, body)


async def cmd_list(args: argparse.Namespace, settings: ProducerSettings) -> int:
    async def body(queue: FlexQueue) -> int:
        records = await queue.list(args.status, limit=args.limit)
        _print_json(_jsonable(records)) if args.json else _render().job_list(_console(), records)
        return 0

    return await _with_queue(settings, body)


async def cmd_retry(args: argparse.Namespace, settings: ProducerSettings) -> int:
    async def body(queue: FlexQueue) -> int:
        record = await queue.retry(args.id, deadline_s=args.deadline_s)
        print(f"{record.id} requeued ({len(record.attempts)} earlier attempt(s) kept)")
        return 0

    return await _with_queue(settings, body)


async def cmd_cancel(args: argparse.Namespace, settings: ProducerSettings) -> int:
    async def body(queue: FlexQueue) -> int:
        record = await queue.cancel(args.id)
        if record.status == Status.CANCELLED:
            print(f"{record.id} cancelled")
        else:
            print(f"{record.id} is running: abort requested; its worker will end it as cancelled")
        return 0

    return await _with_queue(settings, body)


async def cmd_stats(args: argparse.Namespace, settings: WorkerConfig) -> int:
    async def body(queue: FlexQueue) -> int:
        from worker.flow import config_from_settings
        from worker.flow_store import FlowControl, flow_lines

        doc = await queue.stats()
        cost = doc["cost"]
        if cost["jobs_with_unknown_cost"] and not cost.get("unknown_price_models"):
            cost["unknown_price_models"] = await _unpriced_in_recent_jobs(queue)
        flow = FlowControl(queue.redis, queue.store.keys, config_from_settings(settings))
        doc["flow_control"] = await flow.snapshot()
        doc["flow"] = flow_lines(doc["flow_control"])
        doc["budgets"] = await _budgets(queue, settings)
        _print_json(doc) if args.json else _render().stats(_console(), doc)
        return 0

    return await _with_queue(settings, body)


async def _budgets(queue: FlexQueue, settings: WorkerConfig) -> list[dict[str, Any]]:
    """Spend against each budget of ``FLEXQ_BUDGETS`` (this process's setting) in its current window."""
    from worker.budget import BudgetStore

    store = BudgetStore.of(queue.redis, queue.store.keys, settings)
    return [] if store is None else await store.snapshot()


#: How many of the latest succeeded jobs ``flexq stats`` reads to name the models with no known price.
UNPRICED_SCAN = 500


async def _unpriced_in_recent_jobs(queue: FlexQueue) -> dict[str, int]:
    """Models with no known price among the latest succeeded jobs, with their job counts: the queue's
    counters count such jobs without naming their models when the workers do not record the name."""
    found: dict[str, int] = {}
    for record in await queue.list(Status.SUCCEEDED, limit=UNPRICED_SCAN):
        if record.cost_usd is None and record.request is not None:
            model = record.request.model.removeprefix("models/")
            found[model] = found.get(model, 0) + 1
    return dict(sorted(found.items()))


async def cmd_pause(args: argparse.Namespace, settings: WorkerConfig) -> int:
    """Pause a model for every worker (jobs wait; one whose deadline falls inside the pause fails)."""

    from producer.request import MODEL_RE

    if not MODEL_RE.fullmatch(args.model):
        raise UsageError(f"{args.model!r} is not a model name such as 'gemini-2.5-flash'")

    async def body(queue: FlexQueue) -> int:
        import time

        from worker.config import flow_model
        from worker.flow import config_from_settings
        from worker.flow_store import FlowControl

        flow = FlowControl(queue.redis, queue.store.keys, config_from_settings(settings))
        scope = flow_model(args.model, args.channel)  # a channel's own pause: `model@channel`
        if args.command == "resume":
            await flow.resume(scope)
            woken = await queue.store.wake_waiting(args.model)
            print(f"{scope}: resumed (pause and quota alert lifted); {woken} waiting job(s) due now")
        else:
            await flow.pause(scope, time.time() + args.for_s, args.reason)
            print(f"{scope}: paused for {args.for_s:g}s by every worker ({args.reason})")
        return 0

    return await _with_queue(settings, body)


def cmd_worker(args: argparse.Namespace, settings: WorkerConfig) -> int:
    from worker.gemini import check_channels
    from worker.runtime import create_worker, tune_gc

    check_channels(settings)  # fail fast, before connecting anywhere
    if args.concurrency is not None:
        settings = settings.model_copy(update={"concurrency": args.concurrency})
    from worker import logs

    logs.configure(settings.log_format, level=logs.level_of(settings.log_level))
    worker = create_worker(settings, burst=args.burst)
    from redis.exceptions import RedisError
    tune_gc()  # a long-lived process with thousands of calls in flight (worker/runtime.py)

    from producer.errors import StoreUnavailableError, redis_failure

    try:
        worker.run()
    except RedisError as err:  # arq's start-up gave up on Redis (after its own retries): say what Redis answered
        raise StoreUnavailableError(redis_failure(settings.redis_url_redacted, err)) from err
    return 0


def cmd_simulate(argv: Sequence[str]) -> int:
    from simulator.cli import main as simulate_main

    return simulate_main(list(argv))


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flexq", description="Durable Gemini flex-tier job queue")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enqueue", help="enqueue one job (--model/--prompt) or a JSONL file (--file)")
    p.add_argument("--model")
    p.add_argument("--prompt")
    p.add_argument("--file", help="JSONL: one {id?, model, prompt|contents, config?, system_instruction?} a line")
    p.add_argument("--id", help="job id (idempotency key): [A-Za-z0-9._:-]{1,128}")
    p.add_argument("--deadline-s", type=seconds, default=None, help="give up after this long (default 24 h)")
    p.add_argument("--fallback", choices=FALLBACKS, default="none",
                   help="standard: may end on the standard tier; flex: a batch job whose batch expires runs on flex")
    p.add_argument("--tier", choices=[str(t) for t in Tier], default=None,
                   help="flex (default), standard, priority, or batch (the Gemini Batch API: half price, up to 24 h)")
    p.add_argument("--channel", action="append", metavar="NAME",
                   help="a worker channel to try, in order (repeat; default: all, in the worker's order)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE")
    p.add_argument("--continue-from", metavar="ID", help="continue this succeeded job's thread; --prompt is the turn")
    p.add_argument("--cache", action="store_true",
                   help="answer from the response cache if an identical request was answered lately")

    p = sub.add_parser("result", help="print a job's answer (text, function calls, JSON); --save DIR writes images")
    p.add_argument("id")
    p.add_argument("--save", metavar="DIR", help="write each image to DIR/<id>-<index>.<ext>")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="show one job and its attempts")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("wait", help="wait until a job ends; exit 0 if it succeeded")
    p.add_argument("id")
    p.add_argument("--timeout-s", type=seconds, default=900.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--status", choices=[s.value for s in Status])
    p.add_argument("--limit", type=count(1), default=50)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("retry", help="run a failed or cancelled job again (history kept)")
    p.add_argument("id")
    p.add_argument("--deadline-s", type=seconds, default=None)

    p = sub.add_parser("cancel", help="cancel a queued, retrying or running job")
    p.add_argument("id")

    p = sub.add_parser("stats", help="jobs by status, attempts by outcome, 503/429 rates, latency, tokens, cost")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pause", help="pause a model for every worker, e.g. `flexq pause gemini-2.5-flash --for 10m`")
    p.add_argument("model")
    p.add_argument("--for", dest="for_s", type=duration, required=True, metavar="DURATION",
                   help="how long: 90s, 10m, 2h (a longer pause already set is kept)")
    p.add_argument("--reason", default="paused by an operator")
    p.add_argument("--channel", metavar="NAME", help="pause the model on this channel only (FLEXQ_CHANNELS)")

    p = sub.add_parser("resume", help="lift a model's pause and quota alert")
    p.add_argument("model")
    p.add_argument("--channel", metavar="NAME", help="the channel whose pause to lift")

    p = sub.add_parser("worker", help="run an arq worker (also: arq worker.runtime.WorkerSettings)")
    p.add_argument("--concurrency", type=count(1), default=None,
                   help="jobs in flight (default FLEXQ_CONCURRENCY, 100)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")

    p = sub.add_parser("events", help="print job events (status changes with their attempts); --follow to tail")
    events_cmd.add_arguments(p)
    add_metrics_commands(sub)
    add_top_commands(sub)

    sub.add_parser("simulate", help="run the Gemini simulator (flexq simulate --help)", add_help=False)
    sub.add_parser("batch", help="run a JSONL file of requests to a JSONL of answers (flexq batch --help)",
                   add_help=False)
    sub.add_parser("demo", help="run ~200 prompts against a peak-hour simulator (flexq demo --help)", add_help=False)
    return parser


ASYNC_COMMANDS: dict[str, Callable[[argparse.Namespace, Any], Coroutine[Any, Any, int]]] = {
    "enqueue": cmd_enqueue, "status": cmd_status, "result": cmd_result, "wait": cmd_wait, "list": cmd_list,
    "retry": cmd_retry, "cancel": cmd_cancel, "stats": cmd_stats, "pause": cmd_pause, "resume": cmd_pause,
    "events": events_cmd.cmd_events, "metrics": cmd_metrics, "top": cmd_top,
}
#: Commands that need the worker's settings (flow control, the Gemini key); the rest read only a producer's.
WORKER_SIDE = frozenset({"stats", "worker", "pause", "resume", "metrics", "top"})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        return cmd_simulate(argv[1:])
    if argv and argv[0] in ("batch", "demo"):
        from flexq.batch_cmd import main as batch_main

        return batch_main(argv)
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = _settings(args.command in WORKER_SIDE)
        if args.command == "worker":
            return cmd_worker(args, settings)
        import asyncio

        return asyncio.run(ASYNC_COMMANDS[args.command](args, settings))

    return run(body)


def _settings(worker_side: bool) -> Any:
    if worker_side:
        from worker.config import WorkerConfig

        return WorkerConfig()
    from producer.settings import ProducerSettings

    return ProducerSettings()


if __name__ == "__main__":
    sys.exit(main())
