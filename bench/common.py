"""Shared pieces of the benchmarks: a Redis to run on, results, percentiles, environment facts."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as sync_redis

from producer.stats import percentile

#: Database used on a shared Redis (never the tests' 15); flushed at start and end.
BENCH_DB = 12
SHARED_REDIS = f"redis://127.0.0.1:6379/{BENCH_DB}"
MODEL = "gemini-2.5-flash"


@dataclass
class BenchResult:
    """What one benchmark found: figures, the target, whether it was met, and notes."""

    name: str
    figures: dict[str, Any]
    target: str
    met: bool | None
    verdict: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "figures": self.figures, "target": self.target, "met": self.met,
            "verdict": self.verdict, "notes": self.notes,
        }


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Count, nearest-rank p50/p90/p99 (the same percentile ``flexq stats`` reports) and max; NaN for none."""

    def rounded(value: float | None) -> float:
        return math.nan if value is None else round(value, 2)

    return {
        "n": len(values),
        "p50": rounded(percentile(values, 50)),
        "p90": rounded(percentile(values, 90)),
        "p99": rounded(percentile(values, 99)),
        "max": rounded(max(values) if values else None),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str) -> bool:
    try:
        client = sync_redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()
        client.close()
        return True
    except (sync_redis.RedisError, OSError):
        return False


def flush(url: str) -> None:
    client = sync_redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def redis_version(url: str) -> str:
    client = sync_redis.Redis.from_url(url)
    try:
        info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
        return str(info.get("redis_version", "?"))
    finally:
        client.close()


@contextlib.contextmanager
def bench_redis(url: str | None = None) -> Iterator[str]:
    """A Redis database for the benchmarks, flushed at start and end.

    ``url`` given: use it. Else a private ``redis-server`` (no persistence) in a temp dir, or,
    when none is installed, database 12 of the Redis on 127.0.0.1:6379.
    """
    if url is not None:
        if not redis_answers(url):
            raise RuntimeError(f"no Redis answers at {url}")
        flush(url)
        try:
            yield url
        finally:
            flush(url)
        return
    if shutil.which("redis-server") is None:
        with bench_redis(SHARED_REDIS) as shared:
            yield shared
        return
    with private_redis() as own:
        yield own


@contextlib.contextmanager
def private_redis(prefix: str = "flexq-redis-") -> Iterator[str]:
    """A private ``redis-server`` (no persistence) on a free port in a temp dir; killed on exit.

    The one starter the tests (kills, restarts) and the benchmarks share."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        port = free_port()
        proc = subprocess.Popen(  # noqa: S603 - fixed arguments
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        own = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while not redis_answers(own):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("private redis-server did not start within 10 s")
                time.sleep(0.05)  # polling for the server, with the deadline above
            yield own
        finally:
            proc.kill()
            proc.wait(5)


class RedisServer:
    """A private ``redis-server`` with AOF (``appendfsync always``) in ``directory``, on a fixed port,
    that a test kills (SIGKILL) and starts again: the data comes back from the AOF."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(  # noqa: S603 - fixed arguments
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not redis_answers(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port} within {timeout_s:g} s")
            time.sleep(0.05)  # polling for the server, with the deadline above

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one (5,000 sockets need it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_status_kb(pid: int | str, field_name: str) -> int | None:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in kB; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def quiet_logging(stream: Any = None) -> None:
    """Configure flexq's logging as a worker does (JSON, INFO) but write it to /dev/null.

    The formatting cost of every log line stays in the measurement; the terminal stays readable.
    """
    from worker import logs

    sink = stream or open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    logs.configure("json", level=logging.INFO, stream=sink)


def environment(redis_url: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if redis_url is not None:
        with contextlib.suppress(Exception):
            info["redis"] = redis_version(redis_url)
    return info
