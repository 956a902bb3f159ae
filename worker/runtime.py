"""The thin interface to arq (0.28, maintenance-only: arq#510). Nothing else imports arq.

Every arq default that does not fit minutes-long flex calls is chosen here on purpose:
- serializer: JSON (``producer.arq_wire``), never pickle;
- ``max_tries``: effectively unbounded, because the retry budget is the job's deadline and
  deferrals for shed load are not failures (arq counts every ``Retry`` and every crash);
- ``job_timeout``: the request timeout plus a minute, so the SDK's own timeout fires first;
- ``keep_result``: 0, results live in flexq's job record (and arq #432 cannot block a retry);
- ``allow_abort_jobs``: on, so ``flexq cancel`` aborts a running call;
- in-progress key: a short lease renewed by ``worker.lease`` instead of the job timeout.

``flexq worker`` runs ``FlexqWorker``, arq's worker with its per-job bookkeeping made lean: the due jobs
one poll found are claimed and their records read in one script call (``worker/lua/claim.lua``: arq's
in-progress check and key, its abort request spent, the record), without reading arq's job hash (its one
argument is the job id) or counting tries; a job's end removes its arq job in the record's own write. A
deferral is still arq's ``Retry(defer=...)``; arq's poll, abort, health check, burst and shutdown are arq's.
``arq worker.runtime.WorkerSettings`` runs a plain arq worker on the same queue.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
import uuid
from importlib import resources
from typing import Any

from arq import worker as arq_worker
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Retry, RetryJob, Worker, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer import arq_wire
from producer.blobs import open_blob_store
from producer.errors import ConfigError
from producer.queue import connect_redis
from producer.store import JobStore
from worker import logs
from worker.batch_tier import BatchTier
from worker.config import WorkerConfig
from worker.flow import config_from_settings
from worker.flow_store import FlowControl
from worker.gemini import GeminiClient
from worker.lease import LeaseKeeper
from worker.metrics import WorkerMetrics
from worker.runner import REDIS_RETRY_BASE_S, REDIS_RETRY_MAX_S, Runner

_arq_log_redis_info = getattr(arq_worker, "log_redis_info")  # noqa: B009 - not re-exported by arq


async def _log_redis_info(redis: Any, log_func: Any) -> None:
    """arq calls INFO at start-up; the in-process Redis stand-in (fakeredis) has no INFO."""
    try:
        await _arq_log_redis_info(redis, log_func)
    except RedisError:
        log_func("redis INFO unavailable (in-process Redis stand-in)")


setattr(arq_worker, "log_redis_info", _log_redis_info)  # noqa: B010 - see _log_redis_info

#: The claim script (the due jobs' in-progress keys and their records, in one call).
CLAIM_LUA = resources.files("worker").joinpath("lua", "claim.lua").read_text()
#: Jobs claimed in one script call at most (one poll reads up to ``max_jobs`` + ``QUEUE_READ_EXTRA``). Each
#: batch's jobs start together, in one event-loop turn: a larger one stalls the loop at a ramp to thousands
#: of calls (event-loop lag p99 172 ms with batches of 500 and 100, 37 ms with 20 and 10: docs/benchmarks.md).
CLAIM_BATCH_MAX = 20
#: With flow control on and the limit binding (``FlowControl.limit_binds``), one job per claim: jobs claimed
#: together reach the pool together, in no set order, so the pool's capacity 503s fall on every in-flight
#: level of the batch alike and look load-independent to the limit (bench.goodput, 45% random shedding at
#: capacity 20: 2 to 5 times the capacity 503s and 2.1-2.6 calls per success with batches of 4 to 20,
#: against 1.9-2.0 one by one; docs/benchmarks.md). It binds at a cold start, until the pool's first answer.
#: Otherwise nobody waits in line and no 503 is taken for capacity, the order teaches the limit nothing, and
#: batches of ``CLAIM_BATCH_MAX`` save their share of each job's Redis commands (about 20 per job, not 37).
CLAIM_BATCH_FLOW = 1
_arq_log = logging.getLogger("arq.worker")


def _arq_debug(msg: str, *args: Any) -> None:
    """arq's routine per-run line, built only when DEBUG is on (``worker.logs.ARQ_RUN_LINES``)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        _arq_log.info(msg, *args)


