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

    def batch_pending(self, model: str) -> str:
        """Sorted set of the ids of ``batch``-tier jobs of ``model`` waiting to be packed into a Batch API job,
        scored by when they started waiting (epoch s) (worker.batch_tier)."""
        return f"{self.queue}:batch:pending:{model}"

    def batch(self, name: str) -> str:
        """Hash of one Batch API job flexq created (``batches/...``): its model, members, creation time."""
        return f"{self.queue}:batch:job:{name}"

    def batch_member(self, job_id: str) -> str:
        """The Batch API job a job was packed into (JSON: name, enqueues), written with the batch's hash so
        that a crash before the job's record says so never packs it twice."""
        return f"{self.queue}:batch:member:{job_id}"

    def batch_lock(self, what: str) -> str:
        """A short lock: ``pack:{model}`` (one packer per model) or ``poll:{name}`` (one poll per interval)."""
        return f"{self.queue}:batch:lock:{what}"
