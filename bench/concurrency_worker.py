"""A flexq worker process with a probe: what ``flexq worker`` runs, plus event-loop lag and RSS samples.

Builds the arq Worker exactly as ``flexq worker`` does (``worker.runtime.create_worker`` from the
environment's ``WorkerConfig``, ``logs.configure``), in burst mode, and runs beside it, on the same
event loop, a probe task: ``t = loop.time(); await asyncio.sleep(0.05); lag = loop.time() - t - 0.05``.
Every second it also samples its own VmRSS. On exit (the queue drained, or SIGTERM/SIGINT) it writes
a JSON report: lag samples ``[[epoch_s, lag_ms], ...]``, RSS samples ``[[epoch_s, kB], ...]``,
VmHWM, and arq's job counters.

    python -m bench.concurrency_worker --report PATH --concurrency 5000   # env: REDIS_URL, GEMINI_*, FLEXQ_*
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import time
from typing import Any

from bench.common import proc_status_kb, raise_nofile_limit
from worker.config import WorkerConfig

PROBE_INTERVAL_S = 0.05
RSS_EVERY_S = 1.0


class GcTimer:
    """Times every garbage collection (``gc.callbacks``): a long pause is event-loop lag too."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (epoch s, generation, ms)
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((time.time(), int(info["generation"]), 1000.0 * (time.perf_counter() - self._start)))


class Probe:
    def __init__(self, interval_s: float = PROBE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.lag: list[tuple[float, float]] = []
        self.rss: list[tuple[float, int]] = []
        self.gc = GcTimer()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_rss = 0.0
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            self.lag.append((time.time(), 1000.0 * max(0.0, now - started - self.interval_s)))
            if now >= next_rss:
                next_rss = now + RSS_EVERY_S
                rss = proc_status_kb("self", "VmRSS")
                if rss is not None:
                    self.rss.append((time.time(), rss))


async def take_census(worker: Any, concurrency: int, out: dict[str, Any]) -> None:
    """Once 99% of the calls are in flight: gc-tracked objects by type (the cost of a full collection)."""
    while True:
        if len(worker.job_tasks) >= 0.99 * concurrency:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)
    counts: dict[str, int] = {}
    objects = gc.get_objects()
    for obj in objects:
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        counts[name] = counts.get(name, 0) + 1
    out.update(
        at_s=time.time(), in_flight=len(worker.job_tasks), tracked=len(objects),
        frozen=gc.get_freeze_count(), top=sorted(counts.items(), key=lambda kv: -kv[1])[:25],
    )
    del objects


def write_report(
    path: str, probe: Probe, worker: Any, started: float, error: str | None, census: dict[str, Any] | None = None
) -> None:
    doc = {
        "pid": os.getpid(),
        "started_s": started,
        "ended_s": time.time(),
        "lag_ms": [[round(t, 3), round(v, 3)] for t, v in probe.lag],
        "rss_kb": [[round(t, 3), v] for t, v in probe.rss],
        "gc_pauses": [[round(t, 3), g, round(ms, 3)] for t, g, ms in probe.gc.pauses],
        "vmhwm_kb": proc_status_kb("self", "VmHWM"),
        "vmrss_kb": proc_status_kb("self", "VmRSS"),
        "jobs_complete": getattr(worker, "jobs_complete", None),
        "jobs_failed": getattr(worker, "jobs_failed", None),
        "jobs_retried": getattr(worker, "jobs_retried", None),
        "error": error,
        "census": census or None,
    }
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(doc, out)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrency_worker")
    parser.add_argument("--report", required=True, help="where to write the JSON report")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--no-burst", action="store_true", help="run until SIGTERM instead of until the queue is empty")
    parser.add_argument("--default-gc", action="store_true",
                        help="experiment: CPython's default GC thresholds, not flexq worker's tuning (tune_gc)")
    parser.add_argument("--gc-thresholds", metavar="T0,T1,T2",
                        help="experiment: these GC thresholds after the freeze instead of tune_gc's")
    parser.add_argument("--census", action="store_true",
                        help="diagnosis: gc-tracked objects by type once all calls are in flight (one long pause)")
    parser.add_argument("--profile", metavar="PATH", help="diagnosis: cProfile the worker, dump the stats to PATH")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    started = time.time()

    from worker import logs
    from worker.runtime import create_worker, tune_gc

    settings = WorkerConfig().model_copy(update={"concurrency": args.concurrency})
    logs.configure(settings.log_format)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = create_worker(settings, concurrency=args.concurrency, burst=not args.no_burst)
    if not args.default_gc:
        tune_gc()  # as `flexq worker` does
    if args.gc_thresholds:
        gc.set_threshold(*(int(t) for t in args.gc_thresholds.split(",")))
    probe = Probe()
    gc.callbacks.append(probe.gc)
    probe_task = loop.create_task(probe.run())
    census: dict[str, Any] = {}
    if args.census:
        census_task = loop.create_task(take_census(worker, args.concurrency, census))
    error = None
    profiler = cProfile.Profile() if args.profile else None
    try:
        if profiler is not None:
            profiler.enable()
        worker.run()
    except BaseException as err:  # report whatever happened, then re-raise
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        probe_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            loop.run_until_complete(probe_task)
        if args.census:
            census_task.cancel()
        write_report(args.report, probe, worker, started, error, census)
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