class FlexqWorker(Worker):
    """arq's worker, kept alive through Redis restarts and failovers.

    arq 0.28 ends its worker on the first Redis error of a poll (and leaks the slot of a job whose
    start failed half-way). Here a failed poll is logged, waited out with capped backoff and tried
    again; calls in flight go on, and the runner writes their results once Redis answers again.
    """

    _redis_down_since: float | None = None
    _redis_wait_s: float = REDIS_RETRY_BASE_S

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as err:
            await self._redis_failed(err)
            return
        if self._redis_down_since is not None:
            logs.get_logger("flexq.worker").warning(
                "redis_back", down_s=round(time.monotonic() - self._redis_down_since, 1)
            )
            self._redis_down_since, self._redis_wait_s = None, REDIS_RETRY_BASE_S

    async def _redis_failed(self, err: BaseException) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            logs.get_logger("flexq.worker").error(
                "redis_unavailable", error=f"{type(err).__name__}: {err}", detail="calls in flight go on; retrying"
            )
        await asyncio.sleep(self._redis_wait_s)  # the poll loop's own pause while Redis is away, not a job's
        self._redis_wait_s = min(REDIS_RETRY_MAX_S, self._redis_wait_s * 2)

    async def finish_job(self, job_id: str, finish: bool, *args: Any, **kwargs: Any) -> None:
        """arq's finish, unless this worker lost the job to another (frozen past its lease, say):
        then the arq job, its queue entry and in-progress key belong to the new owner."""
        runner: Runner | None = self.ctx.get("flexq_runner")
        if runner is not None and job_id in runner.arq_ended:
            runner.arq_ended.discard(job_id)  # the attempt's record write ended the run already
            return
        if runner is not None and job_id in runner.disowned:
            runner.disowned.discard(job_id)
            logs.get_logger("flexq.worker").warning(
                "arq_finish_skipped", job_id=job_id, detail="another worker owns the job now"
            )
            return
        await super().finish_job(job_id, finish, *args, **kwargs)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, with every job a slot is free for claimed and its record read in one script
        call (``worker/lua/claim.lua``) instead of arq's five round trips per job; a Redis error gives the
        slots back."""
        runner: Runner | None = self.ctx.get("flexq_runner")
        if runner is None:  # not started by flexq's startup: arq's own way
            await super().start_jobs(job_ids)
            return
        pending: list[str] = []
        for raw_id in job_ids:
            job_id = raw_id.decode()
            running = self.tasks.get(job_id)
            if running is None or running.done():
                pending.append(job_id)  # a running job stays on arq's queue: no need to ask Redis
        while pending:
            one_by_one = runner.flow is not None and runner.flow.limit_binds()
            free = min(self.max_jobs - self.job_counter, CLAIM_BATCH_FLOW if one_by_one else CLAIM_BATCH_MAX)
            if free <= 0:
                return
            batch, pending = pending[:free], pending[free:]
            await self._claim_batch(runner, batch)

    async def _claim_batch(self, runner: Runner, job_ids: list[str]) -> None:
        """Claim ``job_ids`` (this many slots are free) and start a task for each one claimed."""
        for _ in job_ids:
            await self.sem.acquire()  # never waits: the slots are free (arq's semaphore has one spare)
        self.job_counter += len(job_ids)
        keys = [self.queue_name, arq_wire.ABORT_SET]
        for job_id in job_ids:
            keys += [arq_wire.in_progress_key(job_id), runner.store.keys.record(job_id)]
        args = [int(time.time() * 1000), int(self.in_progress_timeout_s * 1000), *job_ids]
        try:
            replies = await self._claim_script(keys=keys, args=args)
        except BaseException:
            for _ in job_ids:
                self._release_sem_dec_counter_on_complete()
            raise
        for job_id, reply in zip(job_ids, replies, strict=True):
            if not reply or int(reply[0]) != 1:  # running elsewhere, gone, or deferred by another worker
                self._release_sem_dec_counter_on_complete()
                continue
            task = self.loop.create_task(self._run_claimed(job_id, int(float(reply[1])), reply[2] or None))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    @property
    def _claim_script(self) -> Any:
        script = self.__dict__.get("_claim")
        if script is None:
            script = self.__dict__["_claim"] = self.pool.register_script(CLAIM_LUA)
        return script

    async def _run_claimed(self, job_id: str, score: int, raw: bytes | None) -> None:
        """arq's run_job for a claimed flexq job: the same outcomes (a ``Retry`` re-scores the job, an
        abort or an error ends it, a cancel at shutdown leaves it to run again), without reading arq's job
        hash or counting its tries, and arq's routine lines only when DEBUG is on."""
        ctx = {**self.ctx, "job_id": job_id, "score": score, "flexq_claimed": True, "flexq_record": raw}
        if self.on_job_start:
            await self.on_job_start(ctx)
        function = self.functions[arq_wire.FUNCTION]
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        finish, incr_score = False, None
        start = time.monotonic()
        ref = f"{job_id}:{arq_wire.FUNCTION}"
        _arq_debug("%6.2fs → %s(%s)%s", max(0.0, time.time() - score / 1000), ref, repr(job_id), "")
        try:
            self.job_tasks[job_id] = task = self.loop.create_task(function.coroutine(ctx, job_id))
            try:
                await asyncio.wait_for(task, timeout_s)
            finally:
                del self.job_tasks[job_id]
        except (Exception, asyncio.CancelledError) as err:
            if self.retry_jobs and isinstance(err, Retry):
                incr_score = err.defer_score + (int(time.time() * 1000) - score) if err.defer_score else None
                self.jobs_retried += 1
                _arq_debug("%6.2fs ↻ %s retrying job in %0.2fs", time.monotonic() - start, ref,
                           (err.defer_score or 0) / 1000)
            elif job_id in self.aborting_tasks and isinstance(err, asyncio.CancelledError):
                self.aborting_tasks.remove(job_id)
                finish = True
                self.jobs_failed += 1
                _arq_log.info("%6.2fs ⊘ %s aborted", time.monotonic() - start, ref)
            elif self.retry_jobs and isinstance(err, asyncio.CancelledError | RetryJob):
                self.jobs_retried += 1
                _arq_log.info("%6.2fs ↻ %s cancelled, will be run again", time.monotonic() - start, ref)
            else:
                _arq_log.exception("%6.2fs ! %s failed, %s: %s", time.monotonic() - start, ref,
                                   type(err).__name__, err)
                finish = True
                self.jobs_failed += 1
        else:
            finish = True
            self.jobs_complete += 1
            _arq_debug("%6.2fs ← %s ● %s", time.monotonic() - start, ref, "")
        if self.on_job_end:
            await self.on_job_end(ctx)
        runner: Runner | None = self.ctx.get("flexq_runner")
        ended = runner is not None and job_id in runner.arq_ended  # by the record's write: nothing re-scored
        await asyncio.shield(self._finish_claimed(job_id, finish, incr_score, runner if not ended else None))
        if self.after_job_end:
            await self.after_job_end(ctx)

    async def _finish_claimed(self, job_id: str, finish: bool, incr_score: int | None, runner: Runner | None) -> None:
        """arq's finish; then, for a deferred job, a flow-control wake that arrived while the run was ending
        is applied again (arq's re-scoring overwrote it). Part of the run, not an ``after_job_end`` hook, which
        a caller of ``create_worker`` may replace."""
        await self.finish_job(job_id, finish, None, None, False, incr_score, None)
        if incr_score is not None and runner is not None and runner.flow is not None:
            await runner.flow.settle_wake(job_id)


