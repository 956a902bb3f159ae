"""Chaos: many jobs through several ``flexq worker`` processes while workers are SIGKILLed, frozen
(SIGSTOP) past their lease, and Redis is SIGKILLed and restarted from its AOF (``appendfsync always``),
once during the bulk enqueue, and every flex call is shed for a minute; the simulator sheds and
fails at random besides. Then the
invariants: no job lost, every job ended, no success recorded twice, attempt numbers contiguous,
calls per job bounded, no key without a TTL or another bound.

    python -m bench.chaos                    # 2,000 jobs, 3 workers (``make chaos``)
    python -m bench.chaos --jobs 150 --workers 2 --kills 1 --stops 1 --restarts 1 --blackout-s 0  # the suite's
    python -m bench.chaos --churn-s 300 --jobs 3000 --drains 4 --blackout-s 0   # ``make soak``

With ``--churn-s`` the jobs arrive at a steady rate over that many seconds instead of in one bulk
enqueue, and the faults (plus ``--drains`` graceful worker replacements) are spread over the same
stretch: a fleet that keeps churning while Redis is killed under it.

Exit status 0 when every invariant holds. Figures (jobs, faults injected, time to drain, calls per
success) are printed, and written as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from bench.common import RedisServer
from producer.errors import StoreUnavailableError
from producer.models import JobRecord
from producer.queue import FlexQueue, JobSpec
from producer.settings import ProducerSettings
from producer.status import TERMINAL, Outcome, Status
from simulator import SimConfig, start_simulator

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "chaos"
MODEL = "gemini-2.5-flash"
#: Keys that may live without a TTL, each bounded another way (see tests/test_faults.py).
BOUNDED_WITHOUT_TTL = {f"{QUEUE}:idx:{s}" for s in Status} | {f"{QUEUE}:stats", f"{QUEUE}:latency_ms",
                                                              f"{QUEUE}:flow:log", f"{QUEUE}:arq",
                                                              f"{QUEUE}:events"}
#: Prompt directives mixed into the jobs: (share, directive). The rest are plain prompts.
#: A 429 pauses its model for every worker (as a real quota would), so they are kept rare here.
MIX = [(0.08, "[[latency:2s]]"), (0.05, "[[fault:503x2]]"), (0.005, "[[fault:429x1:retry=1s]]"),
       (0.03, "[[fault:500x1]]"), (0.02, "[[fault:400]]")]
MAX_CALLS_PER_JOB = 40


@dataclass
class ChaosConfig:
    jobs: int = 2000
    workers: int = 3
    concurrency: int = 40
    lease_s: float = 3.0
    kills: int = 3
    stops: int = 2
    restarts: int = 2  # the first during the bulk enqueue
    every_s: float = 3.0  # time between faults once the jobs are in
    blackout_s: float = 60.0  # one stretch where every flex call is shed (0: none)
    timeout_s: float = 600.0
    seed: int = 7
    churn_s: float = 0.0  # > 0: jobs arrive steadily over this long, faults spread over it (a soak)
    drains: int = 0  # graceful worker replacements (SIGTERM, a new one started)


@dataclass
class ChaosResult:
    config: dict[str, Any]
    faults: dict[str, int] = field(default_factory=dict)
    drain_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    calls_per_success: float = 0.0
    max_calls_per_job: int = 0
    violations: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


class Worker:
    def __init__(self, env: dict[str, str], log: Path, concurrency: int) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - fixed arguments
            [sys.executable, "-m", "flexq", "worker", "--concurrency", str(concurrency)],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.stopped = False

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def close(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def _specs(cfg: ChaosConfig) -> list[JobSpec]:
    rng = random.Random(cfg.seed)
    specs = []
    for n in range(cfg.jobs):
        roll, directive = rng.random(), ""
        for share, text in MIX:
            if roll < share:
                directive = text
                break
            roll -= share
        specs.append(JobSpec({"model": MODEL, "prompt": f"chaos job {n} {directive}".strip()}, job_id=f"c-{n:05d}",
                             deadline_s=cfg.timeout_s))
    return specs


async def _restart(server: RedisServer, faults: Counter[str]) -> None:
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(0.5)  # Redis stays down a moment, with calls in flight
    await asyncio.to_thread(server.start)
    faults["redis_restarts"] += 1


async def _connect(settings: ProducerSettings) -> FlexQueue:
    for _ in range(100):
        try:
            return await FlexQueue.connect(settings)
        except StoreUnavailableError:
            await asyncio.sleep(0.2)  # Redis is restarting
    raise RuntimeError("Redis did not come back")


async def _enqueue(settings: ProducerSettings, specs: list[JobSpec], cfg: ChaosConfig, server: RedisServer,
                   faults: Counter[str]) -> None:
    size = 200 if cfg.churn_s <= 0 else 20
    chunks = [specs[i : i + size] for i in range(0, len(specs), size)]
    pace_s = cfg.churn_s / max(1, len(chunks))
    queue = await _connect(settings)
    for index, chunk in enumerate(chunks):
        if pace_s > 0 and index > 0:
            await asyncio.sleep(pace_s)  # jobs arrive steadily (the soak's producer)
        if index == len(chunks) // 2 and cfg.restarts > 0 and cfg.churn_s <= 0:
            await queue.close()
            await _restart(server, faults)  # during the bulk enqueue
            queue = await _connect(settings)
        for _ in range(100):
            try:
                await queue.enqueue_many(chunk)  # idempotent ids: a chunk cut short is sent again
                break
            except (StoreUnavailableError, RedisError, OSError):
                await asyncio.sleep(0.2)
                await queue.close()
                queue = await _connect(settings)
    await queue.close()


async def _ended(settings: ProducerSettings) -> int | None:
    try:
        queue = await FlexQueue.connect(settings)
    except StoreUnavailableError:
        return None
    try:
        counts = await queue.store.counts()
        return sum(counts[str(s)] for s in TERMINAL)
    except (RedisError, OSError):
        return None
    finally:
        await queue.close()


async def run_chaos(cfg: ChaosConfig, tmp: Path) -> ChaosResult:
    faults: Counter[str] = Counter()
    rng = random.Random(cfg.seed + 1)
    server = RedisServer(tmp / "redis")
    server.directory.mkdir(parents=True)
    await asyncio.to_thread(server.start)
    sim = await start_simulator(SimConfig(latency_s=0.3, latency_dist="exp", rate_503=0.15, rate_500=0.02,
                                          capacity=60, seed=cfg.seed))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_", "REDIS_"))}
    env.update(REDIS_URL=server.url, GEMINI_API_KEY="chaos-key", GEMINI_BASE_URL=sim.base_url, FLEXQ_QUEUE=QUEUE,
               FLEXQ_LEASE_S=str(cfg.lease_s), FLEXQ_RETRY_BASE_S="0.2", FLEXQ_RETRY_MAX_S="2",
               FLEXQ_LOG_FORMAT="json", NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    settings = ProducerSettings(redis_url=server.url, queue=QUEUE)  # type: ignore[arg-type]
    workers = [Worker(env, tmp / f"worker-{n}.log", cfg.concurrency) for n in range(cfg.workers)]
    started = time.monotonic()
    producer: asyncio.Task[None] | None = None
    try:
        churn = cfg.churn_s > 0
        plan = ["kill"] * cfg.kills + ["stop"] * cfg.stops + ["drain"] * cfg.drains
        plan += ["restart"] * (cfg.restarts if churn else max(0, cfg.restarts - 1))
        plan += ["blackout"] if cfg.blackout_s > 0 else []
        rng.shuffle(plan)
        every_s = cfg.churn_s / (len(plan) + 1) if churn else cfg.every_s
        if churn:  # faults land while jobs still arrive
            producer = asyncio.create_task(_enqueue(settings, _specs(cfg), cfg, server, faults))
        else:
            await _enqueue(settings, _specs(cfg), cfg, server, faults)
        next_fault = time.monotonic() + every_s
        while time.monotonic() - started < cfg.timeout_s:
            if plan and time.monotonic() >= next_fault:
                kind = plan.pop()
                if kind == "blackout":
                    _blackout(sim, cfg.blackout_s, faults)
                else:
                    await _fault(kind, workers, env, tmp, cfg, server, faults, rng)
                next_fault = time.monotonic() + every_s
            if producer is not None and producer.done():
                producer.result()  # the producer's own failure ends the run
            if not plan and (producer is None or producer.done()) and await _ended(settings) == cfg.jobs:
                break
            await asyncio.sleep(0.5)  # the chaos driver's own pace
        drain_s = time.monotonic() - started
    finally:
        if producer is not None and not producer.done():
            producer.cancel()
        for worker in workers:
            await asyncio.to_thread(worker.close)
        await sim.close()
    try:
        return await _check(settings, cfg, dict(faults), drain_s, server)
    finally:
        server.kill()


def _blackout(sim: Any, seconds: float, faults: Counter[str]) -> None:
    """Every flex call shed (503) for ``seconds``, as when the shared pool is gone; then back to normal."""
    normal = sim.sim.config
    sim.sim.config = normal.updated({"rate_503": 1.0})
    faults["flex_blackout_s"] += int(seconds)

    async def restore() -> None:
        await asyncio.sleep(seconds)
        sim.sim.config = normal

    asyncio.get_running_loop().create_task(restore())


async def _fault(kind: str, workers: list[Worker], env: dict[str, str], tmp: Path, cfg: ChaosConfig,
                 server: RedisServer, faults: Counter[str], rng: random.Random) -> None:
    live = [w for w in workers if w.proc.poll() is None and not w.stopped]
    if kind == "restart" or not live:
        await _restart(server, faults)
        return
    victim = rng.choice(live)
    if kind == "drain":  # a deploy: the worker finishes what it holds and a new one takes its place
        victim.signal(signal.SIGTERM)
        workers.append(Worker(env, tmp / f"worker-{len(workers)}.log", cfg.concurrency))
        faults["worker_drains"] += 1
        return
    if kind == "kill":
        victim.signal(signal.SIGKILL)
        workers.append(Worker(env, tmp / f"worker-{len(workers)}.log", cfg.concurrency))
        faults["worker_kills"] += 1
        return
    victim.signal(signal.SIGSTOP)  # frozen past its lease: its jobs are taken over, then it wakes up
    victim.stopped = True
    faults["worker_stops"] += 1

    async def wake() -> None:
        await asyncio.sleep(cfg.lease_s * 2 + 1)
        victim.signal(signal.SIGCONT)
        victim.stopped = False

    asyncio.get_running_loop().create_task(wake())


async def _check(settings: ProducerSettings, cfg: ChaosConfig, faults: dict[str, int], drain_s: float,
                 server: RedisServer) -> ChaosResult:
    result = ChaosResult(config=asdict(cfg), faults=faults, drain_s=round(drain_s, 1))
    queue = await _connect(settings)
    ids = [spec.job_id for spec in _specs(cfg) if spec.job_id is not None]
    records: list[JobRecord | None] = []
    for start in range(0, len(ids), 500):
        records.extend(await queue.store.get_many(ids[start : start + 500]))
    v: dict[str, list[str]] = {"lost": [], "not_ended": [], "two_successes": [], "attempts_not_contiguous": [],
                               "succeeded_without_result": [], "too_many_calls": [], "keys_without_bound": [],
                               "answer_discarded": []}
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for job_id, record in zip(ids, records, strict=True):
        if record is None:
            v["lost"].append(job_id)
            continue
        statuses[str(record.status)] += 1
        if record.error is not None:
            kinds[record.error.kind] += 1
        if record.status not in TERMINAL:
            v["not_ended"].append(job_id)
        oks = [a for a in record.attempts if a.outcome == Outcome.OK]
        if len(oks) > 1:
            v["two_successes"].append(job_id)
        if [a.number for a in record.attempts] != list(range(1, len(record.attempts) + 1)):
            v["attempts_not_contiguous"].append(job_id)
        if oks and record.status != Status.SUCCEEDED:  # a paid answer thrown away
            v["answer_discarded"].append(job_id)
        if record.status == Status.SUCCEEDED and record.result is None:
            v["succeeded_without_result"].append(job_id)
        if len(record.attempts) > MAX_CALLS_PER_JOB:
            v["too_many_calls"].append(job_id)
        result.calls += len(record.attempts)
        result.max_calls_per_job = max(result.max_calls_per_job, len(record.attempts))
    for key in [k async for k in queue.redis.scan_iter(count=1000)]:
        name = key.decode()
        if await queue.redis.ttl(key) == -1 and name not in BOUNDED_WITHOUT_TTL and not name.startswith("arq:"):
            v["keys_without_bound"].append(name)
    await queue.close()
    result.statuses, result.error_kinds, result.violations = dict(statuses), dict(kinds), v
    succeeded = statuses.get(str(Status.SUCCEEDED), 0)
    result.calls_per_success = round(result.calls / succeeded, 3) if succeeded else 0.0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    defaults = ChaosConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    args = vars(parser.parse_args(argv))
    out = args.pop("json")
    cfg = ChaosConfig(**args)
    with tempfile.TemporaryDirectory(prefix="flexq-chaos-") as tmp:
        result = asyncio.run(run_chaos(cfg, Path(tmp)))
    doc = {**asdict(result), "ok": result.ok}
    if out is not None:
        out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "violations"}, indent=2))
    bad = {k: v[:10] for k, v in result.violations.items() if v}
    print("invariants:", "all hold" if not bad else f"VIOLATED {bad}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
