"""A new user's frictions (issue 11): errors that say what is wrong and where, warnings for a likely typo.

``flexq batch``'s refusal without a key, its progress line and its unpriced-model warning are tested in
``test_batch.py``/``test_batch_job.py``; the 80-column attempts table in ``test_render.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis as sync_redis
from redis.exceptions import AuthenticationError, ResponseError

from flexq import exits
from producer import transitions
from producer.errors import JobNotFoundError, StoreUnavailableError, explain_unavailable, redis_failure
from producer.models import JobResult, Usage, utcnow
from producer.queue import FlexQueue
from tests.helpers import ROOT

PASSWORD = "pw-NEVER-PRINT-71c2"  # noqa: S105 - a fake password the tests look for in output
QUEUE = "frictions"


def cli_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_", "REDIS_"))}
    env.update(REDIS_URL=redis_url, FLEXQ_QUEUE=QUEUE, **extra)
    return env


def flexq(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flexq", *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


async def flexq_async(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flexq", *argv, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def with_database(url: str, database: int) -> str:
    return f"{url.rpartition('/')[0]}/{database}"


# -- Redis errors ----------------------------------------------------------------------------------


def hidden(cause: Exception, url: str) -> StoreUnavailableError:
    """The error ``connect_redis`` raises: the message names only the cause's type, ``from None``."""
    try:
        raise cause
    except type(cause):
        try:
            raise StoreUnavailableError(f"cannot reach Redis at {url}: {type(cause).__name__}") from None
        except StoreUnavailableError as err:
            return err
    raise AssertionError("unreachable")


def test_a_database_out_of_range_is_not_an_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    err = hidden(ResponseError("DB index is out of range"), "redis://***@cache:6379/99")

    def body() -> int:
        raise err

    assert exits.run(body) == exits.EXIT_ERROR
    line = capsys.readouterr().err
    assert line == (
        "flexq: Redis at redis://***@cache:6379/99 has no database 99: it answered 'ERR DB index is out of range' "
        "(a server has 16 databases, /0 to /15, unless its `databases` setting says otherwise)\n"
    )


@pytest.mark.parametrize(
    ("cause", "line"),
    [
        pytest.param(ConnectionRefusedError(111, "Connect call failed"),
                     "cannot reach Redis at redis://h:1/0: ConnectionRefusedError: [Errno 111] Connect call failed",
                     id="refused"),
        pytest.param(AuthenticationError("invalid username-password pair or user is disabled."),
                     "Redis at redis://h:1/0 refused the connection's credentials: AuthenticationError: invalid "
                     "username-password pair or user is disabled.", id="auth"),
        pytest.param(ResponseError(f"odd answer about redis://user:{PASSWORD}@h:1/0"),
                     "cannot reach Redis at redis://h:1/0: ResponseError: odd answer about redis://***@h:1/0",
                     id="credentials-in-the-answer-masked"),
    ],
)
def test_redis_failures_say_what_redis_answered(cause: Exception, line: str) -> None:
    assert redis_failure("redis://h:1/0", cause) == line
    assert explain_unavailable(hidden(cause, "redis://h:1/0")) == line


def test_an_unavailable_error_of_another_kind_is_left_as_it_is() -> None:
    err = StoreUnavailableError("could not enqueue: ConnectionError: gone")
    assert explain_unavailable(err) == "could not enqueue: ConnectionError: gone"


def test_job_not_found_says_where_it_looked() -> None:
    assert str(JobNotFoundError("x")) == "no job with id 'x'"
    assert str(JobNotFoundError("x", where="queue 'q' on redis://h:6379/2")) == (
        "no job with id 'x' in queue 'q' on redis://h:6379/2"
    )


@pytest.mark.redis
def test_cli_no_job_names_the_queue_and_the_redis(redis_url: str) -> None:
    done = flexq(cli_env(redis_url), "status", "nosuch")
    assert done.returncode == 1
    assert done.stderr == f"flexq: no job with id 'nosuch' in queue '{QUEUE}' on {redis_url}\n"


