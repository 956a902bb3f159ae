"""``flexq metrics`` on a real Redis (database 15, flushed per test): the queue is seeded the way
producers and workers write it (``FlexQueue``, ``JobStore.update`` with ``producer.transitions``,
``FlowControl`` acquire/release/pause), the real HTTP endpoint is scraped with aiohttp and parsed
with prometheus_client's own parser.

``seed_fleet`` and ``run_attempt`` are shared with tests/test_top.py.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flexq import metrics
from flexq.fleet import FleetReader
from producer import transitions
from producer.errors import StoreUnavailableError
from producer.models import JobRecord, JobResult, Usage, utcnow
from producer.queue import FlexQueue
from producer.status import Outcome, Status, Tier
from tests.conftest import API_KEY, make_settings
from tests.helpers import poll
from worker.classify import QuotaKind
from worker.config import WorkerConfig
from worker.flow import FlowConfig, Permit, config_from_settings
from worker.flow_store import FlowControl

ROOT = Path(__file__).resolve().parent.parent
FLASH, LITE, PRO = "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fleet_settings(redis_url: str, **overrides: object) -> WorkerConfig:
    """The test queue, with a breaker that opens after 3 failures and a small starting limit."""
    return make_settings(redis_url=redis_url, flow_initial=8, breaker_min_failures=3, breaker_failure_ratio=0.5,
                         **overrides)


async def run_attempt(
    queue: FlexQueue, job_id: str, *, outcome: Outcome, then: str, tier: Tier = Tier.FLEX, latency_ms: int = 100,
    usage: Usage | None = None, usd: float | None = None, standard_usd: float | None = None,
    retry_in_s: float = 60.0,
) -> JobRecord:
    """One attempt, written as a worker writes it: opened (``running``), then closed with ``outcome``
    and ``then`` ``retry`` (arq defers the job ``retry_in_s``), ``succeed`` or ``fail`` (arq drops it)."""
    opened_at = utcnow()

    def begin(record: JobRecord) -> transitions.Change[None]:
        return transitions.Change(transitions.begin_attempt(record, tier=tier, worker="w-test", now=opened_at))

    await queue.store.update(job_id, begin)
    closed_at = opened_at + timedelta(milliseconds=latency_ms)

    def close(record: JobRecord) -> transitions.Change[None]:
        assert record.open_attempt is not None
        closed = transitions.close_attempt(
            record, number=record.open_attempt.number, now=closed_at, outcome=outcome, usage=usage,
            http_status={Outcome.OK: 200, Outcome.OVERLOADED: 503, Outcome.RATE_LIMITED: 429}.get(outcome, 400),
        )
        counted = (closed.attempts[-1],)
        if then == "retry":
            retrying = transitions.schedule_retry(closed, next_tier=tier, now=closed_at)
            return transitions.Change(retrying, counted=counted, run_in_s=retry_in_s)
        if then == "succeed":
            result = JobResult(text="ok", finish_reason="STOP", usage=usage or Usage(), model_version=None, tier=tier)
            done = transitions.succeed(closed, result=result, now=closed_at, cost_usd=usd,
                                       standard_cost_usd=standard_usd)
            return transitions.Change(done, counted=counted, drop_arq_job=True,
                                      cost=transitions.Cost(str(tier), usd, standard_usd))
        failed = transitions.fail(closed, kind="client_error", message="400 INVALID_ARGUMENT", now=closed_at)
        return transitions.Change(failed, counted=counted, drop_arq_job=True)

    change = await queue.store.update(job_id, close)
    assert change is not None
    return change.record


@dataclass
class Seeded:
    flow: FlowControl
    held: list[Permit | None]


async def seed_fleet(queue: FlexQueue, settings: WorkerConfig) -> Seeded:
    """A small fleet in every state ``flexq metrics`` and ``flexq top`` show (the expected figures are
    spelled out in the tests that read it):

    jobs: queued 1 (j-queued), running 1 (j-running), retrying 1 (j-retrying, deferred 300 s),
    succeeded 2, failed 1, cancelled 1; arq: due 2 (queued, running), deferred 1. Attempts: flex
    overloaded 2, flex ok 1, standard ok 1, flex client_error 1. Cost: flex $0.0005, standard $0.002.
    Workers: one live, one whose heartbeat is an hour old. Flow: flash/flex limit 8 with 2 in flight,
    a load-independent 503 learned; pro/standard breaker open; flash paused 600 s by an operator;
    flash-lite paused by a billing 429, with a quota alert."""
    ids = ["j-queued", "j-running", "j-retrying", "j-flex-ok", "j-std-ok", "j-failed", "j-cancelled"]
    for job_id in ids:
        await queue.enqueue({"model": FLASH, "prompt": f"prompt of {job_id}"}, job_id=job_id)
    await run_attempt(queue, "j-std-ok", outcome=Outcome.OVERLOADED, then="retry", retry_in_s=0.0)
    await run_attempt(queue, "j-std-ok", outcome=Outcome.OK, then="succeed", tier=Tier.STANDARD, latency_ms=1500,
                      usage=Usage(prompt_tokens=10, output_tokens=20, thoughts_tokens=5), usd=0.002, standard_usd=0.002)
    await run_attempt(queue, "j-flex-ok", outcome=Outcome.OK, then="succeed", latency_ms=500,
                      usage=Usage(prompt_tokens=3, output_tokens=4), usd=0.0005, standard_usd=0.001)
    await run_attempt(queue, "j-failed", outcome=Outcome.CLIENT_ERROR, then="fail")
    await run_attempt(queue, "j-retrying", outcome=Outcome.OVERLOADED, then="retry", retry_in_s=300.0)
    await queue.cancel("j-cancelled")

    def begin(record: JobRecord) -> transitions.Change[None]:
        return transitions.Change(transitions.begin_attempt(record, tier=Tier.FLEX, worker="w-test", now=utcnow()))

    await queue.store.update("j-running", begin)  # its call is in flight
    now_s = time.time()
    await queue.store.heartbeat("w-live", [], lease_s=settings.lease_s, now_s=now_s)
    await queue.store.heartbeat("w-gone", [], lease_s=settings.lease_s, now_s=now_s - 3600)

    flow = FlowControl(queue.redis, queue.store.keys, config_from_settings(settings), worker="w-test")
    held = [(await flow.acquire(job_id, FLASH, "flex", 10)).permit for job_id in ("j-running", "other-1")]
    shed = await flow.acquire("other-2", FLASH, "flex", 10)
    await flow.release(shed.permit, "overloaded")  # one 503 with the pool far from full: load-independent
    for n in range(3):
        permit = (await flow.acquire(f"pro-{n}", PRO, "standard", 10)).permit
        await flow.release(permit, "server_error")
    await flow.pause(FLASH, time.time() + 600, "maintenance")
    permit = (await flow.acquire("lite-1", LITE, "flex", 10)).permit
    await flow.release(permit, "rate_limited", quota=QuotaKind.BILLING)
    return Seeded(flow, held)


# -- scraping ------------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset({"queue": "flexq-test", **labels}.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def metrics_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flexq")
    metrics.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["metrics", *argv])


@dataclass
class Served:
    url: str
    task: asyncio.Task[int]


@pytest.fixture
async def served(redis_url: str, capsys: pytest.CaptureFixture[str]) -> AsyncIterator[Served]:
    """``cmd_metrics`` running in this test's event loop on a free port, as ``flexq metrics --port 0``."""
    task = asyncio.create_task(metrics.cmd_metrics(metrics_args("--port", "0"), fleet_settings(redis_url)))

    async def url() -> str | None:
        if task.done():
            task.result()  # raise what stopped it
        found = re.search(r"serving (http://\S+/metrics)", capsys.readouterr().out)
        return found.group(1) if found else None

    yield Served(await poll(url, timeout_s=10, what="flexq metrics to serve"), task)
    if not task.done():
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


