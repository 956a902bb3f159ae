"""Every Redis key flexq writes, named in one place.

flexq's own keys live under ``{queue}:``; arq's keys (``arq:job:``, ``arq:in-progress:``…) are
arq's fixed global prefixes, so two flexq queues in one Redis database must not share job ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from producer.models import Status

ARQ_JOB_PREFIX = "arq:job:"
ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
ARQ_RESULT_PREFIX = "arq:result:"
ARQ_RETRY_PREFIX = "arq:retry:"
ARQ_ABORT_SET = "arq:abort"
#: The one arq function every flexq job runs.
ARQ_FUNCTION = "run_generation"


@dataclass(frozen=True)
class Keys:
    queue: str

    @property
    def arq_queue(self) -> str:
        """The arq queue (a sorted set of job ids scored by run time in ms)."""
        return f"{self.queue}:arq"

    def record(self, job_id: str) -> str:
        return f"{self.queue}:job:{job_id}"

    def index(self, status: Status | str) -> str:
        """Sorted set of job ids in one status, scored by the time they entered it (epoch s)."""
        return f"{self.queue}:idx:{status}"

    @property
    def stats(self) -> str:
        """Hash of counters: attempts by outcome, tokens and cost by tier."""
        return f"{self.queue}:stats"

    @property
    def latencies(self) -> str:
        """Capped list of recent successful-attempt latencies (ms), for p50/p95."""
        return f"{self.queue}:latency_ms"

    @property
    def workers(self) -> str:
        """Sorted set of live worker names scored by last heartbeat (epoch s)."""
        return f"{self.queue}:workers"

    def flow(self, name: str) -> str:
        """Flow-control state shared by all workers (permits, pauses, breakers)."""
        return f"{self.queue}:flow:{name}"

    @staticmethod
    def arq_job(job_id: str) -> str:
        return ARQ_JOB_PREFIX + job_id

    @staticmethod
    def arq_in_progress(job_id: str) -> str:
        return ARQ_IN_PROGRESS_PREFIX + job_id

    @staticmethod
    def arq_result(job_id: str) -> str:
        return ARQ_RESULT_PREFIX + job_id

    @staticmethod
    def arq_retry(job_id: str) -> str:
        return ARQ_RETRY_PREFIX + job_id
