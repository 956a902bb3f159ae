"""``flexq metrics``: a Prometheus endpoint with the whole fleet's state, read from Redis on each scrape.

Its own process, so a scrape never blocks a worker's event loop: prometheus_client's HTTP server
answers in a thread, and its collector hands the read to this process's event loop
(``flexq.fleet``) and waits for it. Every series carries a ``queue`` label; the names are in
:data:`METRICS` (and docs/operations.md). A scrape when Redis does not answer still succeeds, with
``flexq_up 0`` and nothing else.

Budgets: this process's ``FLEXQ_BUDGETS``, read from Redis as ``flexq stats`` reads them
(``worker.budget.BudgetStore.snapshot``): spent, reserved and limit of each budget (scope, window)
that has a limit, in its current UTC window.

Nothing heavy is imported at load: ``flexq`` builds its parser with :func:`add_commands` on every start.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flexq.exits import count, seconds

if TYPE_CHECKING:
    import asyncio

    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

    Family = CounterMetricFamily | GaugeMetricFamily

    from flexq.fleet import Fleet, FleetReader
    from worker.budget import BudgetStore
    from worker.config import WorkerConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464  # the port OpenTelemetry's Prometheus exporter uses by default
#: How long a scrape waits for Redis before answering ``flexq_up 0`` (Prometheus's default timeout is 10 s).
SCRAPE_TIMEOUT_S = 8.0

#: Every family this exporter writes: (name, type, help). The name of a counter is given without
#: ``_total``, as prometheus_client takes it; it is written with it.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("flexq_up", "gauge", "1 if this scrape read the queue's state from Redis, 0 if Redis did not answer"),
    ("flexq_scrape_duration_seconds", "gauge", "how long this scrape took to read Redis"),
    ("flexq_jobs", "gauge", "jobs by status (ended ones within the retention, as flexq stats counts them)"),
    ("flexq_attempts", "counter", "closed attempts by tier and outcome"),
    ("flexq_tokens", "counter", "tokens by tier and kind (prompt, output, thoughts)"),
    ("flexq_cost_usd", "counter", "what succeeded jobs cost, by the tier that served them, in US dollars"),
    ("flexq_standard_equivalent_cost_usd", "counter", "what the same jobs would have cost on the standard tier"),
    ("flexq_unknown_cost_jobs", "counter", "succeeded jobs of models with no known price (not in the cost)"),
    ("flexq_ok_latency_seconds", "gauge", "latency of recent ok attempts (the last 10,000) at a quantile"),
    ("flexq_ok_latency_samples", "gauge", "how many recent ok attempts flexq_ok_latency_seconds is over"),
    ("flexq_arq_queue_jobs", "gauge", "arq's queue: due (run time come, including running jobs) or deferred"),
    ("flexq_workers", "gauge", "worker processes whose heartbeat is at most FLEXQ_LEASE_S old"),
    ("flexq_flow_limit", "gauge", "shared concurrency limit of a (model, tier), all workers together"),
    ("flexq_flow_in_flight", "gauge", "calls holding a flow-control permit of a (model, tier)"),
    ("flexq_flow_breaker_state", "gauge", "1 for the breaker's current state of a (model, tier), 0 for the others"),
    ("flexq_flow_breaker_opens", "gauge", "times the breaker opened in a row (its cool-down doubles each time)"),
    ("flexq_flow_breaker_open_left_seconds", "gauge", "time until an open breaker lets a probe through"),
    ("flexq_flow_load_independent_503_ratio", "gauge", "learned share of 503s that come whatever the load"),
    ("flexq_flow_capacity_step", "gauge", "the in-flight level above which 503s jump (the pool's size), if found"),
    ("flexq_model_pause_left_seconds", "gauge", "time left in a model's pause (a 429's, or flexq pause), 0 if none"),
    ("flexq_model_quota_alert", "gauge", "1 while a model has a quota alert (a daily or billing 429), by kind"),
    ("flexq_budget_spent_usd", "gauge", "cost settled against a budget (FLEXQ_BUDGETS) in its current UTC window"),
    ("flexq_budget_reserved_usd", "gauge", "estimated cost reserved against a budget by attempts in flight"),
    ("flexq_budget_limit_usd", "gauge", "a budget's limit per window (FLEXQ_BUDGETS of the exporter's process)"),
)
BUDGET_FAMILIES = {"flexq_budget_spent_usd": "spent_usd", "flexq_budget_reserved_usd": "reserved_usd",
                   "flexq_budget_limit_usd": "limit_usd"}
BREAKER_STATES = ("closed", "open", "half_open")


# -- families ------------------------------------------------------------------------------------


def families(
    fleet: Fleet | None, *, queue: str, duration_s: float | None = None,
    budgets: Sequence[Mapping[str, Any]] = (),
) -> list[Metric]:
    """The metric families of one read that have samples (``None``: Redis did not answer: ``flexq_up 0``).
    ``budgets``: ``BudgetStore.snapshot()``, as ``flexq stats`` has it (ignored without a ``fleet``)."""
    return [family for family in _families(fleet, queue, duration_s, budgets).values() if family.samples]


def _families(
    fleet: Fleet | None, queue: str, duration_s: float | None, budgets: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Family]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def make(name: str, kind: str, doc: str, labels: Iterable[str]) -> Family:
        if kind == "counter":
            return CounterMetricFamily(name, doc, labels=["queue", *labels])
        return GaugeMetricFamily(name, doc, labels=["queue", *labels])

    labels = {
        "flexq_jobs": ["status"], "flexq_attempts": ["tier", "outcome"], "flexq_tokens": ["tier", "kind"],
        "flexq_cost_usd": ["tier"], "flexq_ok_latency_seconds": ["quantile"], "flexq_arq_queue_jobs": ["state"],
        "flexq_model_pause_left_seconds": ["model"], "flexq_model_quota_alert": ["model", "kind"],
        "flexq_flow_breaker_state": ["model", "tier", "state"],
        **{name: ["budget", "window"] for name in BUDGET_FAMILIES},
    }
    out = {name: make(name, kind, doc, labels.get(name, ["model", "tier"] if name.startswith("flexq_flow_") else []))
           for name, kind, doc in METRICS}
    out["flexq_up"].add_metric([queue], 0.0 if fleet is None else 1.0)
    if duration_s is not None:
        out["flexq_scrape_duration_seconds"].add_metric([queue], duration_s)
    if fleet is not None:
        _queue_samples(out, fleet, queue)
        _flow_samples(out, fleet.flow, queue)
        _budget_samples(out, budgets, queue)
    return out


def _queue_samples(out: dict[str, Family], fleet: Fleet, q: str) -> None:
    stats = fleet.stats
    for status, n in fleet.jobs.items():
        out["flexq_jobs"].add_metric([q, status], n)
    for tier, outcomes in sorted(stats["attempts"]["by_tier"].items()):
        for outcome, n in sorted(outcomes.items()):
            out["flexq_attempts"].add_metric([q, tier, outcome], n)
    for tier, kinds in sorted(stats["tokens"].items()):
        for kind, n in sorted(kinds.items()):
            out["flexq_tokens"].add_metric([q, tier, kind], n)
    cost = stats["cost"]
    for tier, usd in sorted(cost["by_tier_usd"].items()):
        out["flexq_cost_usd"].add_metric([q, tier], usd)
    out["flexq_standard_equivalent_cost_usd"].add_metric([q], cost["standard_equivalent_usd"])
    out["flexq_unknown_cost_jobs"].add_metric([q], cost["jobs_with_unknown_cost"])
    latency = stats["latency_ms"]
    if latency["samples"]:
        out["flexq_ok_latency_seconds"].add_metric([q, "0.5"], latency["p50"] / 1000)
        out["flexq_ok_latency_seconds"].add_metric([q, "0.95"], latency["p95"] / 1000)
    out["flexq_ok_latency_samples"].add_metric([q], latency["samples"])
    out["flexq_arq_queue_jobs"].add_metric([q, "due"], fleet.arq_due)
    out["flexq_arq_queue_jobs"].add_metric([q, "deferred"], fleet.arq_deferred)
    out["flexq_workers"].add_metric([q], fleet.workers)


def _flow_samples(out: dict[str, Family], flow: dict[str, Any], q: str) -> None:
    for scope in flow["scopes"]:
        where = [q, scope["model"], scope["tier"]]
        breaker = scope["breaker"]
        out["flexq_flow_limit"].add_metric(where, scope["limit"])
        out["flexq_flow_in_flight"].add_metric(where, scope["in_flight"])
        for state in BREAKER_STATES:
            out["flexq_flow_breaker_state"].add_metric([*where, state], 1.0 if breaker["state"] == state else 0.0)
        out["flexq_flow_breaker_opens"].add_metric(where, breaker["opens"])
        out["flexq_flow_breaker_open_left_seconds"].add_metric(where, breaker["open_for_s"])
        if scope["random_503_rate"] is not None:
            out["flexq_flow_load_independent_503_ratio"].add_metric(where, scope["random_503_rate"])
        if scope["capacity_step"] is not None:
            out["flexq_flow_capacity_step"].add_metric(where, scope["capacity_step"])
    for model, info in sorted(flow["models"].items()):
        pause = info["pause"]
        out["flexq_model_pause_left_seconds"].add_metric([q, model], max(0.0, pause["left_s"]) if pause else 0.0)
        if info["quota_alert"]:
            out["flexq_model_quota_alert"].add_metric([q, model, str(info["quota_alert"]["kind"])], 1.0)


def _budget_samples(out: dict[str, Family], budgets: Sequence[Mapping[str, Any]], q: str) -> None:
    for budget in budgets:  # only budgets with a limit: a scope without one for a window has no series for it
        where = [q, str(budget["scope"]), str(budget["window"])]
        for name, field in BUDGET_FAMILIES.items():
            out[name].add_metric(where, float(budget[field]))


# -- the collector -------------------------------------------------------------------------------


class FleetCollector:
    """A prometheus_client collector that reads the fleet on each scrape.

    ``collect`` runs in the HTTP server's thread; the read runs on ``loop`` (which owns the Redis
    connection) and the thread waits for it, at most ``timeout_s``."""

    def __init__(self, reader: FleetReader, loop: asyncio.AbstractEventLoop, *,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.reader = reader
        self.loop = loop
        self.timeout_s = timeout_s
        self.queue = reader.settings.queue
        self._failing = False
        self._budgets: BudgetStore | None = None  # made at the first read: describe() reads nothing

    async def read(self) -> tuple[Fleet, list[dict[str, Any]]]:
        """The fleet, then its budgets as ``flexq stats`` reads them (``[]`` without ``FLEXQ_BUDGETS``).

        Raises ``StoreUnavailableError`` (the URL redacted) when Redis fails."""
        from redis.exceptions import RedisError

        from producer.errors import StoreUnavailableError

        fleet = await self.reader.read()
        try:
            return fleet, await self._budget_snapshot()
        except (RedisError, OSError) as err:
            raise StoreUnavailableError(
                f"cannot read Redis at {self.reader.settings.redis_url_redacted}: {type(err).__name__}"
            ) from None

    async def _budget_snapshot(self) -> list[dict[str, Any]]:
        from worker.budget import BudgetStore

        if self._budgets is None:
            self._budgets = BudgetStore.of(self.reader.redis, self.reader.keys, self.reader.settings)
            if self._budgets is None:
                return []
        return await self._budgets.snapshot()

    def describe(self) -> list[Metric]:
        """Every family, without samples, for the registry (no Redis read at registration)."""
        return list(_families(None, self.queue, None).values())

    def collect(self) -> list[Metric]:
        import asyncio
        import concurrent.futures
        import time

        from producer.errors import StoreUnavailableError

        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(self.read(), self.loop)
        fleet: Fleet | None = None
        budgets: list[dict[str, Any]] = []
        try:
            fleet, budgets = future.result(self.timeout_s)
        except StoreUnavailableError as err:  # its message has the URL redacted
            self._note(str(err))
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._note(f"no answer from Redis in {self.timeout_s:g}s")
        except concurrent.futures.CancelledError:  # the command is stopping
            self._note("stopping")
        else:
            if self._failing:
                self._failing = False
                print("flexq metrics: Redis answers again", file=sys.stderr, flush=True)
        return families(fleet, queue=self.queue, duration_s=time.perf_counter() - started, budgets=budgets)

    def _note(self, why: str) -> None:
        if not self._failing:  # one line when scrapes start failing, not one a scrape
            self._failing = True
            print(f"flexq metrics: scrape answered flexq_up 0: {why}", file=sys.stderr, flush=True)


# -- the command ---------------------------------------------------------------------------------


async def cmd_metrics(args: argparse.Namespace, settings: WorkerConfig) -> int:
    """Serve ``/metrics`` on ``--host``:``--port`` until interrupted (Ctrl-C: the task is cancelled)."""
    import asyncio

    from prometheus_client import CollectorRegistry, start_http_server

    from flexq.fleet import FleetReader

    reader = await FleetReader.connect(settings)  # fails at once, URL redacted, if Redis does not answer
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(reader, asyncio.get_running_loop(), timeout_s=args.timeout_s))
        server, thread = start_http_server(args.port, addr=args.host, registry=registry)
        try:
            host, bound = server.server_address[:2]
            name = host.decode() if isinstance(host, bytes) else str(host)
            shown = f"[{name}]" if ":" in name else name
            print(f"flexq metrics: serving http://{shown}:{bound}/metrics for queue {settings.queue}; "
                  "Ctrl-C stops", flush=True)
            await asyncio.Event().wait()  # until cancelled (Ctrl-C)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
    finally:
        await reader.close()
    return 0


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    value = count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {text!r}")
    return value


def add_commands(sub: Any) -> None:
    """Add ``flexq metrics`` to the CLI's subparsers."""
    p = sub.add_parser("metrics", help="serve Prometheus metrics of the whole fleet (read from Redis per scrape)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    p.add_argument("--timeout-s", type=seconds, default=SCRAPE_TIMEOUT_S,
                   help=f"longest a scrape waits for Redis before answering flexq_up 0 (default {SCRAPE_TIMEOUT_S:g})")