@pytest.mark.redis
async def test_a_scrape_shows_the_whole_fleet(served: Served, real_queue: FlexQueue, redis_url: str) -> None:
    settings = fleet_settings(redis_url)
    seeded = await seed_fleet(real_queue, settings)
    body = await scrape(served.url)
    assert API_KEY not in body
    samples = parse(body)

    assert value(samples, "flexq_up") == 1
    assert 0 < value(samples, "flexq_scrape_duration_seconds") < 5
    jobs = {status: value(samples, "flexq_jobs", status=status) for status in Status}
    assert jobs == {"queued": 1, "running": 1, "retrying": 1, "succeeded": 2, "failed": 1, "cancelled": 1}
    attempts = {(dict(k[1])["tier"], dict(k[1])["outcome"]): v for k, v in samples.items()
                if k[0] == "flexq_attempts_total"}
    assert attempts == {("flex", "overloaded"): 2, ("flex", "ok"): 1, ("standard", "ok"): 1,
                        ("flex", "client_error"): 1}
    assert value(samples, "flexq_tokens_total", tier="standard", kind="output") == 20
    assert value(samples, "flexq_tokens_total", tier="standard", kind="thoughts") == 5
    assert value(samples, "flexq_tokens_total", tier="flex", kind="prompt") == 3
    assert value(samples, "flexq_cost_usd_total", tier="flex") == pytest.approx(0.0005)
    assert value(samples, "flexq_cost_usd_total", tier="standard") == pytest.approx(0.002)
    assert value(samples, "flexq_standard_equivalent_cost_usd_total") == pytest.approx(0.003)
    assert value(samples, "flexq_unknown_cost_jobs_total") == 0
    assert value(samples, "flexq_ok_latency_seconds", quantile="0.5") == pytest.approx(0.5)
    assert value(samples, "flexq_ok_latency_seconds", quantile="0.95") == pytest.approx(1.5)
    assert value(samples, "flexq_ok_latency_samples") == 2
    assert value(samples, "flexq_arq_queue_jobs", state="due") == 2
    assert value(samples, "flexq_arq_queue_jobs", state="deferred") == 1
    assert value(samples, "flexq_workers") == 1

    flash = {"model": FLASH, "tier": "flex"}
    assert value(samples, "flexq_flow_limit", **flash) == 8
    assert value(samples, "flexq_flow_in_flight", **flash) == len(seeded.held) == 2
    expected_random = 1 / (FlowConfig().baseline_prior_n + 1)
    assert value(samples, "flexq_flow_load_independent_503_ratio", **flash) == pytest.approx(expected_random, abs=1e-4)
    assert value(samples, "flexq_flow_breaker_state", **flash, state="closed") == 1
    assert value(samples, "flexq_flow_breaker_state", **flash, state="open") == 0
    pro = {"model": PRO, "tier": "standard"}
    assert value(samples, "flexq_flow_breaker_state", **pro, state="open") == 1
    assert value(samples, "flexq_flow_breaker_state", **pro, state="closed") == 0
    assert value(samples, "flexq_flow_breaker_opens", **pro) == 1
    assert 0 < value(samples, "flexq_flow_breaker_open_left_seconds", **pro) <= settings.breaker_cool_down_s
    assert value(samples, "flexq_flow_in_flight", **pro) == 0
    assert 590 < value(samples, "flexq_model_pause_left_seconds", model=FLASH) <= 600
    lite_pause = value(samples, "flexq_model_pause_left_seconds", model=LITE)
    assert 50 < lite_pause <= config_from_settings(settings).billing_pause_s
    assert value(samples, "flexq_model_pause_left_seconds", model=PRO) == 0
    assert value(samples, "flexq_model_quota_alert", model=LITE, kind="billing") == 1
    assert not [k for k in samples if k[0] == "flexq_model_quota_alert" and dict(k[1])["model"] != LITE]

    # the figures move with the queue: a permit returned, a job ended, on the next scrape
    await seeded.flow.release(seeded.held[1], "ok")
    await real_queue.cancel("j-queued")
    again = parse(await scrape(served.url))
    assert value(again, "flexq_flow_in_flight", **flash) == 1
    assert value(again, "flexq_jobs", status="queued") == 0
    assert value(again, "flexq_jobs", status="cancelled") == 2
    assert value(again, "flexq_arq_queue_jobs", state="due") == 1