#: arq counts each Retry as a try; the deadline bounds retries, so this only stops runaway loops.
UNBOUNDED_TRIES = 1_000_000_000
#: How often arq looks for due jobs: the latency of a woken waiter (see worker.flow_store).
POLL_DELAY_S = 0.02
#: Due jobs arq takes per poll, beyond those it runs already (arq always reads the oldest due
#: entries, and a running job stays on its queue: the read must reach past them). arq's default
#: (5 x max_jobs) lets one poll walk a backlog of thousands of jobs, each only joining the
#: flow-control line, before it looks again and sees a job a release has woken.
QUEUE_READ_EXTRA = 50


async def run_generation(ctx: dict[str, Any], job_id: str, *_: Any, **__: Any) -> dict[str, Any] | None:
    """The arq task: one attempt of one flexq job. Deferral is ``Retry``, never a sleep."""
    runner: Runner = ctx["flexq_runner"]
    if not isinstance(job_id, str):
        logs.get_logger("flexq.worker").error("job_invalid", detail="arq job argument is not a job id")
        return None
    if ctx.get("flexq_claimed"):  # the worker read the record as it claimed the job
        defer_s = await runner.run(job_id, raw=ctx.get("flexq_record"), claimed=True)
        if job_id in runner.arq_ended:
            return None  # the job ended, and its record's write removed the arq job
    else:
        defer_s = await runner.run(job_id)
    if defer_s is not None:
        raise Retry(defer=defer_s)
    return None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def check_redis(redis: Redis, settings: WorkerConfig) -> dict[str, str]:
    """Refuse a Redis that may evict keys (a queue must lose none); say how it persists.
    A server that hides CONFIG (some managed services, the in-process stand-in) is taken as it is."""
    try:
        raw = await redis.config_get("maxmemory-policy")
        raw.update(await redis.config_get("appendonly"))
        raw.update(await redis.config_get("appendfsync"))
        raw.update(await redis.config_get("save"))
    except (RedisError, AttributeError, NotImplementedError):
        return {}
    found = {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
             for k, v in raw.items()}
    policy = found.get("maxmemory-policy", "noeviction")
    if policy != "noeviction" and not settings.allow_eviction:
        raise ConfigError(
            f"Redis maxmemory-policy is {policy!r}: it may evict job records and schedules. Set it to "
            "'noeviction' (CONFIG SET maxmemory-policy noeviction), or FLEXQ_ALLOW_EVICTION=1 to run anyway"
        )
    return found


