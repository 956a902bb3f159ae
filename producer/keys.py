"""flexq's own Redis keys, named in one place: all under ``{queue}:``.

arq's keys (its job envelope, in-progress lease, queue) are ``producer.arq_wire``'s to name.
"""

from __future__ import annotations

from dataclasses import dataclass

from producer import arq_wire
from producer.status import Status


@dataclass(frozen=True)
class Keys:
    queue: str

    @property
    def arq_queue(self) -> str:
        """This queue's arq queue (``producer.arq_wire`` names it)."""
        return arq_wire.queue_key(self.queue)

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

    @property
    def events(self) -> str:
        """Stream of job events (enqueued, every status change with the attempt that closed), capped."""
        return f"{self.queue}:events"

    def cache(self, request_sha256: str) -> str:
        """A cached answer (``JobResult`` JSON) to the request with this canonical hash (``producer.cache``)."""
        return f"{self.queue}:cache:{request_sha256}"

    def children(self, job_id: str) -> str:
        """Set of the ids of jobs that continue ``job_id`` (threads)."""
        return f"{self.queue}:children:{job_id}"

    def flow(self, name: str) -> str:
        """Flow-control state shared by all workers (permits, pauses, breakers)."""
        return f"{self.queue}:flow:{name}"
