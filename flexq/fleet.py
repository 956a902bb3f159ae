"""The fleet snapshot: one queue's state in Redis, as ``flexq metrics`` exports it and ``flexq top`` shows it.

Read-only (a scrape writes nothing: ended jobs are counted within the retention the way ``flexq stats``
counts them after its trim, without trimming). One read is three round trips: one pipeline for the
queue (Redis's clock, jobs by status, the counters, recent latencies, arq's queue, worker heartbeats),
then ``FlowControl.snapshot`` (the (model, tier) scopes in use, then one pipeline for their state), at
the Redis time the first pipeline read.

Clocks: status-index scores and heartbeats are written with the writer's clock and arq compares its
queue's scores with the worker's, so those cut-offs use this host's clock; flow state is on Redis's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer.errors import StoreUnavailableError
from producer.events import text
from producer.keys import Keys
from producer.stats import summarize
from producer.status import TERMINAL, Status
from worker.config import WorkerConfig
from worker.flow import config_from_settings
from worker.flow_store import FlowControl


@dataclass(frozen=True)
class Fleet:
    """One read of a queue's state: what every worker and producer of it left in Redis."""

    queue: str
    #: Redis's clock at the read (epoch s): the time flow state is measured against.
    now_s: float
    #: Jobs by status (every status present); ended ones within the retention, as ``flexq stats`` counts them.
    jobs: dict[str, int]
    #: The ``flexq stats`` document of the counters (``producer.stats.summarize``): attempts, rates,
    #: latency (when read), tokens, cost.
    stats: dict[str, Any]
    #: arq's queue: jobs whose run time has come (including those a worker is running: arq keeps a job
    #: in its queue until it ends) and jobs deferred to later (retries, waiting for a permit or a pause).
    arq_due: int
    arq_deferred: int
    #: Worker processes whose heartbeat is at most ``FLEXQ_LEASE_S`` old.
    workers: int
    #: ``FlowControl.snapshot()``: per (model, tier) limit, in flight, breaker; per model pause, quota alert.
    flow: dict[str, Any]
    #: Jobs that entered an ended status after ``ended_since_s`` (0 when no such time was given).
    ended: int = 0

    @property
    def attempts_by_outcome(self) -> dict[str, int]:
        return dict(self.stats["attempts"]["by_outcome"])

    @property
    def attempts_total(self) -> int:
        return int(self.stats["attempts"]["total"])

    @property
    def spent_usd(self) -> float:
        return float(self.stats["cost"]["spent_usd"])


class FleetReader:
    """Reads ``Fleet`` snapshots of one queue (a worker's settings: flow control and lease length)."""

    def __init__(self, redis: Redis, settings: WorkerConfig) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.queue)
        self.flow = FlowControl(redis, self.keys, config_from_settings(settings))

    @classmethod
    async def connect(cls, settings: WorkerConfig) -> FleetReader:
        """A reader on its own connection; fails with the URL redacted when Redis does not answer."""
        from producer.queue import connect_redis

        return cls(await connect_redis(settings), settings)

    async def close(self) -> None:
        await self.redis.aclose()

    async def read(self, *, ended_since_s: float | None = None, latencies: bool = True) -> Fleet:
        """The queue's state now. ``ended_since_s`` (epoch s): also count the jobs ended since then;
        ``latencies``: read the recent ok latencies (up to 10,000 numbers) for p50/p95.

        Raises ``StoreUnavailableError`` (the URL redacted) when Redis fails."""
        try:
            return await self._read(ended_since_s, latencies)
        except (RedisError, OSError) as err:
            raise StoreUnavailableError(
                f"cannot read Redis at {self.settings.redis_url_redacted}: {type(err).__name__}"
            ) from None

    async def _read(self, ended_since_s: float | None, latencies: bool) -> Fleet:
        keys = self.keys
        here_s = time.time()
        kept_since = here_s - self.settings.retention_s  # what the store's trim would keep
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for status in Status:
                if status in TERMINAL:
                    pipe.zcount(keys.index(status), f"({kept_since!r}", "+inf")
                else:
                    pipe.zcard(keys.index(status))
            ended_statuses = sorted(TERMINAL) if ended_since_s is not None else []
            for status in ended_statuses:
                pipe.zcount(keys.index(status), f"({ended_since_s!r}", "+inf")
            pipe.hgetall(keys.stats)
            if latencies:
                pipe.lrange(keys.latencies, 0, -1)
            now_ms = int(here_s * 1000)
            pipe.zcount(keys.arq_queue, "-inf", now_ms)
            pipe.zcount(keys.arq_queue, f"({now_ms}", "+inf")
            pipe.zcount(keys.workers, repr(here_s - self.settings.lease_s), "+inf")
            replies = list(await pipe.execute())
        seconds, micros = replies.pop(0)
        now_s = seconds + micros / 1e6
        jobs = {str(status): int(replies.pop(0)) for status in Status}
        ended = sum(int(replies.pop(0)) for _ in ended_statuses)
        counters = {text(k): float(v) for k, v in replies.pop(0).items()}
        samples = [int(v) for v in replies.pop(0)] if latencies else []
        arq_due, arq_deferred, workers = (int(n) for n in replies)
        return Fleet(
            queue=self.settings.queue, now_s=now_s, jobs=jobs,
            stats=summarize(counts=jobs, counters=counters, latencies_ms=samples),
            arq_due=arq_due, arq_deferred=arq_deferred, workers=workers,
            flow=await self.flow.snapshot(now_s=now_s), ended=ended,
        )