#: Collection thresholds for a long-lived worker with thousands of calls in flight (docs/benchmarks.md,
#: section 3). Young generation: 5,000 allocations (CPython: 700, which collects so often that short-lived
#: objects get promoted, and the full collections, which walk every in-flight call's objects, come back);
#: generation 1 every 10 of those (CPython's), so that each such collection walks few enough objects to stay
#: short; the old generation only after 100 generation-1 collections (CPython: 10), which keeps the
#: full collections (~0.4-0.5 s with 5,000 calls in flight) out of a ramp to thousands of calls.
GC_THRESHOLDS = (5_000, 10, 100)


def tune_gc() -> None:
    """Freeze what start-up built (never collected again) and set the worker's collection thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def startup(ctx: dict[str, Any]) -> None:
    settings: WorkerConfig = ctx.get("flexq_settings") or WorkerConfig()
    if ctx.get("flexq_configure_logs", True):
        logs.configure(settings.log_format, level=logs.level_of(settings.log_level))
    for secret in settings.secrets:
        logs.register_secret(secret)
    redis = ctx.get("flexq_redis") or await connect_redis(settings)
    found = await check_redis(redis, settings)
    if found:
        logs.get_logger("flexq.worker").info(
            "redis_persistence", maxmemory_policy=found.get("maxmemory-policy"), appendonly=found.get("appendonly"),
            appendfsync=found.get("appendfsync"), save=found.get("save") or "off",
        )
    ctx.setdefault("flexq_owns_redis", "flexq_redis" not in ctx)
    store = JobStore(
        redis, queue=settings.queue, retention_s=settings.retention_s,
        blobs=open_blob_store(settings.blob_store, redis=redis, queue=settings.queue),
        events_maxlen=settings.events_maxlen,
    )
    name = worker_name()
    factory = ctx.get("flexq_gemini_factory", GeminiClient)
    if settings.channels:  # one client per channel, in preference order
        clients = {channel.name: factory(settings, channel=channel) for channel in settings.channels}
        gemini = next(iter(clients.values()))
    else:
        gemini = factory(settings)
        clients = {}
    flow = FlowControl(redis, store.keys, config_from_settings(settings), worker=name) if settings.flow else None
    metrics = _serve_metrics(settings, name, ctx)
    runner = Runner(
        store=store, gemini=gemini, settings=settings, worker_name=name, flow=flow, metrics=metrics, clients=clients,
        price_factors={channel.name: channel.price_factor for channel in settings.channels},
        batch=_batch_route(settings, list(clients.values()) or [gemini]),
    )
    keeper = LeaseKeeper(store, runner.leases, lease_s=settings.lease_s, worker_name=name, flow=flow)
    keeper.start()
    ctx.update(flexq_runner=runner, flexq_keeper=keeper, flexq_redis=redis, flexq_gemini=gemini)
    logs.get_logger("flexq.worker").info(
        "worker_started", worker=name, queue=settings.queue, redis=settings.redis_url_redacted,
        base_url=settings.gemini_base_url, lease_s=settings.lease_s, channels=runner.channel_names,
    )


def _batch_route(settings: WorkerConfig, clients: list[Any]) -> BatchTier | None:
    """The Batch API of ``batch``-tier jobs: the first channel on the Gemini API (Vertex AI's batch
    prediction is another API); None when there is none, and such jobs move on to flex or fail."""
    client = next((c for c in clients if isinstance(c, GeminiClient) and not c.vertex), None)
    return BatchTier(client.sdk, settings, channel=client.channel) if client is not None else None


def _serve_metrics(settings: WorkerConfig, name: str, ctx: dict[str, Any]) -> WorkerMetrics | None:
    """This process's ``/metrics`` on ``FLEXQ_METRICS_PORT`` (none when unset); a port in use is a ConfigError."""
    if settings.metrics_port is None:
        return None
    metrics = WorkerMetrics(queue=settings.queue, worker=name)
    url = metrics.serve(settings.metrics_host, settings.metrics_port)
    ctx["flexq_metrics"] = metrics  # stopped by shutdown
    logs.get_logger("flexq.worker").info("metrics_serving", url=url)
    return metrics


