"""Faults a production fleet meets: Redis restarted under live workers, hostile input."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import RedisServer
from producer.errors import InvalidRequestError
from producer.queue import FlexQueue
from producer.status import Outcome, Status
from simulator import RunningSimulator
from tests.conftest import API_KEY, make_settings, require_or_skip
from tests.helpers import ROOT, poll, running_worker, wait_all, worker_env


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_workers_ride_out_a_redis_restart(
    restartable_redis: RedisServer, sim: RunningSimulator, tmp_path: Path
) -> None:
    """Redis SIGKILLed while calls are in flight, then started again from its AOF: the worker stays up,
    records the answers it got meanwhile, and takes new jobs (arq alone would exit on the first error)."""
    url = restartable_redis.url
    queue = await FlexQueue.connect(make_settings(redis_url=url))
    ids = [f"slow-{i}" for i in range(4)]
    for job_id in ids:
        await queue.enqueue({"model": "gemini-2.5-flash", "prompt": f"{job_id} [[latency:2s]]"}, job_id=job_id)
    env = worker_env(url, sim.base_url, API_KEY, FLEXQ_LEASE_S="30")
    log = tmp_path / "w.log"
    with running_worker(env, log, "--concurrency", "8") as worker:
        async def all_running() -> bool | None:
            records = [await queue.get(job_id) for job_id in ids]
            return True if all(r.status == Status.RUNNING for r in records) else None

        await poll(all_running, timeout_s=30, what="every job to be running")
        await queue.close()
        restartable_redis.kill()  # the calls are in flight at the simulator
        async def answered() -> bool | None:
            return True if sim.sim.stats.by_status.get(200, 0) >= len(ids) else None

        await poll(answered, timeout_s=30, what="the simulator to answer while Redis is down")
        restartable_redis.start()
        queue = await FlexQueue.connect(make_settings(redis_url=url))
        done = await wait_all(queue, ids, timeout_s=60)
        assert worker.proc.poll() is None, "the worker exited on the Redis restart"
        await queue.enqueue({"model": "gemini-2.5-flash", "prompt": "after the restart"}, job_id="after")
        after = await wait_all(queue, ["after"], timeout_s=30)
    await queue.close()
    assert {k: str(r.status) for k, r in done.items()} == dict.fromkeys(ids, "succeeded")
    for record in done.values():  # the answer got while Redis was down was kept, not paid for twice
        assert [a.outcome for a in record.attempts] == [Outcome.OK]
    assert after["after"].status == Status.SUCCEEDED
    text = log.read_text()
    assert "redis_unavailable" in text and "redis_back" in text


# -- hostile input ----------------------------------------------------------------------------------


def test_a_very_deep_jsonl_line_is_one_bad_line() -> None:
    from flexq.jsonl import parse_jsonl

    deep = '{"model": "gemini-2.5-flash", "prompt": "x", "config": ' + "[" * 100_000 + "]" * 100_000 + "}"
    nested_config = {"model": "gemini-2.5-flash", "prompt": "x", "config": {"labels": {}}}
    node: dict[str, object] = nested_config["config"]  # type: ignore[assignment]
    for _ in range(200):
        node["a"] = {}
        node = node["a"]  # type: ignore[assignment]
    lines = [deep, json.dumps(nested_config), '{"model": "gemini-2.5-flash", "prompt": "fine"}']
    good, bad = parse_jsonl(lines, max_bytes=10_000_000)
    assert [line.line for line in good] == [3]
    assert [(err.line, err.message) for err in bad] == [
        (1, "nested deeper than 64 levels"), (2, "nested deeper than 64 levels"),
    ]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        pytest.param({"n": 1}, "must map a string to a string", id="number-value"),
        pytest.param({"a": ["b"]}, "must map a string to a string", id="list-value"),
        pytest.param(["a"], "must be an object of strings", id="not-an-object"),
        pytest.param({"big": "x" * 3000}, "over the 2000-byte limit", id="too-big"),
    ],
)
async def test_tags_are_strings_and_count_in_the_request_limit(
    fake_redis: Any, tags: Any, message: str
) -> None:
    queue = await FlexQueue.connect(make_settings(max_request_bytes=2000), redis=fake_redis)
    with pytest.raises(InvalidRequestError, match=message) as err:
        await queue.enqueue({"model": "gemini-2.5-flash", "prompt": "hi"}, tags=tags)
    assert err.value.field == "tags"
    assert await fake_redis.dbsize() == 0  # nothing half-written


def test_control_characters_never_reach_the_terminal() -> None:
    from rich.console import Console

    from flexq import render
    from producer import transitions
    from producer.models import utcnow
    from producer.request import GenerateRequest

    record = transitions.new_record(
        "evil", GenerateRequest(model="gemini-2.5-flash", prompt="x"), now=utcnow(), deadline_s=60,
        fallback="none", tags={"note": "\x1b[2J\x1b[31mred\rover"},
    )
    record = transitions.fail(record, kind="client_error", message="400: \x1b]0;title\x07 \u202egnp.exe", now=utcnow())
    console = Console(record=True, width=200, force_terminal=False)
    render.status(console, record)
    render.job_list(console, [record])
    shown = console.export_text()
    assert "\x1b" not in shown and "\r" not in shown and "\u202e" not in shown and "\x07" not in shown
    assert "\\x1b[31mred\\x0dover" in shown and "\\u202e" in shown


@pytest.mark.parametrize(
    "argv",
    [
        ["retry", "x", "--deadline-s", "nan"],
        ["enqueue", "--model", "m", "--prompt", "p", "--deadline-s", "inf"],
        ["wait", "x", "--timeout-s", "-5"],
        ["list", "--limit", "0"],
        ["batch", "in.jsonl", "-o", "out.jsonl", "--concurrency", "0"],
    ],
)
def test_bad_numbers_are_a_one_line_usage_error(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "flexq", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"flexq {argv[0]}: error: argument")


async def test_a_pause_past_the_deadline_fails_the_job_and_resume_lifts_it(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    env = worker_env(redis_url, sim.base_url, API_KEY)

    async def cli(*argv: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flexq", *argv, env=env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    assert "paused for 600s" in await cli("pause", "gemini-2.5-flash", "--for", "10m", "--reason", "maintenance")
    await real_queue.enqueue({"model": "gemini-2.5-flash", "prompt": "short-lived"}, job_id="soon", deadline_s=30)
    await real_queue.enqueue({"model": "gemini-2.5-flash", "prompt": "patient"}, job_id="later", deadline_s=3600)
    with running_worker(env, tmp_path / "w.log"):
        soon = (await wait_all(real_queue, ["soon"], timeout_s=30))["soon"]
        assert (await real_queue.get("later")).status != Status.SUCCEEDED  # waits the pause out
        assert "resumed" in await cli("resume", "gemini-2.5-flash")
        later = (await wait_all(real_queue, ["later"], timeout_s=60))["later"]
    assert soon.status == Status.FAILED and soon.error is not None
    assert soon.error.kind == "deadline_exceeded" and "paused" in soon.error.message
    assert soon.attempts == []  # no call was made: the pause was known
    assert later.status == Status.SUCCEEDED
    assert keys_without_ttl(redis_url) <= BOUNDED_WITHOUT_TTL


#: Keys that may live without a TTL, each bounded another way: status indexes (ended jobs trimmed to the
#: retention by the reconciler), counters (a fixed set of fields), capped lists, arq's queue.
BOUNDED_WITHOUT_TTL = {
    "flexq-test:idx:queued", "flexq-test:idx:running", "flexq-test:idx:retrying", "flexq-test:idx:succeeded",
    "flexq-test:idx:failed", "flexq-test:idx:cancelled", "flexq-test:stats", "flexq-test:latency_ms",
    "flexq-test:flow:log", "arq:queue:flexq-test", "flexq-test:events",
}


def keys_without_ttl(url: str) -> set[str]:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    try:
        return {key.decode() for key in client.scan_iter(count=1000) if client.ttl(key) == -1}
    finally:
        client.close()


def test_a_worker_refuses_a_redis_that_evicts(restartable_redis: RedisServer) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(restartable_redis.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.close()
    env = worker_env(restartable_redis.url, "http://127.0.0.1:1", API_KEY)
    refused = subprocess.run([sys.executable, "-m", "flexq", "worker", "--burst"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "maxmemory-policy is 'allkeys-lru'" in refused.stderr and "Traceback" not in refused.stderr
    allowed = subprocess.run([sys.executable, "-m", "flexq", "worker", "--burst"], cwd=ROOT, capture_output=True,
                             env={**env, "FLEXQ_ALLOW_EVICTION": "1"}, text=True, timeout=60)
    assert allowed.returncode == 0, allowed.stderr
    assert "redis_persistence" in allowed.stdout + allowed.stderr


async def test_a_worker_that_lost_its_job_leaves_the_new_owners_arq_state(fake_redis: Any) -> None:
    """A worker frozen past its lease wakes up after another took the job over: its arq finish must not
    delete the arq job, queue entry and in-progress key that now belong to the new owner."""
    from producer import arq_wire
    from worker.runtime import create_worker

    worker = create_worker(make_settings(), redis=fake_redis, handle_signals=False)
    runner = type("R", (), {"disowned": {"taken"}, "arq_ended": set()})()
    worker.ctx["flexq_runner"] = runner
    for job_id in ("taken", "mine"):
        await fake_redis.set(arq_wire.job_key(job_id), b"{}")
        await fake_redis.set(arq_wire.in_progress_key(job_id), b"1")
        await fake_redis.zadd(arq_wire.queue_key("flexq-test"), {job_id: 1})
    for job_id in ("taken", "mine"):
        await worker.finish_job(job_id, True, None, None, False, None, None)
    assert await fake_redis.exists(arq_wire.job_key("taken"), arq_wire.in_progress_key("taken")) == 2
    assert await fake_redis.zscore(arq_wire.queue_key("flexq-test"), "taken") == 1
    assert await fake_redis.exists(arq_wire.job_key("mine"), arq_wire.in_progress_key("mine")) == 0
    assert runner.disowned == set()  # forgotten once skipped


def test_enqueue_file_twice_gives_an_id_less_line_the_same_id(redis_url: str, tmp_path: Path) -> None:
    """Rerunning `enqueue --file` must not bill a line without an id again (as `flexq batch` does)."""
    source = tmp_path / "jobs.jsonl"
    source.write_text(json.dumps({"model": "gemini-2.5-flash", "prompt": "no id here"}) + "\n")
    env = {**os.environ, "REDIS_URL": redis_url, "FLEXQ_QUEUE": "flexq-test"}
    runs = [subprocess.run([sys.executable, "-m", "flexq", "enqueue", "--file", str(source)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[1].stderr
    first_id = runs[0].stdout.strip()
    assert first_id.startswith("b-") and runs[1].stdout.strip() == f"{first_id} (exists: queued)"
    assert "enqueued 0, already there 1" in runs[1].stderr
