"""worker.metrics: a worker's own Prometheus metrics, recorded by the runner and served per process.

In process: a ``Runner`` on fakeredis with a scripted Gemini and a ``WorkerMetrics`` of its own
(each test its own registry), read back with ``registry.get_sample_value``. End to end: a real
``flexq worker`` with ``FLEXQ_METRICS_PORT`` against the simulator, its ``/metrics`` scraped over HTTP
and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from bench.common import free_port
from producer.errors import ConfigError
from producer.queue import FlexQueue
from producer.status import Outcome, Status
from tests.conftest import API_KEY, make_settings
from tests.fakes import USAGE, ScriptedGemini, answer, overloaded
from tests.helpers import poll, running_worker, worker_env
from tests.test_runner import calls_reached, enqueue, held
from worker.config import WorkerConfig
from worker.metrics import LATENCY_BUCKETS_S, METRICS, WorkerMetrics
from worker.runner import Runner

MODEL = "gemini-2.5-flash"


def runner_with(queue: FlexQueue, gemini: Any, metrics: WorkerMetrics) -> Runner:
    return Runner(store=queue.store, gemini=gemini, settings=make_settings(), worker_name="test-host:1:aaaaaa",
                  rand=lambda: 0.5, metrics=metrics)


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- recording ------------------------------------------------------------------------------------


async def test_attempts_latency_tokens_and_cost_are_counted(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue, prompt="Say hello")
    metrics = WorkerMetrics(queue="flexq-test", worker="test-host:1:aaaaaa")
    runner = runner_with(fake_queue, ScriptedGemini.of(overloaded(), answer("Hello there")), metrics)
    assert await runner.run("j1") is not None  # a 503: deferred
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and record.cost_usd is not None and record.cost_usd > 0
    flex = {"model": MODEL, "tier": "flex"}
    assert value(metrics, "flexq_worker_attempts_total", **flex, outcome="overloaded") == 1
    assert value(metrics, "flexq_worker_attempts_total", **flex, outcome="ok") == 1
    assert value(metrics, "flexq_worker_attempts_total", **flex, outcome="server_error") is None
    for outcome, attempt in (("overloaded", record.attempts[0]), ("ok", record.attempts[1])):
        assert attempt.latency_ms is not None
        assert value(metrics, "flexq_worker_attempt_latency_seconds_count", **flex, outcome=outcome) == 1
        assert value(metrics, "flexq_worker_attempt_latency_seconds_sum", **flex, outcome=outcome) == pytest.approx(
            attempt.latency_ms / 1000)
    # the 503 carried no usage: only the answer's tokens count
    assert value(metrics, "flexq_worker_tokens_total", **flex, kind="prompt") == USAGE.prompt_tokens
    assert value(metrics, "flexq_worker_tokens_total", **flex, kind="output") == USAGE.output_tokens
    assert value(metrics, "flexq_worker_tokens_total", **flex, kind="thoughts") == USAGE.thoughts_tokens
    assert value(metrics, "flexq_worker_cost_usd_total", **flex) == pytest.approx(record.cost_usd)
    assert value(metrics, "flexq_worker_calls_in_flight", **flex) == 0
    assert value(metrics, "flexq_worker_info", queue="flexq-test", worker="test-host:1:aaaaaa") == 1


async def test_latency_lands_in_buckets_sized_for_llm_calls(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue)
    metrics = WorkerMetrics(process=False)
    await runner_with(fake_queue, ScriptedGemini.of(answer()), metrics).run("j1")
    record = await fake_queue.get("j1")
    slow = record.model_copy(update={"attempts": [record.attempts[0].model_copy(update={"latency_ms": 90_000})]})
    metrics.attempt(slow, 1)  # a 90 s generation
    assert LATENCY_BUCKETS_S[0] == 0.1 and LATENCY_BUCKETS_S[-1] == 900.0
    ok = {"model": MODEL, "tier": "flex", "outcome": "ok"}
    bucket = "flexq_worker_attempt_latency_seconds_bucket"
    assert value(metrics, bucket, **ok, le="60.0") == 1  # the quick one only
    assert value(metrics, bucket, **ok, le="120.0") == 2
    assert value(metrics, bucket, **ok, le="+Inf") == 2
    assert value(metrics, "flexq_worker_cost_usd_total", model=MODEL, tier="flex") == pytest.approx(
        2 * (record.cost_usd or 0))  # the copy is a succeeded job too
    assert value(metrics, "process_cpu_seconds_total") is None  # process=False: no process collector


async def test_a_call_is_in_flight_until_it_ends_even_when_cut_short(fake_queue: FlexQueue) -> None:
    await enqueue(fake_queue, "j1")
    await enqueue(fake_queue, "j2")
    gate = asyncio.Event()
    gemini = ScriptedGemini.of(held(gate, answer()), held(asyncio.Event(), answer()))
    metrics = WorkerMetrics()
    runner = runner_with(fake_queue, gemini, metrics)
    in_flight = {"model": MODEL, "tier": "flex"}
    first = asyncio.create_task(runner.run("j1"))
    await calls_reached(gemini, 1)
    assert value(metrics, "flexq_worker_calls_in_flight", **in_flight) == 1
    second = asyncio.create_task(runner.run("j2"))
    await calls_reached(gemini, 2)
    assert value(metrics, "flexq_worker_calls_in_flight", **in_flight) == 2
    gate.set()
    assert await first is None
    assert value(metrics, "flexq_worker_calls_in_flight", **in_flight) == 1
    second.cancel()  # a worker shutting down
    with pytest.raises(asyncio.CancelledError):
        await second
    assert value(metrics, "flexq_worker_calls_in_flight", **in_flight) == 0
    assert (await fake_queue.get("j2")).attempts[0].outcome == Outcome.INTERRUPTED
    assert value(metrics, "flexq_worker_attempts_total", **in_flight, outcome="interrupted") == 1
    assert value(metrics, "flexq_worker_attempts_total", **in_flight, outcome="ok") == 1


def test_each_worker_metrics_has_a_registry_of_its_own() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.in_flight.labels(MODEL, "flex").inc()
    assert value(a, "flexq_worker_calls_in_flight", model=MODEL, tier="flex") == 1
    assert value(b, "flexq_worker_calls_in_flight", model=MODEL, tier="flex") is None
    families = {family.name for family in a.registry.collect()}
    assert {name for name, *_ in METRICS} <= families
    assert "process_cpu_seconds" in families  # the process collector


# -- serving --------------------------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local test URL
        return str(response.read().decode())


async def test_serve_answers_scrapes_refuses_a_busy_port_and_closes() -> None:
    metrics = WorkerMetrics()
    metrics.in_flight.labels(MODEL, "flex").set(3)
    url = metrics.serve("127.0.0.1", 0)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert url == f"http://127.0.0.1:{port}/metrics"
    try:
        body = await asyncio.to_thread(_get, url)
        assert 'flexq_worker_calls_in_flight{model="gemini-2.5-flash",tier="flex"} 3.0' in body
        with pytest.raises(ConfigError, match=f"FLEXQ_METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}"):
            WorkerMetrics(process=False).serve("127.0.0.1", port)
    finally:
        await asyncio.to_thread(metrics.close)
    with pytest.raises(urllib.error.URLError, match="refused"):  # nothing listens any more
        await asyncio.to_thread(_get, url)
    metrics.close()  # twice: a no-op


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLEXQ_METRICS_PORT", "FLEXQ_METRICS_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert (WorkerConfig().metrics_port, WorkerConfig().metrics_host) == (None, "127.0.0.1")
    monkeypatch.setenv("FLEXQ_METRICS_PORT", "9465")
    monkeypatch.setenv("FLEXQ_METRICS_HOST", "0.0.0.0")  # what a container sets
    assert (WorkerConfig().metrics_port, WorkerConfig().metrics_host) == (9465, "0.0.0.0")
    for bad in ("0", "65536", "-1", "x"):
        monkeypatch.setenv("FLEXQ_METRICS_PORT", bad)
        with pytest.raises(ValidationError):
            WorkerConfig()
    monkeypatch.setenv("FLEXQ_METRICS_PORT", "")  # empty: unset
    assert WorkerConfig().metrics_port is None


# -- a real worker --------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.redis
@pytest.mark.e2e
async def test_a_worker_serves_its_metrics(real_queue: FlexQueue, redis_url: str, sim_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = worker_env(redis_url, sim_url, API_KEY, FLEXQ_METRICS_PORT=str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    job = await real_queue.enqueue({"model": MODEL, "prompt": "metrics e2e [[fault:503x1]]"}, job_id="m-1")
    flex = {("model", MODEL), ("tier", "flex")}

    def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return name, frozenset(flex | set(labels.items()))

    with running_worker(env, tmp_path / "w.log") as worker:
        record = await real_queue.wait(job.id, timeout_s=60)
        assert record.status == Status.SUCCEEDED
        assert [a.outcome for a in record.attempts] == [Outcome.OVERLOADED, Outcome.OK]

        async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert response.status == 200
                text = await response.text()
            assert API_KEY not in text
            found = samples(text)
            # the job's end is written before the worker counts it: wait for the count
            return found if found.get(key("flexq_worker_attempts_total", outcome="ok")) == 1 else None

        found = await poll(scrape, timeout_s=10, what=f"the ok attempt on {url}")
    assert worker.proc.returncode == 0, worker.log()[-2000:]
    assert found[key("flexq_worker_attempts_total", outcome="overloaded")] == 1
    assert found[key("flexq_worker_attempts_total", outcome="ok")] == 1
    counts = [v for (name, labels), v in found.items()
              if name == "flexq_worker_attempt_latency_seconds_count" and flex <= labels]
    assert sum(counts) == 2 and len(counts) == 2  # one series per outcome
    assert found[key("flexq_worker_calls_in_flight")] == 0
    assert found[key("flexq_worker_cost_usd_total")] == pytest.approx(record.cost_usd)
    assert any(name == "process_resident_memory_bytes" for name, _ in found)
    [info] = [labels for name, labels in found if name == "flexq_worker_info"]
    assert ("queue", "flexq-test") in info
    assert f'"url": "{url}"' in worker.log()  # the metrics_serving line
    assert API_KEY not in worker.log()


@pytest.mark.redis
def test_a_worker_whose_metrics_port_is_taken_stops_at_start_up(redis_url: str) -> None:
    import socket
    import subprocess
    import sys

    from tests.helpers import ROOT

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = worker_env(redis_url, "http://127.0.0.1:1", API_KEY, FLEXQ_METRICS_PORT=str(port))
        run = subprocess.run([sys.executable, "-m", "flexq", "worker", "--burst"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"flexq: FLEXQ_METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}: Address already in use" in run.stderr
    assert "Traceback" not in run.stderr and API_KEY not in run.stderr + run.stdout


def test_every_family_is_in_the_docs_table() -> None:
    """docs/operations.md's per-worker table lists exactly the families of a worker's registry."""
    import re

    from tests.helpers import ROOT

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(flexq_worker_\w+)`", text, flags=re.MULTILINE))
    written = {name + ("_total" if kind == "counter" else "") for name, kind, _, _ in METRICS}
    assert documented == written
    assert all(not name.endswith("_total") for name, *_ in METRICS)  # prometheus_client appends it
