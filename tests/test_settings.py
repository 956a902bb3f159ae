"""producer.settings and worker.config: environment parsing, validation, and secrets that never show."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from producer.settings import DEFAULT_REDIS_URL, ProducerSettings, redact_url, settings_error
from worker.config import WorkerConfig

API_KEY = "AIzaSy-test-key-NEVER-PRINT-9d8c7b"
REDIS_PASSWORD = "redis-pw-NEVER-PRINT-4e5f"  # noqa: S105 - a fake password the tests look for in output

ENV_VARS = [
    "REDIS_URL", "GEMINI_API_KEY", "GOOGLE_API_KEY", "GEMINI_BASE_URL", "FLEXQ_API_VERSION", "FLEXQ_QUEUE",
    "FLEXQ_MAX_REQUEST_BYTES", "FLEXQ_RETENTION_S", "FLEXQ_DEADLINE_S", "FLEXQ_REQUEST_TIMEOUT_S",
    "FLEXQ_RETRY_BASE_S", "FLEXQ_RETRY_MAX_S", "FLEXQ_MAX_FLEX_ATTEMPTS", "FLEXQ_LEASE_S", "FLEXQ_CONCURRENCY",
    "FLEXQ_MAX_INTERRUPTS", "FLEXQ_LOG_FORMAT",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_defaults() -> None:
    settings = WorkerConfig()
    assert settings.redis_url.get_secret_value() == DEFAULT_REDIS_URL
    assert settings.gemini_api_key is None
    assert settings.gemini_base_url is None
    assert (settings.api_version, settings.queue) == ("v1beta", "flexq")
    assert settings.max_request_bytes == 8 * 1024 * 1024
    assert settings.retention_s == 7 * 24 * 3600
    assert settings.deadline_s == 24 * 3600.0
    assert (settings.request_timeout_s, settings.job_timeout_s) == (900.0, 960.0)
    assert (settings.retry_base_s, settings.retry_max_s, settings.max_flex_attempts) == (5.0, 600.0, None)
    assert (settings.lease_s, settings.concurrency, settings.max_interrupts) == (60.0, 100, 5)
    assert settings.log_format == "auto"


@pytest.mark.parametrize(
    ("env", "attr", "expected"),
    [
        pytest.param({"REDIS_URL": "redis://cache:6380/2"}, "redis_url", "redis://cache:6380/2", id="redis-url"),
        pytest.param({"REDIS_URL": "rediss://cache:6380/2"}, "redis_url", "rediss://cache:6380/2", id="rediss"),
        pytest.param({"REDIS_URL": "unix:///run/redis.sock"}, "redis_url", "unix:///run/redis.sock", id="unix"),
        pytest.param({"GEMINI_API_KEY": API_KEY}, "gemini_api_key", API_KEY, id="gemini-key"),
        pytest.param({"GOOGLE_API_KEY": API_KEY}, "gemini_api_key", API_KEY, id="google-key-fallback"),
        pytest.param({"GEMINI_API_KEY": API_KEY, "GOOGLE_API_KEY": "other"}, "gemini_api_key", API_KEY,
                     id="gemini-key-wins"),
        pytest.param({"GEMINI_BASE_URL": "http://127.0.0.1:8080"}, "gemini_base_url", "http://127.0.0.1:8080",
                     id="base-url"),
        pytest.param({"FLEXQ_API_VERSION": "v1"}, "api_version", "v1", id="api-version"),
        pytest.param({"FLEXQ_QUEUE": "images.v2-a_b"}, "queue", "images.v2-a_b", id="queue"),
        pytest.param({"FLEXQ_MAX_REQUEST_BYTES": "1024"}, "max_request_bytes", 1024, id="max-request-bytes"),
        pytest.param({"FLEXQ_RETENTION_S": "86400"}, "retention_s", 86400, id="retention"),
        pytest.param({"FLEXQ_DEADLINE_S": "90.5"}, "deadline_s", 90.5, id="deadline"),
        pytest.param({"FLEXQ_REQUEST_TIMEOUT_S": "30"}, "request_timeout_s", 30.0, id="request-timeout"),
        pytest.param({"FLEXQ_REQUEST_TIMEOUT_S": "30"}, "job_timeout_s", 90.0, id="job-timeout-follows"),
        pytest.param({"FLEXQ_RETRY_BASE_S": "0"}, "retry_base_s", 0.0, id="retry-base-zero"),
        pytest.param({"FLEXQ_RETRY_MAX_S": "120"}, "retry_max_s", 120.0, id="retry-max"),
        pytest.param({"FLEXQ_MAX_FLEX_ATTEMPTS": "3"}, "max_flex_attempts", 3, id="max-flex-attempts"),
        pytest.param({"FLEXQ_LEASE_S": "15"}, "lease_s", 15.0, id="lease"),
        pytest.param({"FLEXQ_CONCURRENCY": "500"}, "concurrency", 500, id="concurrency"),
        pytest.param({"FLEXQ_MAX_INTERRUPTS": "2"}, "max_interrupts", 2, id="max-interrupts"),
        pytest.param({"FLEXQ_LOG_FORMAT": "json"}, "log_format", "json", id="log-format"),
        pytest.param({"flexq_concurrency": "7"}, "concurrency", 7, id="env-names-case-insensitive"),
    ],
)
def test_env(clean_env: pytest.MonkeyPatch, env: dict[str, str], attr: str, expected: Any) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    value = getattr(WorkerConfig(), attr)
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    assert value == expected


def test_explicit_argument_beats_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLEXQ_QUEUE", "from-env")
    clean_env.setenv("FLEXQ_CONCURRENCY", "9")
    settings = WorkerConfig(queue="from-arg")  # type: ignore[call-arg]
    assert (settings.queue, settings.concurrency) == ("from-arg", 9)


@pytest.mark.parametrize(
    ("env", "field"),
    [
        pytest.param({"FLEXQ_QUEUE": "has space"}, "FLEXQ_QUEUE", id="queue-space"),
        pytest.param({"FLEXQ_QUEUE": "a:b"}, "FLEXQ_QUEUE", id="queue-colon"),
        pytest.param({"FLEXQ_QUEUE": "q" * 65}, "FLEXQ_QUEUE", id="queue-too-long"),
        pytest.param({"FLEXQ_CONCURRENCY": "0"}, "FLEXQ_CONCURRENCY", id="concurrency-zero"),
        pytest.param({"FLEXQ_CONCURRENCY": "lots"}, "FLEXQ_CONCURRENCY", id="concurrency-garbage"),
        pytest.param({"FLEXQ_CONCURRENCY": "1.5"}, "FLEXQ_CONCURRENCY", id="concurrency-fraction"),
        pytest.param({"FLEXQ_MAX_REQUEST_BYTES": "0"}, "FLEXQ_MAX_REQUEST_BYTES", id="max-bytes-zero"),
        pytest.param({"FLEXQ_RETENTION_S": "-1"}, "FLEXQ_RETENTION_S", id="retention-negative"),
        pytest.param({"FLEXQ_DEADLINE_S": "0"}, "FLEXQ_DEADLINE_S", id="deadline-zero"),
        pytest.param({"FLEXQ_DEADLINE_S": "nan"}, "FLEXQ_DEADLINE_S", id="deadline-nan"),
        pytest.param({"FLEXQ_RETRY_BASE_S": "-1"}, "FLEXQ_RETRY_BASE_S", id="retry-base-negative"),
        pytest.param({"FLEXQ_MAX_FLEX_ATTEMPTS": "0"}, "FLEXQ_MAX_FLEX_ATTEMPTS", id="max-flex-zero"),
        pytest.param({"FLEXQ_LEASE_S": "0.5"}, "FLEXQ_LEASE_S", id="lease-below-one"),
        pytest.param({"FLEXQ_MAX_INTERRUPTS": "0"}, "FLEXQ_MAX_INTERRUPTS", id="max-interrupts-zero"),
        pytest.param({"FLEXQ_LOG_FORMAT": "xml"}, "FLEXQ_LOG_FORMAT", id="log-format"),
    ],
)
def test_bad_env_rejected(clean_env: pytest.MonkeyPatch, env: dict[str, str], field: str) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        WorkerConfig()
    assert info.value.error_count() == 1
    assert settings_error(info.value, WorkerConfig).startswith(f"bad configuration: {field}: ")  # names the variable


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://cache:6379/0", id="http"),
        pytest.param("https://cache:6379/0", id="https"),
        pytest.param("cache:6379", id="no-scheme-host-port"),
        pytest.param("localhost", id="bare-host"),
        pytest.param("memcached://cache:11211", id="memcached"),
    ],
)
def test_bad_redis_url_scheme_rejected(clean_env: pytest.MonkeyPatch, url: str) -> None:
    clean_env.setenv("REDIS_URL", url)
    with pytest.raises(ValidationError, match="REDIS_URL must start with redis://, rediss:// or unix://"):
        WorkerConfig()


def test_bad_redis_url_error_does_not_show_the_password(clean_env: pytest.MonkeyPatch) -> None:
    password = "hunter2"  # noqa: S105 - short on purpose: pydantic elides the middle of long inputs
    clean_env.setenv("REDIS_URL", f"http://default:{password}@cache:6379/0")
    with pytest.raises(ValidationError) as info:
        WorkerConfig()
    assert password not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("redis://localhost:6379/0", "redis://localhost:6379/0", id="no-credentials"),
        pytest.param("unix:///run/redis.sock", "unix:///run/redis.sock", id="unix-no-credentials"),
        pytest.param(f"redis://:{REDIS_PASSWORD}@cache:6379/0", "redis://***@cache:6379/0", id="password-only"),
        pytest.param(f"redis://default:{REDIS_PASSWORD}@cache/3", "redis://***@cache/3", id="user-and-password"),
        pytest.param("redis://admin@cache:6379", "redis://***@cache:6379", id="user-only"),
        pytest.param(f"rediss://u:{REDIS_PASSWORD}@cache:6380/1?ssl_cert_reqs=none#x",
                     "rediss://***@cache:6380/1?ssl_cert_reqs=none#x", id="rediss-query-fragment"),
        pytest.param("redis://:p@ss@cache:6379/0", "redis://***@cache:6379/0", id="at-sign-in-password"),
        pytest.param(
            f"unix:///run/redis.sock?db=0&password={REDIS_PASSWORD}", "unix:///run/redis.sock?db=0&password=***",
            id="unix-password-in-query",
        ),
        pytest.param(
            f"redis://cache:6379/0?password={REDIS_PASSWORD}", "redis://cache:6379/0?password=***",
            id="redis-password-in-query",
        ),
        pytest.param(
            f"redis://:{REDIS_PASSWORD}@[::1]:6379/0", "redis://***@[::1]:6379/0", id="ipv6-host",
        ),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert REDIS_PASSWORD not in redact_url(url)


def test_redis_url_redacted(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REDIS_URL", f"redis://default:{REDIS_PASSWORD}@cache:6379/0")
    settings = WorkerConfig()
    assert settings.redis_url_redacted == "redis://***@cache:6379/0"
    assert settings.redis_url.get_secret_value() == f"redis://default:{REDIS_PASSWORD}@cache:6379/0"


def test_secrets_never_show(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REDIS_URL", f"redis://default:{REDIS_PASSWORD}@cache:6379/0")
    clean_env.setenv("GEMINI_API_KEY", API_KEY)
    settings = WorkerConfig()
    assert settings.gemini_api_key is not None
    assert settings.gemini_api_key.get_secret_value() == API_KEY
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump())):
        assert API_KEY not in text
        assert REDIS_PASSWORD not in text


def test_empty_env_values_mean_unset(clean_env: pytest.MonkeyPatch) -> None:
    """docker compose passes `${VAR:-}` as an empty string: that must mean the default, not an error."""
    clean_env.setenv("FLEXQ_QUEUE", "")
    clean_env.setenv("REDIS_URL", "")
    clean_env.setenv("FLEXQ_MAX_FLEX_ATTEMPTS", "")
    settings = WorkerConfig()
    assert settings.queue == "flexq"
    assert settings.redis_url.get_secret_value() == "redis://localhost:6379/0"
    assert settings.max_flex_attempts is None


def test_a_producer_sees_only_what_it_needs() -> None:
    """A web app's settings: where Redis is, the queue, the limits of a request; no worker knobs."""
    fields = {
        "redis_url", "queue", "max_request_bytes", "retention_s", "deadline_s",
        "blob_store", "max_blob_bytes", "max_job_blob_bytes",  # a producer stores inline data at enqueue
        "events_maxlen",  # its writes append job events
        "cache",  # its jobs opt in to the response cache
        "redact",  # it redacts requests before they are stored (producer.redact)
        "batch_after_s",  # it picks the batch tier for far deadlines at enqueue
    }
    assert set(ProducerSettings.model_fields) == fields
    assert set(ProducerSettings.model_fields) < set(WorkerConfig.model_fields)
    assert not any(name.startswith(("flow", "breaker", "gemini")) for name in ProducerSettings.model_fields)


