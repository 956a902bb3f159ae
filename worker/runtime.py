"""The thin interface to arq (0.28, maintenance-only: arq#510). Nothing else imports arq.

Every arq default that does not fit minutes-long flex calls is chosen here on purpose:
- serializer: JSON (``producer.serializer``), never pickle;
- ``max_tries``: effectively unbounded, because the retry budget is the job's deadline and
  deferrals for shed load are not failures (arq counts every ``Retry`` and every crash);
- ``job_timeout``: the request timeout plus a minute, so the SDK's own timeout fires first;
- ``keep_result``: 0, results live in flexq's job record (and arq #432 cannot block a retry);
- ``allow_abort_jobs``: on, so ``flexq cancel`` aborts a running call;
- in-progress key: a short lease renewed by ``worker.lease`` instead of the job timeout.

Run with ``flexq worker`` or ``arq worker.runtime.WorkerSettings``.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from arq import worker as arq_worker
from arq.connections import RedisSettings
from arq.worker import Retry, Worker, func
from redis.exceptions import RedisError

from producer.keys import ARQ_FUNCTION, Keys
from producer.queue import connect_redis
from producer.serializer import deserialize, serialize
from producer.settings import FlexqSettings
from producer.store import JobStore
from worker import logs
from worker.flow import config_from_settings
from worker.flow_store import FlowControl
from worker.gemini import GeminiClient
from worker.lease import LeaseKeeper
from worker.runner import Runner

_arq_log_redis_info = getattr(arq_worker, "log_redis_info")  # noqa: B009 - not re-exported by arq


async def _log_redis_info(redis: Any, log_func: Any) -> None:
    """arq calls INFO at start-up; the in-process Redis stand-in (fakeredis) has no INFO."""
    try:
        await _arq_log_redis_info(redis, log_func)
    except RedisError:
        log_func("redis INFO unavailable (in-process Redis stand-in)")


setattr(arq_worker, "log_redis_info", _log_redis_info)  # noqa: B010 - see _log_redis_info

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
    defer_s = await runner.run(job_id)
    if defer_s is not None:
        raise Retry(defer=defer_s)
    return None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def startup(ctx: dict[str, Any]) -> None:
    settings: FlexqSettings = ctx.get("flexq_settings") or FlexqSettings()
    if ctx.get("flexq_configure_logs", True):
        logs.configure(settings.log_format)
    logs.register_secret(settings.gemini_api_key.get_secret_value() if settings.gemini_api_key else None)
    logs.register_secret(_redis_password(settings))
    redis = ctx.get("flexq_redis") or await connect_redis(settings)
    ctx.setdefault("flexq_owns_redis", "flexq_redis" not in ctx)
    store = JobStore(redis, queue=settings.queue, retention_s=settings.retention_s)
    name = worker_name()
    gemini = ctx.get("flexq_gemini_factory", GeminiClient)(settings)
    flow = FlowControl(redis, store.keys, config_from_settings(settings), worker=name) if settings.flow else None
    runner = Runner(store=store, gemini=gemini, settings=settings, worker_name=name, flow=flow)
    keeper = LeaseKeeper(store, runner.leases, lease_s=settings.lease_s, worker_name=name, flow=flow)
    keeper.start()
    ctx.update(flexq_runner=runner, flexq_keeper=keeper, flexq_redis=redis, flexq_gemini=gemini)
    logs.get_logger("flexq.worker").info(
        "worker_started", worker=name, queue=settings.queue, redis=settings.redis_url_redacted,
        base_url=settings.gemini_base_url, lease_s=settings.lease_s,
    )


async def after_job(ctx: dict[str, Any]) -> None:
    """arq has re-scored a deferred job: re-apply a flow-control wake that raced with it."""
    runner: Runner | None = ctx.get("flexq_runner")
    if runner is not None and runner.flow is not None:
        await runner.flow.settle_wake(str(ctx["job_id"]))


async def shutdown(ctx: dict[str, Any]) -> None:
    keeper: LeaseKeeper | None = ctx.get("flexq_keeper")
    if keeper is not None:
        await keeper.stop()
    gemini = ctx.get("flexq_gemini")
    if gemini is not None:
        await gemini.aclose()
    redis = ctx.get("flexq_redis")
    if redis is not None and ctx.get("flexq_owns_redis"):
        await redis.aclose()


def _redis_password(settings: FlexqSettings) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(settings.redis_url.get_secret_value()).password


def worker_kwargs(settings: FlexqSettings, *, concurrency: int | None = None, burst: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``arq.worker.Worker``: every default chosen deliberately."""
    job_timeout_s = settings.job_timeout_s
    return {
        "functions": [func(run_generation, name=ARQ_FUNCTION, max_tries=UNBOUNDED_TRIES, timeout=job_timeout_s)],
        "queue_name": Keys(settings.queue).arq_queue,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url.get_secret_value()),
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "max_jobs": concurrency or settings.concurrency,
        "job_timeout": job_timeout_s,
        "max_tries": UNBOUNDED_TRIES,
        "keep_result": 0,
        "allow_abort_jobs": True,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "after_job_end": after_job,
        "poll_delay": POLL_DELAY_S,
        "queue_read_limit": (concurrency or settings.concurrency) + QUEUE_READ_EXTRA,
        "health_check_interval": 30,
        "burst": burst,
        "log_results": False,
    }


def create_worker(
    settings: FlexqSettings | None = None, *, concurrency: int | None = None, burst: bool = False, **extra: Any
) -> Worker:
    settings = settings or FlexqSettings()
    ctx = {"flexq_settings": settings, **extra.pop("ctx", {})}
    worker = Worker(**{**worker_kwargs(settings, concurrency=concurrency, burst=burst), "ctx": ctx, **extra})
    # Short in-progress TTL from the first moment: a worker killed before the job's first lease
    # renewal is still recovered within the lease, not after the job timeout.
    worker.in_progress_timeout_s = settings.lease_s
    return worker


class WorkerSettings:
    """For the plain arq CLI: ``arq worker.runtime.WorkerSettings`` (reads the same environment)."""

    _kw = worker_kwargs(FlexqSettings())
    functions = _kw["functions"]
    queue_name = _kw["queue_name"]
    redis_settings = _kw["redis_settings"]
    job_serializer = staticmethod(serialize)
    job_deserializer = staticmethod(deserialize)
    max_jobs = _kw["max_jobs"]
    job_timeout = _kw["job_timeout"]
    max_tries = UNBOUNDED_TRIES
    keep_result = 0
    allow_abort_jobs = True
    on_startup = staticmethod(startup)
    on_shutdown = staticmethod(shutdown)
    after_job_end = staticmethod(after_job)
    poll_delay = POLL_DELAY_S
    queue_read_limit = _kw["queue_read_limit"]
    health_check_interval = 30
    log_results = False
