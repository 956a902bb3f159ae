"""Benchmark 1, goodput vs the limit: drain N jobs through a capacity-limited simulator.

flexq (real ``flexq worker`` processes, default settings, a private Redis) against the blocking
retry loop the flex documentation recommends (exponential backoff, up to 3 retries, then the
standard tier) at the same number of slots, in the same run, on the same simulator settings.

Figures: drain time as a multiple of the oracle bound (N x mean service time / capacity), API
calls per success, and the share served on flex.

    python -m bench.goodput [--jobs 2000] [--capacity 50] [--service-s 1.0] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemini-2.5-flash"
API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    give_up = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > give_up:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = subprocess.Popen(  # noqa: S603 - fixed binary
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(up, 10, "redis-server")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            client.close()
            proc.kill()
            proc.wait(5)


@contextmanager
def simulator(capacity: int, service_s: float, dist: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(  # noqa: S603 - our own module
        [sys.executable, "-m", "simulator", "--port", str(port), "--capacity", str(capacity),
         "--latency-s", str(service_s), "--latency-dist", dist, "--seed", "1"],
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
    name: str
    drain_s: float
    jobs: int
    succeeded: int
    calls: int
    flex_ok: int
    oracle_s: float
    first_to_last_s: float | None = None  # first call to last answer: the drain without process start-up

    def line(self) -> str:
        warm = "" if self.first_to_last_s is None else (
            f" (first call to last answer {self.first_to_last_s:.2f} s = {self.first_to_last_s / self.oracle_s:4.2f} x)"
        )
        return (
            f"{self.name:<28} drain {self.drain_s:7.2f} s = {self.drain_s / self.oracle_s:5.2f} x oracle | "
            f"calls/success {self.calls / max(1, self.succeeded):5.2f} | on flex "
            f"{100 * self.flex_ok / max(1, self.succeeded):5.1f}% | succeeded {self.succeeded}/{self.jobs}{warm}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "drain_s": round(self.drain_s, 2),
            "oracle_multiple": round(self.drain_s / self.oracle_s, 3),
            "calls_per_success": round(self.calls / max(1, self.succeeded), 3),
            "flex_share": round(self.flex_ok / max(1, self.succeeded), 4), "succeeded": self.succeeded,
            "jobs": self.jobs,
            "first_to_last_multiple": None if self.first_to_last_s is None else round(
                self.first_to_last_s / self.oracle_s, 3),
        }


async def run_flexq(jobs: int, sim_url: str, redis_url: str, workers: int, oracle_s: float) -> Result:
    sys.path.insert(0, str(ROOT))
    from producer.queue import FlexQueue, JobSpec
    from producer.settings import FlexqSettings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_"))}
    env.update(REDIS_URL=redis_url, GEMINI_API_KEY=API_KEY, GEMINI_BASE_URL=sim_url, FLEXQ_QUEUE="bench",
               NO_PROXY="127.0.0.1,localhost", FLEXQ_LOG_FORMAT="json")
    settings = FlexqSettings(redis_url=redis_url, queue="bench")  # type: ignore[arg-type]
    queue = await FlexQueue.connect(settings)
    await queue.redis.flushdb()
    specs = [JobSpec({"model": MODEL, "prompt": f"bench job {i}"}, job_id=f"g{i}") for i in range(jobs)]
    await queue.enqueue_many(specs)
    sim_reset(sim_url)
    logs = [tempfile.TemporaryFile() for _ in range(workers)]  # noqa: SIM115 - closed below
    started = time.monotonic()
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - started, not waited on
            [sys.executable, "-m", "worker.cli", "worker"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        for log in logs
    ]
    probe = None
    if os.environ.get("BENCH_TRACE"):
        from worker.flow import config_from_settings
        from worker.flow_store import FlowControl

        probe = FlowControl(queue.redis, queue.store.keys, config_from_settings(settings))
    last_trace = 0.0
    try:
        while True:
            if probe is not None and time.monotonic() - last_trace >= 1.0:
                last_trace = time.monotonic()
                snap = await probe.snapshot()
                for scope in snap.get("scopes", []):
                    print(f"  t={last_trace - started:5.1f}s limit={scope.get('limit')} "
                          f"in_flight={scope.get('in_flight')} "
                          f"sim={sim_stats(sim_url)['in_flight_flex']}", flush=True)
            counts = await queue.store.counts()
            if counts["succeeded"] + counts["failed"] + counts["cancelled"] >= jobs:
                break
            await asyncio.sleep(0.05)
        drain_s = time.monotonic() - started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        for log in logs:
            log.close()
    stats = sim_stats(sim_url)
    counts = await queue.store.counts()
    records = [r for r in await queue.store.get_many([s.job_id or "" for s in specs]) if r and r.attempts]
    first = min(r.attempts[0].started_at for r in records)
    last = max(r.attempts[-1].finished_at or r.attempts[-1].started_at for r in records)
    await queue.close()
    result = Result("flexq (default settings)", drain_s, jobs, counts["succeeded"], stats["requests"],
                    stats["ok_by_tier"].get("flex", 0), oracle_s)
    result.first_to_last_s = (last - first).total_seconds()
    return result


async def run_blocking_loop(jobs: int, sim_url: str, slots: int, oracle_s: float) -> Result:
    """The documented pattern: try flex, sleep with exponential backoff, up to 3 retries, then standard."""
    from google import genai
    from google.genai import errors, types

    client = genai.Client(
        api_key=API_KEY,
        http_options=types.HttpOptions(base_url=sim_url, api_version="v1beta",
                                       retry_options=types.HttpRetryOptions(attempts=1), timeout=900_000),
    )
    sim_reset(sim_url)
    gate = asyncio.Semaphore(slots)
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
    await asyncio.gather(*(one(i) for i in range(jobs)))
    drain_s = time.monotonic() - started
    await client.aio.aclose()
    stats = sim_stats(sim_url)
    return Result("blocking sleep loop", drain_s, jobs, succeeded, stats["requests"],
                  stats["ok_by_tier"].get("flex", 0), oracle_s)


async def main_async(args: argparse.Namespace) -> list[Result]:
    oracle_s = args.jobs * args.service_s / args.capacity
    results = []
    with redis_server() as redis_url, simulator(args.capacity, args.service_s, args.dist) as sim_url:
        results.append(await run_flexq(args.jobs, sim_url, redis_url, args.workers, oracle_s))
        if not args.flexq_only:
            results.append(await run_blocking_loop(args.jobs, sim_url, args.slots, oracle_s))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--capacity", type=int, default=50)
    parser.add_argument("--service-s", type=float, default=1.0, help="mean service time of the simulator")
    parser.add_argument("--dist", default="const", help="service-time distribution: const|exp|uniform|lognormal")
    parser.add_argument("--workers", type=int, default=1, help="flexq worker processes")
    parser.add_argument("--slots", type=int, default=100, help="slots of the blocking loop (flexq default)")
    parser.add_argument("--flexq-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="200 jobs, 0.5 s service")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.jobs, args.service_s = 200, 0.5
    results = asyncio.run(main_async(args))
    print(f"goodput: {args.jobs} jobs, capacity {args.capacity}, {args.dist} service {args.service_s}s, "
          f"oracle {args.jobs * args.service_s / args.capacity:.1f}s")
    for result in results:
        print("  " + result.line())
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
    return [r.as_dict() for r in results]


if __name__ == "__main__":
    main()