def test_env_names_are_the_prefix_and_the_field(clean_env: pytest.MonkeyPatch) -> None:
    from producer.settings import env_name

    assert env_name(WorkerConfig, "concurrency") == "FLEXQ_CONCURRENCY"
    assert env_name(WorkerConfig, "deadline_s") == "FLEXQ_DEADLINE_S"
    assert env_name(WorkerConfig, "redis_url") == "REDIS_URL"
    assert env_name(WorkerConfig, "gemini_api_key") == "GEMINI_API_KEY"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        pytest.param("redis://cache:6379/abc", False, id="named-database"),
        pytest.param("redis://cache:6379/3", True, id="numbered-database"),
        pytest.param("redis://cache:6379", True, id="no-database"),
        pytest.param("unix:///run/redis.sock?db=2", True, id="unix-socket"),
    ],
)
def test_redis_url_database_must_be_a_number(clean_env: pytest.MonkeyPatch, url: str, ok: bool) -> None:
    clean_env.setenv("REDIS_URL", url)
    if ok:
        assert WorkerConfig().redis_url.get_secret_value() == url
    else:
        with pytest.raises(ValidationError, match="the database must be a number such as /0"):
            WorkerConfig()


@pytest.mark.parametrize(
    ("url", "searched"),
    [
        pytest.param(f"redis://:{REDIS_PASSWORD}@cache:6379/3", "queue 'jobs' on redis://***@cache:6379/3",
                     id="numbered-database"),
        pytest.param("redis://cache:6379", "queue 'jobs' on redis://cache:6379 (database 0)", id="implicit-0"),
        pytest.param("unix:///run/redis.sock?db=2", "queue 'jobs' on unix:///run/redis.sock?db=2 (database 2)",
                     id="unix-socket-db-query"),
    ],
)
def test_where_a_producer_looks_for_jobs(clean_env: pytest.MonkeyPatch, url: str, searched: str) -> None:
    """What "no job with id X" adds: the queue, the Redis (password redacted) and the database."""
    clean_env.setenv("REDIS_URL", url)
    clean_env.setenv("FLEXQ_QUEUE", "jobs")
    assert ProducerSettings().searched == searched
    assert REDIS_PASSWORD not in ProducerSettings().searched