async def after_job(ctx: dict[str, Any]) -> None:
    """arq has re-scored a deferred job: re-apply a flow-control wake that raced with it (a plain arq
    worker's runs; ``FlexqWorker``'s claimed runs do it as they finish)."""
    runner: Runner | None = ctx.get("flexq_runner")
    if ctx.get("flexq_claimed"):
        return  # FlexqWorker._finish_claimed did it (or the job ended in its record's write)
    if runner is not None and runner.flow is not None:
        await runner.flow.settle_wake(str(ctx["job_id"]))


async def shutdown(ctx: dict[str, Any]) -> None:
    keeper: LeaseKeeper | None = ctx.get("flexq_keeper")
    if keeper is not None:
        await keeper.stop()
    metrics: WorkerMetrics | None = ctx.get("flexq_metrics")
    if metrics is not None:
        await asyncio.to_thread(metrics.close)  # waits for the server thread's poll (up to 0.5 s)
    runner: Runner | None = ctx.get("flexq_runner")
    clients: list[Any] = list(runner.clients.values()) if runner is not None and runner.clients else []
    gemini = ctx.get("flexq_gemini")
    for client in clients or ([gemini] if gemini is not None else []):
        await client.aclose()
    redis = ctx.get("flexq_redis")
    if redis is not None and ctx.get("flexq_owns_redis"):
        await redis.aclose()


