"""A worker's own Prometheus metrics: what this process did, served at ``/metrics`` when
``FLEXQ_METRICS_PORT`` is set (``worker.runtime`` starts and stops the server).

Process-local, in their own ``CollectorRegistry`` (tests make several): the attempts this process
closed, by model, tier and outcome, with a latency histogram; the Gemini calls it has open; tokens and
cost of its answers; the process collector (CPU, memory, open files). The runner records an attempt
where it logs one (:meth:`WorkerMetrics.attempt`) and counts a call in flight around the Gemini call
(:func:`calling`). Names and labels: :data:`METRICS` (and docs/operations.md).

The fleet's view (jobs by status, arq's queue, the shared flow control) is not here: it is read from
Redis by ``flexq metrics``, one exporter per queue. A worker serving it would read Redis on its own
event loop at every scrape, and N workers would export N copies of the same series.

The HTTP server answers in a thread of its own; recording takes a lock for microseconds, so a
scrape never holds up the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from producer.errors import ConfigError
from producer.status import Status
from worker.config import flow_model

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from producer.models import JobRecord

#: Latency buckets in seconds, for LLM calls: a 503 answers in a tenth of a second, a long flex
#: generation in minutes, and a call is cut at FLEXQ_REQUEST_TIMEOUT_S (15 min).
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)
#: Token kinds, as ``flexq_tokens_total`` counts them.
TOKEN_KINDS = ("prompt", "output", "thoughts")

#: Every family of a worker's registry besides the process collector's: (name, type, labels, help).
#: A counter's name is given without ``_total``, as prometheus_client takes it; it is written with it.
METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("flexq_worker_attempts", "counter", ("model", "tier", "outcome"), "attempts this worker closed"),
    ("flexq_worker_attempt_latency_seconds", "histogram", ("model", "tier", "outcome"),
     "latency of the attempts this worker closed, from start to end"),
    ("flexq_worker_calls_in_flight", "gauge", ("model", "tier"), "Gemini calls this worker has open"),
    ("flexq_worker_tokens", "counter", ("model", "tier", "kind"),
     "tokens of the answers this worker got: prompt, output, thoughts"),
    ("flexq_worker_cost_usd", "counter", ("model", "tier"),
     "what the jobs this worker succeeded cost, in US dollars (models with a known price)"),
    ("flexq_worker_info", "gauge", ("queue", "worker"), "1, with this worker's queue and name (host:pid:random)"),
)


class WorkerMetrics:
    """One worker process's metrics, in a registry of their own (``registry``)."""

    def __init__(self, *, queue: str = "", worker: str = "", process: bool = True) -> None:
        self.registry = CollectorRegistry()
        labels = {name: list(names) for name, _, names, _ in METRICS}
        docs = {name: doc for name, _, _, doc in METRICS}

        def counter(name: str) -> Counter:
            return Counter(name, docs[name], labels[name], registry=self.registry)

        def gauge(name: str) -> Gauge:
            return Gauge(name, docs[name], labels[name], registry=self.registry)

        self.attempts = counter("flexq_worker_attempts")
        self.latency = Histogram(
            "flexq_worker_attempt_latency_seconds", docs["flexq_worker_attempt_latency_seconds"],
            labels["flexq_worker_attempt_latency_seconds"], registry=self.registry, buckets=LATENCY_BUCKETS_S,
        )
        self.in_flight = gauge("flexq_worker_calls_in_flight")
        self.tokens = counter("flexq_worker_tokens")
        self.cost = counter("flexq_worker_cost_usd")
        gauge("flexq_worker_info").labels(queue, worker).set(1)
        if process:
            ProcessCollector(registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- recording (on the event loop) -------------------------------------------------------------

    def attempt(self, record: JobRecord, number: int) -> None:
        """Count attempt ``number`` of ``record`` as closed (its outcome, latency, tokens; the job's cost
        if this attempt succeeded it). Call once per attempt, after it is recorded."""
        attempt = record.attempts[number - 1]
        if attempt.outcome is None or record.request is None:
            return
        model, tier = flow_model(record.request.model), str(attempt.tier)
        self.attempts.labels(model, tier, str(attempt.outcome)).inc()
        if attempt.latency_ms is not None:
            self.latency.labels(model, tier, str(attempt.outcome)).observe(attempt.latency_ms / 1000)
        if attempt.usage is not None:
            usage = attempt.usage
            for kind, n in zip(TOKEN_KINDS, (usage.prompt_tokens, usage.output_tokens, usage.thoughts_tokens),
                               strict=True):
                self.tokens.labels(model, tier, kind).inc(n)
        if record.status == Status.SUCCEEDED and record.cost_usd is not None:
            self.cost.labels(model, tier).inc(record.cost_usd)

    @contextmanager
    def call(self, model: str, tier: str) -> Iterator[None]:
        """A Gemini call in flight for as long as the block runs (however it ends)."""
        gauge = self.in_flight.labels(flow_model(model), str(tier))
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    # -- serving (a thread) ------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> str:
        """Serve ``/metrics`` on ``host``:``port`` from a daemon thread; the URL. A port that cannot be
        bound is a ``ConfigError`` naming the setting."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise ConfigError(
                f"FLEXQ_METRICS_PORT={port}: cannot listen on {host}:{port}: {err.strerror or err} "
                "(each worker process needs a port of its own; FLEXQ_METRICS_HOST sets the address)"
            ) from None
        bound_host, bound_port = self._server.server_address[:2]
        name = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        return f"http://{f'[{name}]' if ':' in name else name}:{bound_port}/metrics"

    def close(self) -> None:
        """Stop serving (a no-op when not serving)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def calling(metrics: WorkerMetrics | None, model: str, tier: str) -> AbstractContextManager[None]:
    """``metrics.call(model, tier)``, or nothing when the worker has no metrics."""
    return nullcontext() if metrics is None else metrics.call(model, tier)
