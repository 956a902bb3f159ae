"""Channels (FLEXQ_CHANNELS): settings, per-job preference, failover from an open or paused channel and
back after recovery, the channel on each attempt, cost per channel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from producer.errors import InvalidRequestError
from producer.pricing import cost_usd
from producer.queue import FlexQueue, JobSpec
from producer.request import DEFAULT_CHANNEL
from producer.status import Status, Tier
from simulator import SimConfig, start_simulator
from tests.conftest import API_KEY, make_settings
from tests.helpers import ROOT, poll, running_worker, wait_all, worker_env
from worker.config import ChannelConfig, WorkerConfig, flow_model, limits_model

MODEL = "gemini-2.5-flash"
OTHER_KEY = "second-key-DO-NOT-LEAK-91c2"


# -- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        pytest.param({"name": "r", "kind": "relay", "api_key_env": "K"}, "a relay needs base_url", id="relay-no-url"),
        pytest.param({"name": "s", "api_key": OTHER_KEY, "api_key_env": "K"}, "not both", id="two-key-sources"),
        pytest.param({"name": "v", "kind": "vertex"}, "needs project", id="vertex-no-credentials"),
        pytest.param({"name": "v", "kind": "vertex", "project": "p", "api_key": OTHER_KEY}, "not both",
                     id="vertex-key-and-project"),
        pytest.param({"name": "s"}, "needs api_key_env", id="gemini-no-key"),
        pytest.param({"name": "s", "project": "p", "api_key_env": "K"}, "project is for kind 'vertex'",
                     id="project-on-gemini"),
        pytest.param({"name": "bad name", "api_key_env": "K"}, "not a channel name", id="bad-name"),
        pytest.param({"name": "s", "api_key_env": "K", "price_factor": 0}, "greater than 0", id="zero-price"),
    ],
)
def test_a_channel_that_cannot_make_a_call_is_refused(channel: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as raised:
        ChannelConfig.model_validate(channel)
    assert OTHER_KEY not in str(raised.value)


def test_channels_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_KEY", OTHER_KEY)
    monkeypatch.setenv("FLEXQ_CHANNELS", json.dumps([
        {"name": "studio", "api_key_env": "STUDIO_KEY"},
        {"name": "vx", "kind": "vertex", "project": "proj-1", "location": "us-central1"},
        {"name": "relay", "kind": "relay", "base_url": "https://relay.example", "api_key": "relay-secret-77",
         "price_factor": 1.25},
    ]))
    settings = WorkerConfig()
    assert [c.name for c in settings.channel_list()] == ["studio", "vx", "relay"]
    assert settings.channels[0].key() == OTHER_KEY
    assert settings.channels[1].key() is None  # Application Default Credentials
    # every channel key is a secret the logs redact, and none shows in the settings' repr
    assert OTHER_KEY in settings.secrets and "relay-secret-77" in settings.secrets
    assert "relay-secret-77" not in repr(settings)


def test_a_channel_name_given_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="given twice"):
        make_settings(channels=[{"name": "a", "api_key_env": "K"}, {"name": "a", "api_key_env": "L"}])


def test_without_channels_the_top_level_settings_are_the_default_channel() -> None:
    [channel] = make_settings().channel_list()
    assert channel.name == DEFAULT_CHANNEL and channel.kind == "gemini" and channel.key() == API_KEY


@pytest.mark.parametrize(
    ("model", "channel", "scope"),
    [
        pytest.param("gemini-2.5-flash", None, "gemini-2.5-flash", id="no-channel"),
        pytest.param("models/gemini-2.5-flash", DEFAULT_CHANNEL, "gemini-2.5-flash", id="default-keeps-the-name"),
        pytest.param("gemini-2.5-flash", "vx", "gemini-2.5-flash@vx", id="own-scope"),
    ],
)
def test_each_channel_has_its_own_flow_scope(model: str, channel: str | None, scope: str) -> None:
    assert flow_model(model, channel) == scope
    assert limits_model(scope) == "gemini-2.5-flash"  # FLEXQ_LIMITS still name the model


# -- enqueue ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        pytest.param([], "at least one", id="empty"),
        pytest.param("studio", "a list", id="a-string"),
        pytest.param(["a", "a"], "named twice", id="twice"),
        pytest.param(["a b"], "not a channel name", id="bad-name"),
    ],
)
async def test_a_bad_channel_preference_is_refused_at_enqueue(
    fake_queue: FlexQueue, channels: Any, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message) as raised:
        await fake_queue.enqueue({"model": MODEL, "prompt": "hi"}, channels=channels)
    assert raised.value.field == "channels"
    assert await fake_queue.store.redis.dbsize() == 0 or not await fake_queue.list_jobs()


# -- end to end: two simulators as two channels ------------------------------------------------------------


def flexq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flexq", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def stats_json(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "flexq", "stats", "--json"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=30, check=True,
    )
    return dict(json.loads(done.stdout))


def channels_env(redis_url: str, a_url: str, b_url: str, **extra: str) -> dict[str, str]:
    channels = [
        {"name": "a", "kind": "relay", "base_url": a_url, "api_key_env": "KEY_A"},
        {"name": "b", "kind": "relay", "base_url": b_url, "api_key_env": "KEY_B", "price_factor": 2.0},
    ]
    return worker_env(redis_url, a_url, API_KEY, FLEXQ_CHANNELS=json.dumps(channels), KEY_A=API_KEY,
                      KEY_B=API_KEY, **extra)


@pytest.mark.e2e
@pytest.mark.redis
async def test_failover_from_an_open_channel_and_back_after_recovery(
    real_queue: FlexQueue, redis_url: str, tmp_path: Path
) -> None:
    a = await start_simulator(SimConfig(latency_s=0.01, rate_500=1.0))  # channel a: every call fails
    b = await start_simulator(SimConfig(latency_s=0.01))
    try:
        env = channels_env(redis_url, a.base_url, b.base_url, FLEXQ_BREAKER_MIN_FAILURES="5",
                           FLEXQ_BREAKER_COOL_DOWN_S="2", FLEXQ_DEADLINE_S="120")
        first = [f"f{i}" for i in range(12)]
        await real_queue.enqueue_many([JobSpec({"model": MODEL, "prompt": f"job {i}"}, job_id=i) for i in first])
        with running_worker(env, tmp_path / "w.log"):
            records = await wait_all(real_queue, first, timeout_s=60)
            assert all(r.status == Status.SUCCEEDED for r in records.values())
            # every job ended on b; the attempts that reached a failed there and opened its breaker
            assert {r.attempts[-1].channel for r in records.values()} == {"b"}
            on_a = [t for r in records.values() for t in r.attempts if t.channel == "a"]
            assert on_a and all(t.outcome == "server_error" for t in on_a)
            calls_on_b = b.sim.stats.requests
            assert calls_on_b >= len(first)
            a.sim.config = a.sim.config.updated({"rate_500": 0.0})  # channel a recovers

            async def back_on_a() -> list[Any] | None:
                job = await real_queue.enqueue({"model": MODEL, "prompt": "after recovery"})
                [done] = (await wait_all(real_queue, [job.id], timeout_s=30)).values()
                return [done] if done.attempts[-1].channel == "a" else None

            [recovered] = await poll(back_on_a, timeout_s=40, what="a job answered on channel a again")
            stats = stats_json(env)
        assert recovered.status == Status.SUCCEEDED and recovered.attempts[-1].outcome == "ok"
        # cost per channel: b charges twice the list price
        ok_on_b = next(r for r in records.values() if r.attempts[-1].channel == "b")
        usage = ok_on_b.attempts[-1].usage
        assert usage is not None
        flex_cost = cost_usd(MODEL, usage, Tier.FLEX)
        assert flex_cost is not None and ok_on_b.cost_usd == pytest.approx(2 * flex_cost)
        assert set(stats["cost"]["by_channel_usd"]) == {"a", "b"}
        assert stats["attempts"]["by_channel"]["a"]["server_error"] == len(on_a)
        assert stats["attempts"]["by_channel"]["b"]["ok"] >= len(first)
        scopes = {s["model"] for s in stats["flow_control"]["scopes"]}
        assert {f"{MODEL}@a", f"{MODEL}@b"} <= scopes  # each channel its own limit and breaker
        assert API_KEY not in (tmp_path / "w.log").read_text()
    finally:
        await a.close()
        await b.close()


@pytest.mark.e2e
@pytest.mark.redis
async def test_a_paused_channel_is_skipped_and_a_job_keeps_to_its_preference(
    real_queue: FlexQueue, redis_url: str, tmp_path: Path
) -> None:
    a = await start_simulator(SimConfig(latency_s=0.01))
    b = await start_simulator(SimConfig(latency_s=0.01))
    try:
        env = channels_env(redis_url, a.base_url, b.base_url)
        paused = flexq(env, "pause", MODEL, "--channel", "a", "--for", "10m")
        assert paused.returncode == 0, paused.stderr
        assert f"{MODEL}@a: paused" in paused.stdout
        await real_queue.enqueue({"model": MODEL, "prompt": "any"}, job_id="any")
        await real_queue.enqueue({"model": MODEL, "prompt": "only b"}, job_id="only-b", channels=["b"])
        await real_queue.enqueue({"model": "gemini-2.5-pro", "prompt": "pro on a"}, job_id="pro")
        await real_queue.enqueue({"model": MODEL, "prompt": "nowhere"}, job_id="nowhere", channels=["zz"])
        with running_worker(env, tmp_path / "w.log"):
            records = await wait_all(real_queue, ["any", "only-b", "pro", "nowhere"], timeout_s=30)
        assert records["any"].status == Status.SUCCEEDED and records["any"].attempts[-1].channel == "b"
        assert records["only-b"].attempts[-1].channel == "b"
        assert records["pro"].attempts[-1].channel == "a"  # the pause is the model's on channel a only
        assert a.sim.stats.requests == 1
        nowhere = records["nowhere"]
        assert nowhere.status == Status.FAILED and nowhere.error is not None
        assert nowhere.error.kind == "unknown_channel" and "zz" in nowhere.error.message
        assert not nowhere.attempts
    finally:
        await a.close()
        await b.close()


def test_a_worker_refuses_to_start_when_a_channels_key_variable_is_unset(tmp_path: Path) -> None:
    channels = [{"name": "studio", "api_key_env": "STUDIO_KEY_UNSET_HERE"}]
    env = worker_env("redis://127.0.0.1:1/0", "http://127.0.0.1:9", API_KEY, FLEXQ_CHANNELS=json.dumps(channels))
    env.pop("GEMINI_API_KEY")  # channels need no top-level key
    done = flexq(env, "worker")
    assert done.returncode == 1
    assert "channel 'studio': the environment variable STUDIO_KEY_UNSET_HERE is not set" in done.stderr
    env["STUDIO_KEY_UNSET_HERE"] = OTHER_KEY
    done = flexq(env, "worker")  # the key is there now: it gets as far as Redis (port 1: refused)
    assert done.returncode != 0 and "STUDIO_KEY_UNSET_HERE" not in done.stderr and OTHER_KEY not in done.stderr


@pytest.mark.parametrize(("cancel", "status", "kind"), [(False, Status.FAILED, "unknown_channel"),
                                                        (True, Status.CANCELLED, "cancelled")])
async def test_a_job_with_no_known_channel_fails_at_once_unless_a_cancel_came_first(
    fake_queue: FlexQueue, cancel: bool, status: Status, kind: str
) -> None:
    from producer import transitions
    from producer.models import utcnow
    from worker.runner import Runner

    await fake_queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="j", channels=["zz", "yy"])
    if cancel:
        await fake_queue.store.update(
            "j", lambda r: transitions.Change(transitions.request_cancel(r, now=utcnow()))
        )
    runner = Runner(store=fake_queue.store, gemini=None, settings=make_settings(), worker_name="w")  # type: ignore[arg-type]
    assert await runner.run("j") is None
    record = await fake_queue.get("j")
    assert record.status == status and record.error is not None and record.error.kind == kind
    assert not record.attempts
    if not cancel:
        assert "zz, yy" in record.error.message and "default" in record.error.message