def worker_kwargs(settings: WorkerConfig, *, concurrency: int | None = None, burst: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``arq.worker.Worker``: every default chosen deliberately."""
    job_timeout_s = settings.job_timeout_s
    max_jobs = concurrency or settings.concurrency
    return {
        "functions": [func(run_generation, name=arq_wire.FUNCTION, max_tries=UNBOUNDED_TRIES, timeout=job_timeout_s)],
        "queue_name": arq_wire.queue_key(settings.queue),
        "redis_settings": RedisSettings.from_dsn(settings.redis_url.get_secret_value()),
        "job_serializer": arq_wire.serialize,
        "job_deserializer": arq_wire.deserialize,
        "max_jobs": max_jobs,
        "job_timeout": job_timeout_s,
        "max_tries": UNBOUNDED_TRIES,
        "keep_result": 0,
        "allow_abort_jobs": True,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "after_job_end": after_job,
        "poll_delay": POLL_DELAY_S,
        "queue_read_limit": max_jobs + QUEUE_READ_EXTRA,
        "health_check_interval": 30,
        "burst": burst,
        "log_results": False,
    }


def create_worker(
    settings: WorkerConfig, *, concurrency: int | None = None, burst: bool = False, redis: Redis | None = None,
    owns_redis: bool = False, ctx: dict[str, Any] | None = None, handle_signals: bool = True, **arq_options: Any,
) -> Worker:
    """The one way a worker is built (``flexq worker``, ``flexq batch``, the benchmarks).

    ``redis``: a client to use instead of connecting to ``REDIS_URL`` (the batch command's
    in-process stand-in); the worker then polls through it too, and closes it at shutdown if it
    ``owns_redis``. ``ctx`` adds to arq's job context (tests put a fake Gemini client factory there);
    ``arq_options`` override arq's own (the benchmarks time jobs with arq's hooks)."""
    context: dict[str, Any] = {"flexq_settings": settings, **(ctx or {})}
    extra: dict[str, Any] = {"handle_signals": handle_signals, **arq_options}
    if redis is not None:
        context.update(flexq_redis=redis, flexq_owns_redis=owns_redis)
        extra["redis_pool"] = ArqRedis(connection_pool=redis.connection_pool)
    worker = FlexqWorker(
        **{**worker_kwargs(settings, concurrency=concurrency, burst=burst), "ctx": context, **extra}
    )
    # Short in-progress TTL from the first moment: a worker killed before the job's first lease
    # renewal is still recovered within the lease, not after the job timeout.
    worker.in_progress_timeout_s = settings.lease_s
    return worker


def _arq_settings_class() -> type:
    """``arq worker.runtime.WorkerSettings``: the plain arq CLI's view of the same worker."""
    kw = worker_kwargs(WorkerConfig())
    fields = {name: kw[name] for name in (
        "functions", "queue_name", "redis_settings", "max_jobs", "job_timeout", "max_tries", "keep_result",
        "allow_abort_jobs", "poll_delay", "queue_read_limit", "health_check_interval", "log_results",
    )}
    hooks = {name: staticmethod(kw[name]) for name in (
        "job_serializer", "job_deserializer", "on_startup", "on_shutdown", "after_job_end",
    )}
    return type("WorkerSettings", (), {**fields, **hooks, "__doc__": _arq_settings_class.__doc__})


def __getattr__(name: str) -> Any:
    """Built on first use, not at import: reading the environment belongs to the command that runs."""
    if name == "WorkerSettings":
        return _arq_settings_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
