"""Benchmark 4, bulk enqueue: jobs/s of ``FlexQueue.enqueue_many`` on a real Redis.

Two request shapes: a bare prompt, and a prompt with a ``config`` (temperature, max_output_tokens,
stop sequences) and a ``system_instruction`` - the config is validated against the SDK's
``GenerateContentConfig`` on enqueue. Each job has an explicit id (idempotency key), as a pipeline would.

Figures per shape: jobs/s of the whole call (median of the repeats, each on a flushed database), and
its split: validation and record building (``FlexQueue._prepare``, no I/O) vs the Redis write
(``JobStore.create``: one Lua call per job, pipelined 1,000 at a time). When the target is missed a
cProfile of one call says where the time goes.

    python -m bench.enqueue [--jobs 10000] [--repeats 3] [--smoke] [--profile] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import MODEL, BenchResult, bench_redis, flush
from producer.queue import FlexQueue, JobSpec
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
JOBS_FULL = 10_000
JOBS_SMOKE = 1_000
TARGET_JOBS_PER_S = 10_000.0
CONFIG = {"temperature": 0.2, "max_output_tokens": 512, "stop_sequences": ["\n\n\n"]}
SHAPES: dict[str, dict[str, Any]] = {
    "prompt only": {},
    "prompt + config + system_instruction": {"config": CONFIG, "system_instruction": "Answer in one sentence."},
}
#: What a profile reports, by cumulative time: (label, file suffix, function name).
KEY_FUNCTIONS = (
    ("enqueue_many (all)", "producer/queue.py", "enqueue_many"),
    ("  _prepare: validate + build record", "producer/queue.py", "_prepare"),
    ("    parse_request", "producer/models.py", "parse_request"),
    ("      config -> GenerateContentConfig.model_validate", "producer/models.py", "_config"),
    ("      SDK _check_field_type_mismatches", "google/genai/_common.py", "_check_field_type_mismatches"),
    ("      size check model_dump_json", "pydantic/main.py", "model_dump_json"),
    ("    new_record", "producer/transitions.py", "new_record"),
    ("  JobStore.create: Redis write", "producer/store.py", "create"),
    ("    record.to_json", "producer/models.py", "to_json"),
    ("    redis-py pack_command", "redis/asyncio/connection.py", "pack_command"),
    ("    pipeline execute", "redis/asyncio/client.py", "execute"),
)


def specs_for(shape: str, jobs: int, tag: str) -> list[JobSpec]:
    extra = SHAPES[shape]
    return [
        JobSpec({"model": MODEL, "prompt": f"summarize document {i}", **extra}, job_id=f"{tag}-{i}")
        for i in range(jobs)
    ]


async def one_run(redis_url: str, shape: str, jobs: int) -> dict[str, float]:
    flush(redis_url)
    settings = WorkerConfig(redis_url=redis_url, queue="bench-enqueue")  # type: ignore[arg-type]
    queue = await FlexQueue.connect(settings)
    try:
        specs = specs_for(shape, jobs, "e")
        started = time.perf_counter()
        done = await queue.enqueue_many(specs)
        total_s = time.perf_counter() - started
        created = sum(d.created for d in done)
        queued = await queue.redis.zcard(queue.store.keys.arq_queue)
        # The split, on fresh ids: validation only, then the Redis write only.
        specs = specs_for(shape, jobs, "s")
        started = time.perf_counter()
        records = [queue._prepare(spec, {}) for spec in specs]
        prepare_s = time.perf_counter() - started
        started = time.perf_counter()
        for start in range(0, len(records), 1000):
            await queue.store.create(records[start : start + 1000])
        store_s = time.perf_counter() - started
    finally:
        await queue.close()
    return {
        "jobs_per_s": jobs / total_s, "total_s": total_s, "prepare_s": prepare_s, "store_s": store_s,
        "created": created, "queued": queued,
    }


async def profile_run(redis_url: str, shape: str, jobs: int, top: int = 12) -> dict[str, Any]:
    """cProfile one enqueue_many: the share of time per bucket and the top functions by own time."""
    flush(redis_url)
    settings = WorkerConfig(redis_url=redis_url, queue="bench-enqueue")  # type: ignore[arg-type]
    queue = await FlexQueue.connect(settings)
    specs = specs_for(shape, jobs, "p")
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        await queue.enqueue_many(specs)
        profiler.disable()
    finally:
        await queue.close()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = float(stats.total_tt) or 1.0  # type: ignore[attr-defined]
    cumulative: dict[str, float] = {}
    for label, suffix, function in KEY_FUNCTIONS:
        cumulative[label] = sum(
            cum for (path, _, name), (_, _, _, cum, _) in raw.items() if path.endswith(suffix) and name == function
        )
    rows = sorted(((own, cum, f"{path}:{line}({name})") for (path, line, name), (_, _, own, cum, _) in raw.items()),
                  reverse=True)
    return {
        "shape": shape,
        "profiled_s": round(total, 3),
        "cumulative": {label: f"{1000 * cum:.0f} ms ({100 * cum / total:.0f}%)" for label, cum in cumulative.items()},
        "top_own_time": [
            f"{own * 1000:6.0f} ms own {cum * 1000:6.0f} ms cum  {_short(where)}" for own, cum, where in rows[:top]
        ],
    }


def _short(where: str) -> str:
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


async def run_async(redis_url: str, *, smoke: bool = False, jobs: int | None = None, repeats: int | None = None,
                    profile: bool | None = None) -> BenchResult:
    jobs = jobs or (JOBS_SMOKE if smoke else JOBS_FULL)
    repeats = repeats or (1 if smoke else 3)
    figures: dict[str, Any] = {"jobs": jobs, "repeats": repeats, "shapes": {}}
    rates: dict[str, float] = {}
    for shape in SHAPES:  # warm-up: imports, pydantic and SDK schema caches, script load
        await one_run(redis_url, shape, min(jobs, 200))
    for shape in SHAPES:
        runs = [await one_run(redis_url, shape, jobs) for _ in range(repeats)]
        med = sorted(runs, key=lambda r: r["jobs_per_s"])[len(runs) // 2]
        rates[shape] = statistics.median(r["jobs_per_s"] for r in runs)
        figures["shapes"][shape] = {
            "jobs_per_s": round(rates[shape]),
            "jobs_per_s_all": [round(r["jobs_per_s"]) for r in runs],
            "validate_us_per_job": round(1e6 * med["prepare_s"] / jobs, 1),
            "redis_write_us_per_job": round(1e6 * med["store_s"] / jobs, 1),
            "all_created_and_queued": all(r["created"] == jobs and r["queued"] == jobs for r in runs),
        }
    met = all(rate >= TARGET_JOBS_PER_S for rate in rates.values())
    parts = ", ".join(f"{k} {v:,.0f} jobs/s ({v / TARGET_JOBS_PER_S:.2f}x)" for k, v in rates.items())
    verdict = f"{'MET' if met else 'MISSED'}: {parts} (target >= {TARGET_JOBS_PER_S:,.0f} jobs/s)"
    notes = []
    if profile or (profile is None and not met):
        slowest = min(rates, key=lambda k: rates[k])
        figures["profile"] = await profile_run(redis_url, slowest, jobs)
        notes.append("profile: cProfile of one enqueue_many of the slowest shape (profiling slows it ~2x)")
    flush(redis_url)
    return BenchResult("enqueue", figures, f">= {TARGET_JOBS_PER_S:,.0f} jobs/s", met, verdict, notes)


def run(redis_url: str, *, smoke: bool = False, jobs: int | None = None, repeats: int | None = None,
        profile: bool | None = None) -> BenchResult:
    return asyncio.run(run_async(redis_url, smoke=smoke, jobs=jobs, repeats=repeats, profile=profile))


def main(argv: list[str] | None = None) -> BenchResult:
    from bench.run import print_result

    parser = argparse.ArgumentParser(prog="python -m bench.enqueue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--profile", action="store_true", default=None, help="profile even if the target is met")
    parser.add_argument("--redis-url")
    args = parser.parse_args(argv)
    with bench_redis(args.redis_url) as url:
        result = run(url, smoke=args.smoke, jobs=args.jobs, repeats=args.repeats, profile=args.profile)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