@pytest.mark.redis
async def test_an_empty_queue_is_zeros_not_gaps(served: Served) -> None:
    samples = parse(await scrape(served.url))
    assert value(samples, "flexq_up") == 1
    assert {status: value(samples, "flexq_jobs", status=status) for status in Status} == dict.fromkeys(Status, 0)
    assert value(samples, "flexq_workers") == 0
    assert value(samples, "flexq_arq_queue_jobs", state="due") == 0
    assert value(samples, "flexq_ok_latency_samples") == 0
    assert not [k for k in samples if k[0] in ("flexq_ok_latency_seconds", "flexq_flow_limit")]


@pytest.mark.redis
async def test_a_scrape_writes_nothing_and_counts_ended_jobs_within_the_retention(
    served: Served, real_queue: FlexQueue
) -> None:
    await real_queue.enqueue({"model": FLASH, "prompt": "x"}, job_id="recent")
    await real_queue.cancel("recent")
    old_key = real_queue.store.keys.index(Status.FAILED)
    await real_queue.redis.zadd(old_key, {"long-gone": time.time() - real_queue.settings.retention_s - 60})
    before = sorted(await real_queue.redis.keys("*"))
    samples = parse(await scrape(served.url))
    assert value(samples, "flexq_jobs", status="cancelled") == 1
    assert value(samples, "flexq_jobs", status="failed") == 0  # past the retention, as flexq stats counts
    assert await real_queue.redis.zcard(old_key) == 1  # ...but not trimmed: a scrape is read-only
    assert sorted(await real_queue.redis.keys("*")) == before


