"""The fleet ceiling: 1, 2 and 4 worker processes on one Redis, an instant fake Gemini.

Each worker process is built as ``flexq worker`` builds it (``worker.runtime.create_worker``, flow control
on with its defaults, ``max_jobs`` 100, burst mode) with the Gemini seam answering at once, so what is
measured is the queue's own work: arq's pick-up, the record's compare-and-set writes, the job events,
counters, leases and flow control's Lua. For each fleet size: enqueue N jobs, start the processes
together, time from start to the last job ended, and read Redis's own figures before and after
(``INFO commandstats``: commands, Lua-internal included; ``INFO cpu``: the server's CPU seconds). The
ceiling that follows for one Redis: 1 / (Redis CPU per job), the jobs/s at which Redis's single
command thread would be saturated, whatever the number of workers.

    python -m bench.fleet [--jobs 4000] [--sizes 1,2,4]        # or python -m bench.run --only fleet
    python -m bench.fleet --worker REDIS_URL                    # (internal) one worker process
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import redis as sync_redis

from bench.common import BenchResult, flush
from producer.queue import FlexQueue, JobSpec
from producer.settings import ProducerSettings

QUEUE = "bench-fleet"
MODEL = "gemini-2.5-flash"
JOBS_FULL = 4000
JOBS_SMOKE = 400


def _redis_figures(url: str) -> tuple[int, float]:
    client = sync_redis.Redis.from_url(url)
    try:
        stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
        cpu: dict[str, Any] = client.info("cpu")  # type: ignore[assignment]
    finally:
        client.close()
    commands = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    return commands, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def _enqueue(url: str, jobs: int) -> None:
    queue = await FlexQueue.connect(ProducerSettings(redis_url=url, queue=QUEUE))  # type: ignore[arg-type]
    try:
        for start in range(0, jobs, 1000):
            await queue.enqueue_many([JobSpec({"model": MODEL, "prompt": f"fleet job {n}"}, job_id=f"f-{n}")
                                      for n in range(start, min(jobs, start + 1000))])
    finally:
        await queue.close()


async def _done(url: str) -> int:
    queue = await FlexQueue.connect(ProducerSettings(redis_url=url, queue=QUEUE))  # type: ignore[arg-type]
    try:
        return (await queue.store.counts())["succeeded"]
    finally:
        await queue.close()


def measure(url: str, jobs: int, workers: int) -> dict[str, Any]:
    flush(url)
    asyncio.run(_enqueue(url, jobs))
    commands_before, cpu_before = _redis_figures(url)
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.fleet", "--worker", url],  # noqa: S603 - fixed
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        for proc in procs:
            proc.wait(600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    wall_s = time.perf_counter() - started
    commands_after, cpu_after = _redis_figures(url)
    done = asyncio.run(_done(url))
    redis_cpu_ms = 1000 * (cpu_after - cpu_before) / jobs
    flush(url)
    return {
        "workers": workers, "jobs": jobs, "done": done, "wall_s": round(wall_s, 2),
        "jobs_per_s": round(jobs / wall_s, 1),
        "redis_commands_per_job": round((commands_after - commands_before) / jobs, 1),
        "redis_cpu_ms_per_job": round(redis_cpu_ms, 3),
        "redis_cpu_share": round((cpu_after - cpu_before) / wall_s, 3),
        "ceiling_jobs_per_s": round(1000 / redis_cpu_ms) if redis_cpu_ms > 0 else None,
    }


def _worker(url: str) -> None:
    """One worker process: ``flexq worker``'s build, burst mode, the instant Gemini of bench/overhead.py."""
    from bench.overhead import InstantGemini
    from worker.config import WorkerConfig
    from worker.runtime import create_worker

    settings = WorkerConfig(redis_url=url, gemini_api_key="bench", queue=QUEUE, concurrency=100)  # type: ignore[arg-type]

    async def main() -> None:
        worker = create_worker(settings, burst=True, handle_signals=False,
                               ctx={"flexq_gemini_factory": InstantGemini, "flexq_configure_logs": False})
        try:
            await worker.main()
        finally:
            await worker.close()

    asyncio.run(main())


def run(redis_url: str, *, smoke: bool = False, sizes: tuple[int, ...] = (1, 2, 4), jobs: int | None = None
        ) -> BenchResult:
    jobs = jobs or (JOBS_SMOKE if smoke else JOBS_FULL)
    rows = [measure(redis_url, jobs, n) for n in ((1, 2) if smoke else sizes)]
    figures: dict[str, Any] = {f"{row['workers']}_workers": row for row in rows}
    cpu = max(row["redis_cpu_ms_per_job"] for row in rows)
    ceiling = round(1000 / cpu) if cpu > 0 else None
    figures["ceiling_jobs_per_s_one_redis"] = ceiling
    rates = " -> ".join(f"{row['jobs_per_s']:g}" for row in rows)
    verdict = (f"MEASURED: jobs/s {rates} for {'/'.join(str(r['workers']) for r in rows)} workers; "
               f"{rows[-1]['redis_commands_per_job']:g} Redis commands/job, {cpu:g} Redis CPU ms/job: "
               f"one Redis tops out near {ceiling} jobs/s")
    return BenchResult("fleet", figures, "measured: the fleet's ceiling on one Redis", None, verdict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=JOBS_FULL)
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    from bench.common import bench_redis
    from bench.run import print_result

    with bench_redis(args.redis_url) as url:
        print_result(run(url, sizes=tuple(int(n) for n in args.sizes.split(",")), jobs=args.jobs))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
