"""Run the benchmarks and print their figures and a one-line verdict against each target.

    python -m bench.run                     # full size (about 15 minutes on 2 cores)
    python -m bench.run --smoke             # small sizes, about a minute
    python -m bench.run --only enqueue      # one of: goodput overhead concurrency enqueue startup waiters web fleet
    python -m bench.run --json out.json     # also write every figure as JSON

Redis: a private ``redis-server`` (no persistence) in a temp dir, or ``--redis-url`` (its database is
flushed at start and end; use a benchmark database such as redis://127.0.0.1:6379/12). Exit status
is 1 if a benchmark crashed, 0 otherwise: a missed target is a finding, reported, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import BenchResult, bench_redis, environment

NAMES = ("goodput", "overhead", "concurrency", "enqueue", "startup", "waiters", "web", "fleet")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _lines(data: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    for key, value in data.items():
        nested = isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values())
        if isinstance(value, dict) and value and (nested or len(str(value)) > 140):
            out.append(f"{pad}{key}:")
            out.extend(_lines(value, indent + 2))
        elif isinstance(value, dict):
            out.append(f"{pad}{key}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()))
        elif isinstance(value, list) and any(isinstance(v, str) and len(v) > 40 for v in value):
            out.append(f"{pad}{key}:")
            out.extend(f"{pad}  {v}" for v in value)
        elif isinstance(value, list) and len(value) > 12:
            out.append(f"{pad}{key}: [{len(value)} items]")
        elif isinstance(value, list):
            out.append(f"{pad}{key}: " + ", ".join(_fmt(v) for v in value))
        else:
            out.append(f"{pad}{key}: {_fmt(value)}")
    return out


def print_result(result: BenchResult) -> None:
    print(f"== {result.name} (target: {result.target})")
    for line in _lines(result.figures, 2):
        print(line)
    for note in result.notes:
        print(f"  note: {note}")
    print(f"  VERDICT {result.name}: {result.verdict}", flush=True)


def _goodput(redis_url: str, smoke: bool) -> BenchResult:
    """bench/goodput.py starts its own Redis and simulator per scenario; its rows carry their verdicts."""
    from bench import goodput

    rows = goodput.main(["--smoke"] if smoke else [])
    figures = {str(row["name"]): {k: v for k, v in row.items() if k not in ("name", "trace")} for row in rows}
    judged = [str(row["verdict"]) for row in rows if row["verdict"] != "baseline"]
    met = bool(judged) and all(v.startswith("MET") for v in judged)
    verdict = f"{'MET' if met else 'MISSED'}: {sum(v.startswith('MET') for v in judged)} of {len(judged)} scenarios"
    return BenchResult("goodput", figures, "each scenario's own (bench/goodput.py)", met, verdict)


def _overhead(redis_url: str, smoke: bool) -> BenchResult:
    from bench import overhead

    return overhead.run(redis_url, smoke=smoke)


def _concurrency(redis_url: str, smoke: bool) -> BenchResult:
    from bench import concurrency

    return concurrency.run(redis_url, smoke=smoke)


def _enqueue(redis_url: str, smoke: bool) -> BenchResult:
    from bench import enqueue

    return enqueue.run(redis_url, smoke=smoke)


def _startup(redis_url: str, smoke: bool) -> BenchResult:
    from bench import startup

    return startup.run(redis_url, smoke=smoke)


def _waiters(redis_url: str, smoke: bool) -> BenchResult:
    from bench import waiters

    return waiters.run(redis_url, smoke=smoke)


def _web(redis_url: str, smoke: bool) -> BenchResult:
    from bench import web

    return web.run(redis_url, smoke=smoke)


def _fleet(redis_url: str, smoke: bool) -> BenchResult:
    from bench import fleet

    return fleet.run(redis_url, smoke=smoke)


RUNNERS: dict[str, Callable[[str, bool], BenchResult]] = {
    "goodput": _goodput, "overhead": _overhead, "concurrency": _concurrency, "enqueue": _enqueue,
    "startup": _startup, "waiters": _waiters, "web": _web, "fleet": _fleet,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes (a quick check that everything runs)")
    parser.add_argument("--only", choices=NAMES, action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--redis-url", help="use this Redis database (flushed!) instead of a private redis-server")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.only or list(NAMES)
    results: list[BenchResult] = []
    crashed = False
    with bench_redis(args.redis_url) as redis_url:
        env = environment(redis_url)
        print("bench: " + ", ".join(f"{k} {v}" for k, v in env.items()) + (" [smoke]" if args.smoke else ""))
        for name in names:
            started = time.monotonic()
            try:
                result = RUNNERS[name](redis_url, args.smoke)
            except Exception as err:
                crashed = True
                traceback.print_exc()
                result = BenchResult(name, {}, "", None, f"CRASHED: {type(err).__name__}: {err}")
            result.figures.setdefault("bench_seconds", round(time.monotonic() - started, 1))
            if args.smoke and result.met is not None:
                result.verdict += " [smoke size: indicative only, see docs/benchmarks.md]"
            print_result(result)
            results.append(result)
    print("\nsummary:")
    for result in results:
        print(f"  {result.name:<12} {result.verdict}")
    if args.json:
        doc = {"environment": env, "smoke": args.smoke, "results": [r.to_json() for r in results]}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=2, default=str)
    return 1 if crashed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
