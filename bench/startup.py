"""CLI start-up: wall time of ``flexq --help`` and ``flexq status ID`` (an id that does not exist).

    python -m bench.startup              # 15 runs of each, medians
    python -m bench.startup --runs 5

Each run is a fresh process, as a person at a terminal starts it; ``status`` talks to the given
Redis (it answers "no job with id ..." and exits 1, which is what is timed). Target (issue 8):
``flexq --help`` ≤ 0.25 s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from bench.common import BenchResult

HELP_TARGET_S = 0.25


def _flexq() -> list[str]:
    found = shutil.which("flexq", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "flexq"]


def time_command(args: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times_s = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([*_flexq(), *args], env=env, stdout=subprocess.DEVNULL,  # noqa: S603 - our own CLI
                       stderr=subprocess.DEVNULL, check=False)
        times_s.append(time.perf_counter() - started)
    return times_s


def run(redis_url: str, *, smoke: bool = False, runs: int | None = None) -> BenchResult:
    runs = runs or (3 if smoke else 15)
    env = {**os.environ, "REDIS_URL": redis_url}
    help_s = time_command(["--help"], runs, env)
    status_s = time_command(["status", "no-such-job"], runs, env)
    figures = {
        "runs": runs,
        "help_s": {"median": round(statistics.median(help_s), 3), "min": round(min(help_s), 3)},
        "status_s": {"median": round(statistics.median(status_s), 3), "min": round(min(status_s), 3)},
    }
    met = statistics.median(help_s) <= HELP_TARGET_S
    verdict = f"{'MET' if met else 'MISSED'}: flexq --help median {statistics.median(help_s):.2f} s"
    notes = ["`flexq status` imports pydantic, pydantic-settings and redis-py and connects to Redis: see "
             "docs/benchmarks.md for where its time goes"]
    return BenchResult("startup", figures, f"flexq --help <= {HELP_TARGET_S} s", met, verdict, notes)


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args(argv)
    result = run(args.redis_url, runs=args.runs)
    print(result.figures, result.verdict)
    return result


if __name__ == "__main__":
    main()