@pytest.mark.redis
def test_cli_database_out_of_range_on_a_real_redis(redis_url: str) -> None:
    url = with_database(redis_url, 99)
    done = flexq(cli_env(url), "list")
    assert done.returncode == 1
    assert done.stderr.startswith(f"flexq: Redis at {url} has no database 99: it answered 'ERR DB index is out of ")
    assert "cannot reach" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_cli_database_out_of_range_behind_a_password(own_redis: str) -> None:
    client = sync_redis.Redis.from_url(own_redis)
    client.config_set("requirepass", PASSWORD)
    client.close()
    host = own_redis.removeprefix("redis://").partition("/")[0]
    done = flexq(cli_env(f"redis://:{PASSWORD}@{host}/99"), "stats")
    assert done.returncode == 1
    assert done.stderr.startswith(f"flexq: Redis at redis://***@{host}/99 has no database 99: ")
    assert PASSWORD not in done.stderr


# -- models with no known price ----------------------------------------------------------------------


@pytest.mark.redis
def test_enqueue_warns_once_per_model_with_no_known_price(redis_url: str, tmp_path: Path) -> None:
    env = cli_env(redis_url)
    done = flexq(env, "enqueue", "--model", "gemini-2.5-flsh", "--prompt", "hi", "--id", "typo-1")
    assert done.returncode == 0, done.stderr  # accepted: new models appear all the time
    assert done.stdout == "typo-1\n"
    assert done.stderr == (
        "flexq: warning: model 'gemini-2.5-flsh' is not in flexq's price table, so its cost will show as unknown; "
        "did you mean 'gemini-2.5-flash'?\n"
    )
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"model": model, "prompt": f"p{n}"}) + "\n" for n, model in enumerate(
        ["gemini-2.5-pro-lates", "gemini-2.5-flash", "gemini-2.5-pro-lates", "models/gemini-2.5-pro"])))
    done = flexq(env, "enqueue", "--file", str(source))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "flexq: warning: model 'gemini-2.5-pro-lates' is not in flexq's price table, so its cost will show as "
        "unknown; did you mean 'gemini-2.5-pro'?"
    ]
    assert "gemini-2.5-flash" not in done.stderr and len(done.stdout.splitlines()) == 4


@pytest.mark.redis
async def test_stats_names_the_models_with_no_known_price(redis_url: str) -> None:
    from producer.transitions import Change, Cost
    from tests.conftest import make_settings

    queue = await FlexQueue.connect(make_settings(redis_url=redis_url, queue=QUEUE))
    try:
        for job_id, model in (("a", "gemini-2.5-flsh"), ("b", "gemini-2.5-flsh"), ("c", "gemini-2.5-flash")):
            await queue.enqueue({"model": model, "prompt": job_id}, job_id=job_id)
            priced = model == "gemini-2.5-flash"
            result = JobResult(text="ok", finish_reason="STOP", usage=Usage(), model_version=model, tier="flex")
            await queue.store.update(job_id, lambda r, priced=priced, result=result: Change(
                transitions.succeed(r, result=result, now=utcnow(), cost_usd=0.0 if priced else None,
                                    standard_cost_usd=0.0 if priced else None),
                drop_arq_job=True, cost=Cost("flex", 0.0 if priced else None, 0.0 if priced else None),
            ))
    finally:
        await queue.close()
    env = cli_env(redis_url, COLUMNS="200")
    code, out, err = await flexq_async(env, "stats", "--json")
    assert code == 0, err
    cost = json.loads(out)["cost"]
    assert cost["jobs_with_unknown_cost"] == 2 and cost["unknown_price_models"] == {"gemini-2.5-flsh": 2}
    code, out, err = await flexq_async(env, "stats")
    assert code == 0, err
    assert "; 2 job(s) on models with no known price: gemini-2.5-flsh\n" in out