@pytest.mark.redis
async def test_cancelling_the_command_closes_the_port(served: Served) -> None:
    await scrape(served.url)
    served.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await served.task
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(served.url)


async def test_redis_gone_answers_up_0_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    from redis.asyncio import Redis

    settings = make_settings(redis_url="redis://:s3cret-pw@127.0.0.1:1/0")
    reader = FleetReader(Redis.from_url(settings.redis_url.get_secret_value(), socket_connect_timeout=1), settings)
    collector = metrics.FleetCollector(reader, asyncio.get_running_loop(), timeout_s=5)
    try:
        first = await asyncio.to_thread(collector.collect)
        second = await asyncio.to_thread(collector.collect)
    finally:
        await reader.close()
    for families in (first, second):
        assert [(s.name, s.value) for f in families for s in f.samples if s.name == "flexq_up"] == [("flexq_up", 0)]
        assert {f.name for f in families} == {"flexq_up", "flexq_scrape_duration_seconds"}
    err = capsys.readouterr().err
    assert err.count("flexq_up 0") == 1  # one line when scrapes start failing, not one a scrape
    assert "redis://***@127.0.0.1:1/0" in err
    assert "s3cret-pw" not in err


async def test_command_fails_at_once_when_redis_does_not_answer() -> None:
    settings = make_settings(redis_url="redis://:s3cret-pw@127.0.0.1:1/0")
    with pytest.raises(StoreUnavailableError) as caught:
        await metrics.cmd_metrics(metrics_args("--port", "0"), settings)
    assert "s3cret-pw" not in str(caught.value)


def test_arguments() -> None:
    args = metrics_args()
    assert (args.host, args.port, args.timeout_s) == ("127.0.0.1", 9464, metrics.SCRAPE_TIMEOUT_S)
    assert metrics_args("--host", "0.0.0.0", "--port", "9000").port == 9000
    for bad in (["--port", "65536"], ["--port", "-1"], ["--port", "x"], ["--timeout-s", "0"]):
        with pytest.raises(SystemExit):
            metrics_args(*bad)


def test_every_family_is_in_the_docs_table() -> None:
    """docs/operations.md lists exactly the families the exporter writes (a counter with ``_total``)."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(flexq_(?!worker_)\w+)`", text, flags=re.MULTILINE))  # not a worker's own
    written = {name + ("_total" if kind == "counter" else "") for name, kind, _ in metrics.METRICS}
    assert documented == written
    for name, kind, _ in metrics.METRICS:
        assert name.startswith("flexq_")
        assert not name.endswith("_total")  # prometheus_client appends it to a counter
        if kind == "counter" and "usd" in name:
            assert name.endswith("_usd")
