"""Completion by notification: many concurrent ``FlexQueue.wait`` calls in one process.

For each number of waiters: enqueue that many jobs (no worker), start one ``wait`` per job, then
(1) count the Redis commands the server processes while nothing ends (the waiters' idle cost), and
(2) end jobs one by one from another connection (``cancel``, at a steady rate) and time each
waiter's wake-up from the moment its job's cancel returned. Target: p99 wake delay <= 50 ms, and
idle commands per second flat in the number of waiters. The former design polled each record
(50 ms doubling to 0.5 s): about 2 reads per second per waiter.

    python -m bench.run --only waiters
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from bench.common import BenchResult, flush
from producer.queue import FlexQueue, JobSpec
from producer.settings import ProducerSettings
from producer.stats import percentile

QUEUE = "bench-waiters"
P99_TARGET_MS = 50.0


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1), as ``flexq stats`` and the other benchmarks report it."""
    return percentile(values, 100 * q) or 0.0


async def _commands(redis: Redis) -> int:
    info = await redis.info("stats")
    return int(info["total_commands_processed"])


async def _one(redis_url: str, waiters: int, ends: int, idle_s: float, rate_per_s: float) -> dict[str, Any]:
    flush(redis_url)
    settings = ProducerSettings(redis_url=redis_url, queue=QUEUE)  # type: ignore[arg-type]
    queue = await FlexQueue.connect(settings)
    ender = await FlexQueue.connect(settings)
    probe = Redis.from_url(redis_url)
    try:
        ids = [f"w{n:06d}" for n in range(waiters)]
        for start in range(0, waiters, 1000):
            await queue.enqueue_many([JobSpec({"model": "gemini-2.5-flash", "prompt": "wait for me"}, job_id=job_id)
                                      for job_id in ids[start : start + 1000]])
        woke: dict[str, float] = {}

        async def wait(job_id: str) -> None:
            await queue.wait(job_id, timeout_s=600)
            woke[job_id] = time.monotonic()

        tasks = [asyncio.ensure_future(wait(job_id)) for job_id in ids]
        deadline = time.monotonic() + 60
        while queue.completions.waiting < waiters and time.monotonic() < deadline:  # noqa: ASYNC110 - a deadline
            await asyncio.sleep(0.05)  # the waiters registering
        # each wait() checks its job's status once as it starts: let those finish before measuring
        deadline, last = time.monotonic() + 60, await _commands(probe)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now = await _commands(probe)
            if now - last <= 25:
                break
            last = now
        before = await _commands(probe)
        await asyncio.sleep(idle_s)  # the measured idle window
        idle_commands = await _commands(probe) - before - 1  # less the probe's own INFO
        ended_at: dict[str, float] = {}
        gap_s = 1.0 / rate_per_s
        started = time.monotonic()
        for n, job_id in enumerate(ids[:ends]):
            await ender.cancel(job_id)
            ended_at[job_id] = time.monotonic()
            pause = started + (n + 1) * gap_s - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)  # a steady rate of job ends
        deadline = time.monotonic() + 30
        while len(woke) < ends and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded by a deadline
            await asyncio.sleep(0.01)  # the last waiters waking
        delays_ms = [(woke[j] - ended_at[j]) * 1000 for j in ended_at if j in woke]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "waiters": waiters, "jobs_ended": ends, "woken": len(delays_ms),
            "idle_commands_per_s": round(idle_commands / idle_s, 1),
            "polling_design_commands_per_s": round(waiters * 2.0),
            "wake_delay_ms": {"p50": round(_pct(delays_ms, 0.5), 2), "p99": round(_pct(delays_ms, 0.99), 2),
                              "max": round(max(delays_ms, default=0.0), 2)},
            "stream_reads": queue.completions.reads, "safety_checks": queue.completions.checks,
        }
    finally:
        await queue.close()
        await ender.close()
        await probe.aclose()
        flush(redis_url)


def run(redis_url: str, *, smoke: bool = False) -> BenchResult:
    sizes = (200, 1000) if smoke else (1000, 10_000)
    ends = 200 if smoke else 2000
    idle_s = 2.0 if smoke else 5.0
    rows = [asyncio.run(_one(redis_url, n, min(ends, n), idle_s=idle_s, rate_per_s=400.0)) for n in sizes]
    p99 = max(row["wake_delay_ms"]["p99"] for row in rows)
    idle = [row["idle_commands_per_s"] for row in rows]
    flat = idle[-1] <= max(10.0, 2 * idle[0])
    all_woken = all(row["woken"] == row["jobs_ended"] for row in rows)
    met = p99 <= P99_TARGET_MS and flat and all_woken
    figures = {f"{row['waiters']}_waiters": row for row in rows}
    verdict = (f"{'MET' if met else 'MISSED'}: wake p99 {p99:g} ms (target <= {P99_TARGET_MS:g}), idle Redis "
               f"commands/s {' -> '.join(f'{v:g}' for v in idle)} for {' -> '.join(str(n) for n in sizes)} waiters")
    return BenchResult("waiters", figures, "p99 wake <= 50 ms; Redis commands flat in waiters", met, verdict)
