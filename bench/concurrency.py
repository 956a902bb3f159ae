"""Benchmark 3, concurrency: ONE worker process holding 5,000 in-flight flex calls of 60 s each.

The simulator runs in its own process (``python -m simulator --latency-s 60``). N jobs are enqueued,
then one worker process (``bench.concurrency_worker``: ``create_worker(settings, concurrency=N)``
as ``flexq worker --concurrency N`` builds it, plus an event-loop lag probe) drains them in burst
mode, through the real google-genai SDK (aiohttp transport) and real Redis.

While it runs, this process polls the simulator's ``GET /_sim/stats`` (``in_flight_flex``) and the
worker's ``/proc/PID/status`` (VmRSS, VmHWM). Figures: time to reach N in flight, RSS when all N
are in flight and peak RSS (VmHWM), event-loop lag percentiles overall and per phase (ramp-up: until
N in flight; hold: until the first answer; drain: until the worker exits), and that all N succeeded.

Flow control: off (``FLEXQ_FLOW=0``) and, in full size, on with ``FLEXQ_FLOW_INITIAL`` =
``FLEXQ_FLOW_MAX`` = N, so it admits all N at once (the permits live in one Redis sorted set).

    python -m bench.concurrency [--calls 5000] [--latency-s 60] [--flow off|on|both] [--smoke] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    MODEL,
    BenchResult,
    bench_redis,
    flush,
    free_port,
    proc_status_kb,
    raise_nofile_limit,
    summarize,
)
from producer.queue import FlexQueue, JobSpec
from producer.stats import percentile
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
CALLS_FULL, LATENCY_FULL = 5000, 60.0
CALLS_SMOKE, LATENCY_SMOKE = 500, 5.0
TARGET_RSS_MB = 400.0
TARGET_LAG_P99_MS = 100.0
FULL_SHARE = 0.99  # "all N in flight" = at least this share of N at once
POLL_S = 0.25
QUEUE = "bench"


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as reply:  # noqa: S310 - loopback
        return dict(json.load(reply))


def wait_http(url: str, timeout_s: float) -> None:
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                return
        except OSError:
            if time.monotonic() > give_up:
                raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.1)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Watch:
    """What the orchestrator saw while the worker ran."""

    worker_started: float
    t_full: float | None = None
    t_first_answer: float | None = None
    rss_at_full_kb: int | None = None
    hwm_seen_kb: int = 0
    max_in_flight: int = 0
    cpu_s: float | None = None
    timeline: list[list[float]] = field(default_factory=list)  # [t, in_flight, ok, rss_kb]


def worker_env(redis_url: str, sim_url: str, flow: bool, calls: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_"))}
    env.update(
        REDIS_URL=redis_url, GEMINI_API_KEY="bench-api-key", GEMINI_BASE_URL=sim_url, FLEXQ_QUEUE=QUEUE,
        FLEXQ_LOG_FORMAT="json", NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1",
        FLEXQ_FLOW="1" if flow else "0",
    )
    if flow:
        env.update(FLEXQ_FLOW_INITIAL=str(calls), FLEXQ_FLOW_MAX=str(calls))
    return env


async def enqueue(redis_url: str, calls: int) -> None:
    settings = WorkerConfig(redis_url=redis_url, queue=QUEUE)  # type: ignore[arg-type]
    queue = await FlexQueue.connect(settings)
    try:
        await queue.enqueue_many(
            JobSpec({"model": MODEL, "prompt": f"bench call {i}: say hello"}, job_id=f"c{i}") for i in range(calls)
        )
    finally:
        await queue.close()


async def final_counts(redis_url: str) -> dict[str, int]:
    settings = WorkerConfig(redis_url=redis_url, queue=QUEUE)  # type: ignore[arg-type]
    queue = await FlexQueue.connect(settings)
    try:
        return await queue.store.counts()
    finally:
        await queue.close()


def watch_worker(proc: subprocess.Popen[bytes], sim_url: str, calls: int, timeout_s: float) -> Watch:
    watch = Watch(worker_started=time.time())
    give_up = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > give_up:
            proc.terminate()
            proc.wait(30)
            raise RuntimeError(f"worker did not drain {calls} calls within {timeout_s:.0f} s")
        now = time.time()
        stats = sim_stats(sim_url)
        in_flight = int(stats["in_flight_flex"])
        ok = int(stats["ok_by_tier"].get("flex", 0))
        rss = proc_status_kb(proc.pid, "VmRSS")
        hwm = proc_status_kb(proc.pid, "VmHWM")
        watch.cpu_s = cpu_seconds(proc.pid) or watch.cpu_s
        watch.hwm_seen_kb = max(watch.hwm_seen_kb, hwm or 0)
        watch.max_in_flight = max(watch.max_in_flight, int(stats["max_in_flight_flex"]))
        watch.timeline.append([round(now - watch.worker_started, 2), in_flight, ok, rss or 0])
        if watch.t_full is None and in_flight >= FULL_SHARE * calls:
            watch.t_full = now
            watch.rss_at_full_kb = rss
        if watch.t_first_answer is None and ok > 0:
            watch.t_first_answer = now
        time.sleep(POLL_S)
    return watch


def phase_lag(lag: list[list[float]], start: float | None, end: float | None) -> dict[str, float] | None:
    if start is None or end is None or end <= start:
        return None
    return summarize([v for t, v in lag if start <= t < end])


def run_variant(
    redis_url: str, calls: int, latency_s: float, flow: bool, tmp: Path, worker_args: tuple[str, ...] = ()
) -> dict[str, Any]:
    flush(redis_url)
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim_log = (tmp / f"sim-{int(flow)}.log").open("wb")
    worker_log = (tmp / f"worker-{int(flow)}.log").open("wb")
    report_path = tmp / f"report-{int(flow)}.json"
    sim = subprocess.Popen(  # noqa: S603 - our own module
        [sys.executable, "-m", "simulator", "--port", str(sim_port), "--latency-s", str(latency_s)],
        cwd=ROOT, stdout=sim_log, stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"{sim_url}/healthz", 20)
        started = time.perf_counter()
        asyncio.run(enqueue(redis_url, calls))
        enqueue_s = time.perf_counter() - started
        proc = subprocess.Popen(  # noqa: S603 - our own module
            [sys.executable, "-m", "bench.concurrency_worker", "--report", str(report_path),
             "--concurrency", str(calls), *worker_args],
            cwd=ROOT, env=worker_env(redis_url, sim_url, flow, calls), stdout=worker_log, stderr=subprocess.STDOUT,
        )
        try:
            watch = watch_worker(proc, sim_url, calls, timeout_s=3 * latency_s + 240)
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(60)
        stats = sim_stats(sim_url)
    finally:
        sim.terminate()
        sim.wait(30)
        sim_log.close()
        worker_log.close()
    if proc.returncode != 0 or not report_path.exists():
        tail = (tmp / f"worker-{int(flow)}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"worker exited with {proc.returncode}; log tail:\n{tail}")
    report = json.loads(report_path.read_text())
    counts = asyncio.run(final_counts(redis_url))
    lag = report["lag_ms"]
    ended = float(report["ended_s"])
    hwm_kb = max(int(report.get("vmhwm_kb") or 0), watch.hwm_seen_kb)
    rss_start_kb = report["rss_kb"][0][1] if report["rss_kb"] else None
    return {
        "flow": "on" if flow else "off",
        "calls": calls,
        "latency_s": latency_s,
        "enqueue_s": round(enqueue_s, 2),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "peak_in_flight": watch.max_in_flight,
        "reached_all_in_flight": watch.t_full is not None,
        "ramp_s": round(watch.t_full - watch.worker_started, 1) if watch.t_full else None,
        "worker_run_s": round(ended - watch.worker_started, 1),
        "worker_cpu_s": round(watch.cpu_s, 1) if watch.cpu_s is not None else None,
        "rss_start_mb": round(rss_start_kb / 1024, 1) if rss_start_kb else None,
        "rss_all_in_flight_mb": round(watch.rss_at_full_kb / 1024, 1) if watch.rss_at_full_kb else None,
        "rss_peak_mb": round(hwm_kb / 1024, 1),
        "kb_per_call": (
            round((watch.rss_at_full_kb - rss_start_kb) / calls, 1) if watch.rss_at_full_kb and rss_start_kb else None
        ),
        "lag_ms": summarize([v for _, v in lag]),
        "lag_ms_ramp": phase_lag(lag, watch.worker_started, watch.t_full),
        "lag_ms_hold": phase_lag(lag, watch.t_full, watch.t_first_answer),
        "lag_ms_drain": phase_lag(lag, watch.t_first_answer or watch.t_full, ended),
        "gc": gc_summary(report.get("gc_pauses", [])),
        "lag_spikes": spikes(lag, report.get("gc_pauses", []), watch.worker_started),
        "sim_requests": stats["requests"],
        "sim_by_status": stats["by_status"],
    }


def gc_summary(pauses: list[list[float]]) -> dict[str, Any]:
    full = [ms for _, gen, ms in pauses if gen == 2]
    all_ms = [ms for _, _, ms in pauses]

    def pct(q: float) -> float:
        return round(percentile(all_ms, 100 * q) or 0.0, 2)

    return {
        "collections": len(pauses), "gen2": len(full), "total_ms": round(sum(ms for _, _, ms in pauses), 1),
        "pause_p50_ms": pct(0.5), "pause_p99_ms": pct(0.99),
        "max_ms": round(max((ms for _, _, ms in pauses), default=0.0), 1),
        "gen2_max_ms": round(max(full, default=0.0), 1),
    }


def spikes(lag: list[list[float]], pauses: list[list[float]], t0: float, limit: int = 8) -> list[str]:
    """The worst lag samples, each with the garbage collection time inside its 50 ms window (if any)."""
    out = []
    for t, ms in sorted(lag, key=lambda row: -row[1])[:limit]:
        window = [p for p in pauses if t - (ms + 60) / 1000 <= p[0] <= t]
        gc_ms = sum(p[2] for p in window)
        gens = sorted({int(p[1]) for p in window})
        out.append(f"t+{t - t0:6.1f}s lag {ms:6.1f} ms, gc in window {gc_ms:6.1f} ms (gens {gens})")
    return out


def verdict_of(row: dict[str, Any]) -> tuple[bool, str]:
    rss_ok = row["rss_peak_mb"] <= TARGET_RSS_MB
    lag_ok = row["lag_ms"]["p99"] <= TARGET_LAG_P99_MS
    full = row["reached_all_in_flight"]
    met = rss_ok and lag_ok and full and row["succeeded"] == row["calls"]
    text = (
        f"flow {row['flow']}: peak RSS {row['rss_peak_mb']:.0f} MB ({row['rss_peak_mb'] / TARGET_RSS_MB:.2f}x of "
        f"{TARGET_RSS_MB:.0f}), lag p99 {row['lag_ms']['p99']:.0f} ms ({row['lag_ms']['p99'] / TARGET_LAG_P99_MS:.2f}x "
        f"of {TARGET_LAG_P99_MS:.0f}), {row['peak_in_flight']}/{row['calls']} in flight, "
        f"{row['succeeded']}/{row['calls']} succeeded"
    )
    return met, text


def run(redis_url: str, *, smoke: bool = False, calls: int | None = None, latency_s: float | None = None,
        flows: tuple[bool, ...] | None = None, keep: str | None = None, worker_args: tuple[str, ...] = ()
        ) -> BenchResult:
    calls = calls or (CALLS_SMOKE if smoke else CALLS_FULL)
    latency_s = latency_s or (LATENCY_SMOKE if smoke else LATENCY_FULL)
    flows = flows if flows is not None else ((False,) if smoke else (False, True))
    nofile = raise_nofile_limit()
    figures: dict[str, Any] = {"open_files_limit": nofile, "variants": {}}
    verdicts = []
    met_all = True
    with tempfile.TemporaryDirectory(prefix="flexq-bench-conc-") as tmp:
        where = Path(keep or tmp)
        where.mkdir(parents=True, exist_ok=True)
        for flow in flows:
            row = run_variant(redis_url, calls, latency_s, flow, where, worker_args)
            figures["variants"][f"flow {row['flow']}"] = row
            met, text = verdict_of(row)
            met_all = met_all and met
            verdicts.append(text)
    flush(redis_url)
    verdict = f"{'MET' if met_all else 'MISSED'}: " + "; ".join(verdicts)
    notes = [
        "lag is sampled every 50 ms by a task on the worker's own event loop; rss_peak_mb is VmHWM of the worker",
        "the simulator, Redis, this process and the worker share the machine's cores",
    ]
    return BenchResult(
        "concurrency", figures, f"<= {TARGET_RSS_MB:.0f} MB RSS and lag p99 <= {TARGET_LAG_P99_MS:.0f} ms "
        f"with {calls} calls of {latency_s:g} s in flight", met_all, verdict, notes,
    )


def main(argv: list[str] | None = None) -> BenchResult:
    from bench.run import print_result

    parser = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int)
    parser.add_argument("--latency-s", type=float)
    parser.add_argument("--flow", choices=["off", "on", "both"])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--redis-url")
    parser.add_argument("--keep", metavar="DIR", help="keep the worker's and simulator's logs and report in DIR")
    parser.add_argument("--default-gc", action="store_true", help="experiment: CPython's default GC thresholds")
    parser.add_argument("--census", action="store_true", help="diagnosis: gc-tracked objects by type at full load")
    parser.add_argument("--gc-thresholds", metavar="T0,T1,T2", help="experiment: these GC thresholds in the worker")
    parser.add_argument("--profile", metavar="PATH", help="diagnosis: cProfile the worker into PATH (slows it)")
    args = parser.parse_args(argv)
    flows = {"off": (False,), "on": (True,), "both": (False, True), None: None}[args.flow]
    with bench_redis(args.redis_url) as url:
        extra = tuple(flag for flag, on in (("--default-gc", args.default_gc), ("--census", args.census)) if on)
        if args.profile:
            extra += ("--profile", str(Path(args.profile).resolve()))
        if args.gc_thresholds:
            extra += ("--gc-thresholds", args.gc_thresholds)
        result = run(url, smoke=args.smoke, calls=args.calls, latency_s=args.latency_s, flows=flows, keep=args.keep,
                     worker_args=extra)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
