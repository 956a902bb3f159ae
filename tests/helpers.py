"""Test helpers: run real worker processes and poll with deadlines (never a bare sleep)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from producer.models import JobRecord
from producer.queue import FlexQueue

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def worker_env(redis_url: str, sim_url: str, api_key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_"))}
    env.update(
        REDIS_URL=redis_url,
        GEMINI_API_KEY=api_key,
        GEMINI_BASE_URL=sim_url,
        FLEXQ_QUEUE="flexq-test",
        FLEXQ_RETRY_BASE_S="0.2",
        FLEXQ_RETRY_MAX_S="1",
        FLEXQ_LOG_FORMAT="json",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class WorkerProc:
    """A ``flexq worker`` subprocess whose output goes to a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexq", "worker", *args],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_worker(env: dict[str, str], log_path: Path, *args: str) -> Iterator[WorkerProc]:
    worker = WorkerProc(env, log_path, *args)
    try:
        yield worker
    finally:
        worker.stop()


async def poll(check: Callable[[], Awaitable[T | None]], *, timeout_s: float, what: str) -> T:
    """Call ``check`` until it returns something not None; fail after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    delay_s = 0.02
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(delay_s)
        delay_s = min(0.25, delay_s * 2)


async def wait_all(queue: FlexQueue, ids: list[str], timeout_s: float = 60) -> dict[str, JobRecord]:
    async def check() -> dict[str, JobRecord] | None:
        records = {job_id: await queue.get(job_id) for job_id in ids}
        return records if all(r.terminal for r in records.values()) else None

    return await poll(check, timeout_s=timeout_s, what=f"jobs {ids} to end")


async def wait_status(queue: FlexQueue, job_id: str, status: str, timeout_s: float = 30) -> JobRecord:
    async def check() -> JobRecord | None:
        record = await queue.get(job_id)
        return record if record.status == status else None

    return await poll(check, timeout_s=timeout_s, what=f"job {job_id} to be {status}")
