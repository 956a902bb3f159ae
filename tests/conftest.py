"""Shared fixtures: fakeredis for unit tests, a real Redis for integration, the simulator.

Real Redis: ``REDIS_URL`` if set, else 127.0.0.1:6379 (database 15, flushed per test). When none
answers, those tests skip loudly, unless ``FLEXQ_REQUIRE_REDIS=1`` (set by .ci/run) turns the
skip into a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis as sync_redis
from google import genai
from google.genai import types
from redis.asyncio import Redis

from bench.common import private_redis, redis_answers
from producer.queue import FlexQueue
from simulator import RunningSimulator, SimConfig, start_simulator
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
TEST_DB = 15
API_KEY = "test-api-key-DO-NOT-LEAK-7f3a9c"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def _real_redis_url() -> str:
    base = os.environ.get("FLEXQ_TEST_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379"
    base = base.rstrip("/")
    head, _, tail = base.rpartition("/")
    if tail.isdigit() and head.count("/") >= 2:
        base = head
    return f"{base}/{TEST_DB}"


def require_or_skip(reason: str) -> None:
    if os.environ.get("FLEXQ_REQUIRE_REDIS") == "1":
        pytest.fail(f"FLEXQ_REQUIRE_REDIS=1 but {reason}")
    pytest.skip(f"NO REAL REDIS — {reason}; set REDIS_URL or start redis-server on 127.0.0.1:6379")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed database on a real Redis server."""
    url = _real_redis_url()
    if not redis_answers(url):
        require_or_skip(f"no Redis answers at {url}")
    client = sync_redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A private redis-server on a free port in a temp dir (for kills and restarts)."""
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed")
    with private_redis(prefix="flexq-test-redis-") as url:
        yield url


@pytest.fixture
async def fake_redis() -> AsyncIterator[Redis]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


def make_settings(**overrides: object) -> WorkerConfig:
    """A worker's settings (a producer's are a subset: FlexQueue takes them as they are)."""
    base: dict[str, object] = {
        "redis_url": "redis://127.0.0.1:6379/15",
        "gemini_api_key": API_KEY,
        "queue": "flexq-test",
        "retry_base_s": 0.2,
        "retry_max_s": 1.0,
    }
    base.update(overrides)
    return WorkerConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def fake_queue(fake_redis: Redis) -> FlexQueue:
    return await FlexQueue.connect(make_settings(), redis=fake_redis)


@pytest.fixture
async def real_queue(redis_url: str) -> AsyncIterator[FlexQueue]:
    queue = await FlexQueue.connect(make_settings(redis_url=redis_url))
    yield queue
    await queue.close()


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """An in-process simulator with no random faults (directives in prompts still apply)."""
    running = await start_simulator(SimConfig(latency_s=0.01, seed=7))
    yield running
    await running.close()


@pytest.fixture
def sim_url(sim: RunningSimulator) -> str:
    return sim.base_url


SimFactory = Callable[..., Awaitable[RunningSimulator]]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK honours proxy variables: calls to a local simulator must not go through one."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Start in-process simulators (no latency, seed 7, ``SimConfig`` overrides); all closed after the test."""
    running: list[RunningSimulator] = []

    async def factory(**overrides: Any) -> RunningSimulator:
        started = await start_simulator(SimConfig(**({"latency_s": 0.0, "seed": 7} | overrides)))
        running.append(started)
        return started

    yield factory
    for started in running:
        await started.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[genai.Client]]:
    """SDK clients a test makes (append them): closed after the test."""
    made: list[genai.Client] = []
    yield made
    for client in made:
        await client.aio.aclose()


def sdk_client(clients: list[genai.Client], sim: RunningSimulator, api_key: str) -> genai.Client:
    """A google-genai client on ``sim`` (Gemini API, v1beta, no SDK retries, 10 s timeout), closed by ``clients``."""
    options = types.HttpOptions(
        base_url=sim.base_url, api_version="v1beta", retry_options=types.HttpRetryOptions(attempts=1), timeout=10_000
    )
    client = genai.Client(api_key=api_key, http_options=options)
    clients.append(client)
    return client
