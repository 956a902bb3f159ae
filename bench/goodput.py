"""Benchmark 1, goodput against the bound: drain N jobs through a simulated flex pool.

Each scenario starts a private Redis and its own simulator process, enqueues N jobs, then runs one
real ``flexq worker --concurrency 200`` process with project defaults (or a baseline's settings)
until every job has ended. Scenarios, side by side in one run:

- shared pool: 30% of flex calls shed at random (other customers' load), capacity 20 -> 8 -> 30
  (at 0 s, 20 s and 40 s), exponential service times;
- 45% random shed at a fixed capacity of 20, exponential service;
- capacity only (every 503 means "full"): capacity 50, constant service, 2,000 jobs;
- baselines: flow control off at a fixed concurrency of 20 with per-job backoff, and the blocking
  retry loop the flex documentation describes (capacity-only scenario).

Figures: drain time (from the moment the worker is up, when the simulator's schedule restarts and all
N jobs are enqueued, to the last job's end) as a
multiple of the oracle bound (the least time to serve N x mean service time through the capacity
over time), API calls per success, the share served on flex, and in-flight over time.

    python -m bench.goodput [--only shared] [--smoke] [--json] [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import free_port, private_redis

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemini-2.5-flash"
API_KEY = "bench-key"
#: A baseline that has not drained by this multiple of the bound (and a minute) is stopped and reported.
GIVE_UP_MULTIPLE = 4.0
GIVE_UP_MIN_S = 60.0


@dataclass(frozen=True)
class Scenario:
    name: str
    jobs: int
    service_s: float
    schedule: tuple[tuple[float, int], ...]  # (from second, capacity)
    rate_503: float = 0.0
    rate_429: float = 0.0
    dist: str = "exp"
    flow: bool = True
    concurrency: int = 200
    max_multiple: float | None = None  # the target, when the scenario has one
    max_calls_per_success: float | None = None
    blocking_loop: bool = False  # the documented sleep loop instead of flexq

    def sim_args(self) -> list[str]:
        schedule = ",".join(f"{start:g}:{cap}" for start, cap in self.schedule)
        return ["--capacity-schedule", schedule, "--rate-503", str(self.rate_503), "--rate-429", str(self.rate_429),
                "--latency-s", str(self.service_s), "--latency-dist", self.dist]

    def capacity_at(self, t_s: float) -> int:
        capacity = self.schedule[0][1]
        for start_s, cap in self.schedule:
            if t_s >= start_s:
                capacity = cap
        return capacity

    def bound_s(self) -> float:
        """The least time to serve jobs x mean service time through the capacity over time."""
        work, served = self.jobs * self.service_s, 0.0
        points = [*self.schedule, (float("inf"), 0)]
        for (start_s, cap), (end_s, _) in itertools.pairwise(points):
            if served + cap * (end_s - start_s) >= work:
                return start_s + (work - served) / cap
            served += cap * (end_s - start_s)
        raise AssertionError("unreachable: the last capacity lasts forever")


SHARED = Scenario("shared pool", 800, 1.0, ((0, 20), (20, 8), (40, 30)), rate_503=0.30,
                  max_multiple=1.25, max_calls_per_success=1.6)
SCENARIOS: dict[str, list[Scenario]] = {
    "shared": [
        SHARED,
        replace(SHARED, name="shared pool, fixed concurrency 20 (flow off)", flow=False, concurrency=20,
                max_multiple=None, max_calls_per_success=None),
    ],
    "random45": [
        Scenario("45% random shed, capacity 20", 800, 1.0, ((0, 20),), rate_503=0.45,
                 max_multiple=1.3, max_calls_per_success=2.0),
        Scenario("45% random shed, fixed concurrency 20 (flow off)", 800, 1.0, ((0, 20),), rate_503=0.45,
                 flow=False, concurrency=20),
    ],
    "capacity": [
        Scenario("capacity only, 2,000 jobs", 2000, 1.0, ((0, 50),), dist="const", max_multiple=1.15),
        Scenario("capacity only, blocking sleep loop (100 slots)", 2000, 1.0, ((0, 50),), dist="const",
                 concurrency=100, blocking_loop=True),
    ],
}


def smoke(scenario: Scenario) -> Scenario:
    """A small, quick version with the same shape: 150 jobs of 0.25 s, the schedule 4x faster."""
    return replace(scenario, jobs=150, service_s=0.25,
                   schedule=tuple((start / 4, cap) for start, cap in scenario.schedule))


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    give_up = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > give_up:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def simulator(args: list[str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(  # noqa: S603 - our own module
        [sys.executable, "-m", "simulator", "--port", str(port), "--seed", "1", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):  # noqa: S310 - loopback
                return True
        except OSError:
            return False

    try:
        wait_until(up, 15, "simulator")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=5) as reply:  # noqa: S310 - loopback
        return dict(json.load(reply))


def sim_reset(url: str) -> None:
    req = urllib.request.Request(f"{url}/_sim/reset", method="POST")  # noqa: S310 - loopback
    with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - loopback
        pass


@dataclass
class Result:
    scenario: Scenario
    drain_s: float
    succeeded: int
    calls: int
    flex_ok: int
    finished: bool = True
    sheds: dict[str, int] = field(default_factory=dict)  # the simulator's 503s by cause
    #: one row a second: (t_s, capacity, flex calls in service at the simulator, the shared limit)
    trace: list[tuple[float, int, int, float | None]] = field(default_factory=list)

    @property
    def multiple(self) -> float:
        return self.drain_s / self.scenario.bound_s()

    @property
    def calls_per_success(self) -> float:
        return self.calls / max(1, self.succeeded)

    def verdict(self) -> str:
        s = self.scenario
        if s.max_multiple is None:
            return "baseline"
        met = self.finished and self.multiple <= s.max_multiple and (
            s.max_calls_per_success is None or self.calls_per_success <= s.max_calls_per_success)
        target = f"<= {s.max_multiple} x" + (
            f", <= {s.max_calls_per_success} calls/success" if s.max_calls_per_success else "")
        return f"{'MET' if met else 'MISSED'} ({target})"

    def line(self) -> str:
        done = "" if self.finished else f" (STOPPED after {self.drain_s:.0f} s)"
        return (
            f"{self.scenario.name:<50} drain {self.drain_s:6.1f} s = {self.multiple:4.2f} x bound "
            f"{self.scenario.bound_s():5.1f} s | calls/success {self.calls_per_success:4.2f} | on flex "
            f"{100 * self.flex_ok / max(1, self.succeeded):5.1f}% | {self.succeeded}/{self.scenario.jobs}{done} "
            f"| 503s {self.sheds.get('capacity', 0)} capacity, {self.sheds.get('random', 0)} random "
            f"| {self.verdict()}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.scenario.name, "jobs": self.scenario.jobs, "succeeded": self.succeeded,
            "drain_s": round(self.drain_s, 2), "bound_s": round(self.scenario.bound_s(), 2),
            "oracle_multiple": round(self.multiple, 3), "calls_per_success": round(self.calls_per_success, 3),
            "flex_share": round(self.flex_ok / max(1, self.succeeded), 4), "finished": self.finished,
            "verdict": self.verdict(), "sheds": self.sheds, "trace": self.trace,
        }


def worker_env(redis_url: str, sim_url: str, scenario: Scenario) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_"))}
    env.update(REDIS_URL=redis_url, GEMINI_API_KEY=API_KEY, GEMINI_BASE_URL=sim_url, FLEXQ_QUEUE="bench",
               NO_PROXY="127.0.0.1,localhost", FLEXQ_LOG_FORMAT="json", FLEXQ_FLOW="1" if scenario.flow else "0")
    return env


async def run_flexq(scenario: Scenario, sim_url: str, redis_url: str) -> Result:
    sys.path.insert(0, str(ROOT))
    from producer.queue import FlexQueue, JobSpec
    from worker.config import WorkerConfig
    from worker.flow import config_from_settings
    from worker.flow_store import FlowControl

    settings = WorkerConfig(redis_url=redis_url, queue="bench")  # type: ignore[arg-type]
    queue = await FlexQueue.connect(settings)
    await queue.redis.flushdb()
    specs = [JobSpec({"model": MODEL, "prompt": f"bench job {i}"}, job_id=f"g{i}") for i in range(scenario.jobs)]
    flow = FlowControl(queue.redis, queue.store.keys, config_from_settings(settings))
    log = tempfile.NamedTemporaryFile(prefix="flexq-bench-worker-", suffix=".log")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(  # noqa: ASYNC220, S603 - our own worker, started, not waited on
        [sys.executable, "-m", "flexq", "worker", "--concurrency", str(scenario.concurrency)],
        env=worker_env(redis_url, sim_url, scenario), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    # The clock starts once the worker is up (process start-up is not the queue's drain time): the
    # simulator's capacity schedule restarts, and every job is enqueued at once.
    while b"worker_started" not in _read(log.name):
        if proc.poll() is not None:
            raise RuntimeError("the worker exited at start-up: " + _read(log.name).decode(errors="replace")[-2000:])
        await asyncio.sleep(0.05)
    sim_reset(sim_url)
    started = time.monotonic()
    await queue.enqueue_many(specs)
    give_up = started + max(GIVE_UP_MULTIPLE * scenario.bound_s(), GIVE_UP_MIN_S)
    trace: list[tuple[float, int, int, float | None]] = []
    finished = True
    try:
        next_row = started
        while True:
            now = time.monotonic()
            if now >= next_row:
                next_row += 1.0
                trace.append(await _trace_row(now - started, scenario, sim_url, flow))
            counts = await queue.store.counts()
            if counts["succeeded"] + counts["failed"] + counts["cancelled"] >= scenario.jobs:
                break
            if now > give_up:
                finished = False
                break
            await asyncio.sleep(0.05)
        drain_s = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    stats = sim_stats(sim_url)
    counts = await queue.store.counts()
    await queue.close()
    return Result(scenario, drain_s, counts["succeeded"], stats["requests"], stats["ok_by_tier"].get("flex", 0),
                  finished, stats["sheds"], trace)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def _trace_row(t_s: float, scenario: Scenario, sim_url: str, flow: Any) -> tuple[float, int, int, float | None]:
    in_service = int(sim_stats(sim_url)["in_flight_flex"])
    snapshot = await flow.snapshot()
    limit = next((s["limit"] for s in snapshot["scopes"] if s["tier"] == "flex"), None) if scenario.flow else None
    return (round(t_s, 1), scenario.capacity_at(t_s), in_service, limit)


async def run_blocking_loop(scenario: Scenario, sim_url: str) -> Result:
    """The documented pattern: try flex, sleep with exponential backoff, up to 3 retries, then standard."""
    from google import genai
    from google.genai import errors, types

    client = genai.Client(
        api_key=API_KEY,
        http_options=types.HttpOptions(base_url=sim_url, api_version="v1beta",
                                       retry_options=types.HttpRetryOptions(attempts=1), timeout=900_000),
    )
    sim_reset(sim_url)
    gate = asyncio.Semaphore(scenario.concurrency)
    succeeded = 0
    rng = random.Random(1)

    async def one(i: int) -> None:
        nonlocal succeeded
        async with gate:
            for attempt in range(4):
                try:
                    await client.aio.models.generate_content(
                        model=MODEL, contents=f"bench job {i}", config=types.GenerateContentConfig(service_tier="flex")
                    )
                    succeeded += 1
                    return
                except errors.APIError as err:
                    if err.code not in (429, 503) or attempt == 3:
                        break
                    await asyncio.sleep(2**attempt + rng.random())  # the blocking sleep holds the slot
            await client.aio.models.generate_content(
                model=MODEL, contents=f"bench job {i}", config=types.GenerateContentConfig(service_tier="standard")
            )
            succeeded += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(scenario.jobs)))
    drain_s = time.monotonic() - started
    await client.aio.aclose()
    stats = sim_stats(sim_url)
    return Result(scenario, drain_s, succeeded, stats["requests"], stats["ok_by_tier"].get("flex", 0),
                  sheds=stats["sheds"])


async def run_scenario(scenario: Scenario) -> Result:
    with simulator(scenario.sim_args()) as sim_url:
        if scenario.blocking_loop:
            return await run_blocking_loop(scenario, sim_url)
        with private_redis() as redis_url:
            return await run_flexq(scenario, sim_url, redis_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append", help="one group (repeatable)")
    parser.add_argument("--no-baselines", action="store_true", help="only flexq with project defaults")
    parser.add_argument("--smoke", action="store_true", help="150 jobs of 0.25 s per scenario")
    parser.add_argument("--trace", action="store_true", help="print in-flight over time for each scenario")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    return parser


def print_trace(result: Result, every_s: float = 2.0) -> None:
    print(f"  in flight over time, {result.scenario.name}: t s | capacity | in service | limit")
    last = -every_s
    for t_s, capacity, in_service, limit in result.trace:
        if t_s - last >= every_s:
            last = t_s
            print(f"    {t_s:5.0f} | {capacity:3d} | {in_service:3d} | {'-' if limit is None else f'{limit:.1f}'}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    groups = args.only or list(SCENARIOS)
    scenarios = [s for group in groups for s in SCENARIOS[group]]
    if args.no_baselines:
        scenarios = [s for s in scenarios if s.max_multiple is not None]
    if args.smoke:
        scenarios = [smoke(s) for s in scenarios]
    results = []
    for scenario in scenarios:
        result = asyncio.run(run_scenario(scenario))
        print("  " + result.line(), flush=True)
        if args.trace:
            print_trace(result)
        results.append(result)
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
    return [r.as_dict() for r in results]


if __name__ == "__main__":
    main()
