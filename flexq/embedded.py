"""In-process runtime for ``flexq batch``/``demo``: Redis (real or a stand-in), workers, simulator.

With ``REDIS_URL`` unset, Redis is an in-process stand-in (fakeredis): nothing survives the
process, which is said plainly. With it set, the real Redis is used and separately started
``flexq worker`` processes can serve the same jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any

import fakeredis
from redis.asyncio import Redis

from producer.queue import FlexQueue, connect_redis
from simulator import RunningSimulator, SimConfig, start_simulator
from worker.config import WorkerConfig
from worker.runtime import create_worker

SIMULATED_API_KEY = "simulated-key"


@dataclass
class Runtime:
    """Everything a batch run needs, started and stopped together."""

    settings: WorkerConfig
    queue: FlexQueue
    embedded: bool
    simulator: RunningSimulator | None = None
    workers: list[Any] = field(default_factory=list)  # arq workers (worker.runtime keeps arq to itself)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _fake_server: Any = None

    async def start_workers(self, count: int, concurrency: int) -> None:
        for _ in range(count):
            redis: Redis = (
                fakeredis.FakeAsyncRedis(server=self._fake_server) if self.embedded
                else await connect_redis(self.settings)
            )
            worker = create_worker(
                self.settings, concurrency=concurrency, redis=redis, owns_redis=True, handle_signals=False,
                ctx={"flexq_configure_logs": False},
            )
            task = asyncio.get_running_loop().create_task(worker.main())
            worker.main_task = task  # so that arq's handle_sig can stop it
            self.workers.append(worker)
            self._tasks.append(task)

    async def stop_workers(self) -> None:
        """Stop picking jobs, cancel running attempts (recorded as interrupted), close."""
        for worker in self.workers:
            worker.handle_sig(signal.SIGTERM)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for worker in self.workers:
            # arq's close() gathers the run_job tasks handle_sig just cancelled
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await worker.close()
        self.workers.clear()
        self._tasks.clear()

    def workers_alive(self) -> bool:
        return all(not task.done() for task in self._tasks)

    def worker_error(self) -> BaseException | None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def close(self) -> None:
        await self.stop_workers()
        await self.queue.close()
        if self.simulator is not None:
            await self.simulator.close()


async def open_runtime(
    settings: WorkerConfig, *, embedded: bool, simulate: bool, sim_config: SimConfig | None = None
) -> Runtime:
    """Connect (or stand in for) Redis and start the simulator if asked."""
    simulator = None
    if simulate:
        simulator = await start_simulator(sim_config or SimConfig(latency_s=0.05))
        settings = settings.model_copy(
            update={"gemini_base_url": simulator.base_url, "gemini_api_key": _secret(SIMULATED_API_KEY)}
        )
    fake_server = None
    if embedded:
        fake_server = fakeredis.FakeServer()
        queue = await FlexQueue.connect(settings, redis=fakeredis.FakeAsyncRedis(server=fake_server))
        queue._owns_redis = True
    else:
        queue = await FlexQueue.connect(settings)
    return Runtime(settings=settings, queue=queue, embedded=embedded, simulator=simulator, _fake_server=fake_server)


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)
