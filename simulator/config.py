"""Configuration and counters of the Gemini simulator."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

LATENCY_DISTS: tuple[str, ...] = ("const", "exp", "uniform", "lognormal")
PROFILES: tuple[str, ...] = ("flat", "peak", "offpeak", "wave")
# (capacity multiplier, rate_503 multiplier) at the two ends of the load profile
PEAK_MULTIPLIERS: tuple[float, float] = (0.5, 1.5)
OFFPEAK_MULTIPLIERS: tuple[float, float] = (1.5, 0.3)
SERVER_TIMEOUT_HISTORY = 20
VERTEX_CALL_HISTORY = 50
SERVED_FLEX_TIERS: tuple[str, ...] = ("flex", "standard")
#: How a batch created while the setting holds ends once its turnaround is over (simulator/batch.py).
BATCH_OUTCOMES: tuple[str, ...] = ("succeeded", "expired", "failed")
#: The Batch API's limit on an inline source (the whole create request body); larger ones go through a file.
INLINE_BATCH_LIMIT_BYTES = 20 * 1024 * 1024


@dataclass
class SimConfig:
    """How the simulated Gemini endpoint behaves. Every field may be changed while it runs."""

    latency_s: float = 0.05  # mean service time of a successful call
    latency_dist: str = "const"  # "const" | "exp" | "uniform" ([0.5, 1.5] x mean) | "lognormal"
    rate_503: float = 0.0  # probability a FLEX request is shed with 503
    rate_429: float = 0.0  # probability any request gets 429 with RetryInfo
    retry_delay_s: float = 1.0  # the RetryInfo retryDelay put on random 429s
    rate_500: float = 0.0  # probability of a 500 INTERNAL
    capacity: int | None = None  # at most N FLEX requests in service at once; extra ones get 503
    rpm: int | None = None  # requests per minute per model (sliding 60 s window)
    profile: str = "flat"  # "flat" | "peak" | "offpeak" | "wave"
    profile_period_s: float = 60.0
    seed: int | None = None
    shed_latency_s: float = 0.0  # how long a 503 takes to come back
    #: Capacity over time, "0:20,20:8,40:30": from 0 s on 20 flex calls in service, from 20 s on 8,
    #: from 40 s on 30 (seconds since start or the last reset). Overrides ``capacity`` when set.
    capacity_schedule: str = ""
    #: The tier a flex call that is not shed is served (and billed) at: "flex", or "standard" to play a
    #: server that quietly serves flex at the standard price (x-gemini-service-tier / trafficType say so).
    serve_flex_as: str = "flex"
    #: Priority calls in service at once; one more is quietly served at standard (the tier header, the
    #: usage's serviceTier and Vertex's trafficType say so). None: unlimited; 0: every priority call downgraded.
    priority_capacity: int | None = None
    #: Seconds from batches.create until the batch ends: PENDING for the first half, RUNNING for the second.
    batch_turnaround_s: float = 2.0
    #: How a batch created from now on ends: "succeeded" (answers), "expired" or "failed" (no output).
    batch_outcome: str = "succeeded"
    #: An inline batch whose create request body is larger than this is refused with 400.
    batch_inline_limit_bytes: int = INLINE_BATCH_LIMIT_BYTES
    #: Answer inline batch requests in a shuffled order (match them by metadata, never by position).
    batch_shuffle: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line reason if any field is out of range."""
        for name in ("rate_503", "rate_429", "rate_500"):
            rate = float(getattr(self, name))
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        for name in ("latency_s", "retry_delay_s", "shed_latency_s", "batch_turnaround_s"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0.0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not math.isfinite(self.profile_period_s) or self.profile_period_s <= 0.0:
            raise ValueError(f"profile_period_s must be > 0, got {self.profile_period_s}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 (or unset), got {self.capacity}")
        if self.rpm is not None and self.rpm < 1:
            raise ValueError(f"rpm must be >= 1 (or unset), got {self.rpm}")
        if self.priority_capacity is not None and self.priority_capacity < 0:
            raise ValueError(f"priority_capacity must be >= 0 (or unset), got {self.priority_capacity}")
        if self.batch_inline_limit_bytes < 1:
            raise ValueError(f"batch_inline_limit_bytes must be >= 1, got {self.batch_inline_limit_bytes}")
        self._validate_choices()
        parse_schedule(self.capacity_schedule)

    def _validate_choices(self) -> None:
        choices = (
            ("latency_dist", LATENCY_DISTS), ("serve_flex_as", SERVED_FLEX_TIERS), ("profile", PROFILES),
            ("batch_outcome", BATCH_OUTCOMES),
        )
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def updated(self, changes: dict[str, Any]) -> SimConfig:
        """A validated copy with `changes` applied; unknown field names raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        merged = asdict(self) | changes
        return SimConfig(**merged)

    def profile_multipliers(self, elapsed_s: float) -> tuple[float, float]:
        """(capacity multiplier, rate_503 multiplier) of the load profile at `elapsed_s`."""
        if self.profile == "peak":
            return PEAK_MULTIPLIERS
        if self.profile == "offpeak":
            return OFFPEAK_MULTIPLIERS
        if self.profile == "wave":
            # starts off-peak, reaches peak at half a period, back off-peak after a full period
            weight = (1.0 - math.cos(2.0 * math.pi * elapsed_s / self.profile_period_s)) / 2.0
            cap = OFFPEAK_MULTIPLIERS[0] + (PEAK_MULTIPLIERS[0] - OFFPEAK_MULTIPLIERS[0]) * weight
            shed = OFFPEAK_MULTIPLIERS[1] + (PEAK_MULTIPLIERS[1] - OFFPEAK_MULTIPLIERS[1]) * weight
            return cap, shed
        return 1.0, 1.0

    def effective_capacity(self, elapsed_s: float) -> int | None:
        capacity = self.capacity
        for start_s, scheduled in parse_schedule(self.capacity_schedule):
            if elapsed_s >= start_s:
                capacity = scheduled
        if capacity is None:
            return None
        cap_mult, _ = self.profile_multipliers(elapsed_s)
        return max(1, math.floor(capacity * cap_mult + 0.5))

    def effective_rate_503(self, elapsed_s: float) -> float:
        _, shed_mult = self.profile_multipliers(elapsed_s)
        return min(1.0, self.rate_503 * shed_mult)


def parse_schedule(text: str) -> list[tuple[float, int]]:
    """``"0:20,20:8"`` -> [(0.0, 20), (20.0, 8)], in time order; ValueError naming the bad part."""
    out: list[tuple[float, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        at, sep, cap = item.partition(":")
        try:
            start_s, capacity = float(at), int(cap)
        except ValueError:
            start_s, capacity = math.nan, 0
        if not sep or not math.isfinite(start_s) or start_s < 0 or capacity < 1:
            raise ValueError(f"capacity_schedule: {item!r} is not SECONDS:CAPACITY (e.g. '0:20,20:8')")
        out.append((start_s, capacity))
    return sorted(out)


@dataclass
class SimStats:
    """Counters served at GET /_sim/stats. API keys are only counted, never stored."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_tier: dict[str, int] = field(default_factory=dict)
    ok_by_tier: dict[str, int] = field(default_factory=dict)
    in_flight_flex: int = 0
    max_in_flight_flex: int = 0
    api_keys_seen: int = 0
    server_timeout_headers: list[str] = field(default_factory=list)
    calls_by_directive_key: dict[str, int] = field(default_factory=dict)
    connection_resets: int = 0
    #: flex 503s by cause: "capacity" (the pool was full) or "random" (shed whatever the load)
    sheds: dict[str, int] = field(default_factory=dict)
    signatures_checked: int = 0  # thought signatures examined in model turns sent back (Gemini 3)
    signatures_rejected: int = 0  # requests refused with 400 for a missing or invalid signature
    images_served: int = 0
    function_calls_served: int = 0
    json_answers_served: int = 0
    bearer_tokens_seen: int = 0  # Vertex AI requests authenticated with an access token (counted, never stored)
    by_traffic_type: dict[str, int] = field(default_factory=dict)  # Vertex AI 200s by usageMetadata.trafficType
    #: The last requests to the Vertex AI paths, oldest first: path, credential kind, the tier headers, whether the
    #: body carried serviceTier (and its value), the status and the trafficType answered (simulator/vertex.py).
    vertex_calls: list[dict[str, Any]] = field(default_factory=list)
    in_flight_priority: int = 0
    max_in_flight_priority: int = 0
    #: priority calls served at standard because priority_capacity was reached
    priority_downgrades: int = 0
    batches_created: int = 0
    batches_by_state: dict[str, int] = field(default_factory=dict)  # ended batches by final state
    batch_requests_answered: int = 0  # requests inside batches answered with a response
    batch_request_errors: int = 0  # requests inside batches answered with an error entry
    files_uploaded: int = 0

    def record_vertex_call(self, facts: dict[str, Any]) -> None:
        self.vertex_calls.append(facts)
        del self.vertex_calls[:-VERTEX_CALL_HISTORY]

    def count_traffic_type(self, traffic_type: str) -> None:
        self.by_traffic_type[traffic_type] = self.by_traffic_type.get(traffic_type, 0) + 1

    def count_shed(self, cause: str) -> None:
        self.sheds[cause] = self.sheds.get(cause, 0) + 1

    def count_signatures(self, checked: int, *, rejected: bool) -> None:
        self.signatures_checked += checked
        self.signatures_rejected += int(rejected)

    def count_output(self, output: str) -> None:
        """Count a 200 by what it carried: "image", "function_call", "json" (plain text is not counted)."""
        if output == "image":
            self.images_served += 1
        elif output == "function_call":
            self.function_calls_served += 1
        elif output == "json":
            self.json_answers_served += 1

    def count_status(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def count_tier(self, tier: str) -> None:
        self.by_tier[tier] = self.by_tier.get(tier, 0) + 1

    def count_ok(self, tier: str) -> None:
        self.ok_by_tier[tier] = self.ok_by_tier.get(tier, 0) + 1

    def record_server_timeout(self, value: str) -> None:
        self.server_timeout_headers.append(value)
        del self.server_timeout_headers[:-SERVER_TIMEOUT_HISTORY]

    def flex_started(self) -> None:
        self.in_flight_flex += 1
        self.max_in_flight_flex = max(self.max_in_flight_flex, self.in_flight_flex)

    def flex_finished(self) -> None:
        self.in_flight_flex -= 1

    def priority_started(self) -> None:
        self.in_flight_priority += 1
        self.max_in_flight_priority = max(self.max_in_flight_priority, self.in_flight_priority)

    def priority_finished(self) -> None:
        self.in_flight_priority -= 1

    def count_batch_end(self, state: str, answered: int, errors: int) -> None:
        self.batches_by_state[state] = self.batches_by_state.get(state, 0) + 1
        self.batch_requests_answered += answered
        self.batch_request_errors += errors

    def reset(self) -> None:
        """Clear every counter but keep the live in-flight count (those requests are still running)."""
        in_flight, priority = self.in_flight_flex, self.in_flight_priority
        fresh = SimStats(
            in_flight_flex=in_flight, max_in_flight_flex=in_flight,
            in_flight_priority=priority, max_in_flight_priority=priority,
        )
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["by_status"] = {str(code): count for code, count in sorted(self.by_status.items())}
        return data
