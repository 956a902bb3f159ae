"""Budgets (``FLEXQ_BUDGETS``): spending limits per UTC day or month, for the queue or a tag.

Use (the runner), after flow-control admission and before the attempt opens:

    held = await budgets.reserve(job_id, applying(budgets.budgets, record.tags), estimate)
    if isinstance(held, Refusal):
        verdict = on_refusal(held, deadline_s=..., now_s=..., rand=...)   # wait for the window, or fail
    ...call Gemini, record the attempt...
    await budgets.settle(held, actual_usd)                                # 0 for a call that failed

The rules are ``worker/lua/budget.lua`` (one call to reserve, one to settle, atomic in Redis, on the
Redis clock); this module holds the pure parts around it: which budgets apply to a job, the estimate,
and what a refused job does (:func:`on_refusal`, a truth table in tests/test_budget.py).

Keys: ``{queue}:budget:{scope}:{window id}`` hashes (``spent``, ``reserved``), ``{queue}:budget:holds``
(zset: reservation -> when it lapses) and ``{queue}:budget:held`` (hash: reservation -> its amount and keys).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from redis.asyncio import Redis

from producer.events import text
from producer.keys import Keys
from producer.models import Usage
from producer.pricing import cost_usd
from producer.request import GenerateRequest
from producer.status import Tier
from worker.config import BudgetLimits, WorkerConfig
from worker.flow import estimate_tokens
from worker.flow_store import script
from worker.policy import DEADLINE_MARGIN_S

Window = Literal["day", "month"]
#: Jobs refused until a window ends come back spread over this long after it, not all at once.
WINDOW_SPREAD_S = 60.0
BUDGET_EXCEEDED = "budget_exceeded"


@dataclass(frozen=True)
class Budget:
    scope: str  # "queue", or a tag "key=value"
    window: Window
    limit_usd: float

    @property
    def name(self) -> str:
        return f"{self.scope} per {self.window}"


@dataclass(frozen=True)
class Hold:
    """A reservation: its id, the estimate reserved, and the budget windows (key, end s) it is in."""

    id: str
    usd: float
    keys: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Refusal:
    """The first budget an attempt's estimate did not fit, and its state (times on the Redis clock)."""

    budget: Budget
    spent_usd: float
    reserved_usd: float
    estimate_usd: float
    window_end_s: float
    now_s: float


@dataclass(frozen=True)
class Verdict:
    """What a refused job does: wait ``wait_s`` (not an attempt), or fail (``wait_s`` None) with ``message``."""

    wait_s: float | None
    message: str


def budgets_from(settings: Mapping[str, BudgetLimits]) -> list[Budget]:
    """``FLEXQ_BUDGETS`` as a list, in the order given, days before months."""
    out: list[Budget] = []
    for scope, limits in settings.items():
        if limits.day is not None:
            out.append(Budget(scope, "day", limits.day))
        if limits.month is not None:
            out.append(Budget(scope, "month", limits.month))
    return out


def applying(budgets: list[Budget], tags: Mapping[str, str]) -> list[Budget]:
    """The budgets a job with ``tags`` counts against: the queue's, and those of its tags."""
    out = []
    for budget in budgets:
        key, eq, value = budget.scope.partition("=")
        if budget.scope == "queue" or (eq and tags.get(key) == value):
            out.append(budget)
    return out


def _output_tokens(request: GenerateRequest, default: int) -> int:
    config = request.config or {}
    out = config.get("max_output_tokens", config.get("maxOutputTokens"))
    return out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else default


def estimate_usd(request: GenerateRequest, tier: Tier | str, *, output_tokens_default: int) -> float | None:
    """An attempt's estimated cost on ``tier``: the flow-control token estimate (prompt characters / 4,
    plus ``max_output_tokens`` or the default) at the model's price; None when the price is unknown."""
    total = estimate_tokens(request, output_tokens_default=output_tokens_default)
    out = _output_tokens(request, output_tokens_default)
    return cost_usd(request.model, Usage(prompt_tokens=total - out, output_tokens=out), tier)


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(refusal: Refusal) -> str:
    """The budget, its limit and spend, in one line."""
    b = refusal.budget
    return (
        f"budget {b.name} (${b.limit_usd:g}) would be exceeded: spent ${refusal.spent_usd:.6f}, "
        f"reserved ${refusal.reserved_usd:.6f}, this attempt ~${refusal.estimate_usd:.6f}; "
        f"the window ends {_when(refusal.window_end_s)}"
    )


def on_refusal(
    refusal: Refusal, *, deadline_s: float, now_s: float, rand: Callable[[], float],
    margin_s: float = DEADLINE_MARGIN_S,
) -> Verdict:
    """Wait for the budget's window to end (plus a spread, so that waiting jobs do not all come back at
    once) if the job's deadline allows it, else fail. ``now_s``: the worker's clock, as the deadline is."""
    wait_s = round(max(0.0, refusal.window_end_s - refusal.now_s) + rand() * WINDOW_SPREAD_S, 3)
    if now_s + wait_s + margin_s < deadline_s:
        return Verdict(wait_s, describe(refusal) + f"; waiting {wait_s:.0f}s for it")
    return Verdict(None, describe(refusal) + ", past the job's deadline")


class BudgetStore:
    """Budget state of one queue in Redis, shared by all workers."""

    def __init__(self, redis: Redis, keys: Keys, budgets: list[Budget], *, hold_ttl_s: float) -> None:
        self.redis = redis
        self.budgets = budgets
        self.hold_ttl_s = hold_ttl_s
        self.prefix = f"{keys.queue}:budget:"
        self._keys = [self.prefix + "holds", self.prefix + "held"]
        self._script = redis.register_script(script("budget"))

    @classmethod
    def of(cls, redis: Redis, keys: Keys, settings: WorkerConfig) -> BudgetStore | None:
        """The budgets of ``FLEXQ_BUDGETS`` (None when there are none): a reservation lapses when no worker
        can still be settling it (the longest attempt, plus a dead worker's lease)."""
        budgets = budgets_from(settings.budgets)
        if not budgets:
            return None
        return cls(redis, keys, budgets, hold_ttl_s=settings.job_timeout_s + settings.lease_s)

    async def _call(self, **call: Any) -> Any:
        return await self._script(keys=self._keys, args=[json.dumps({"prefix": self.prefix, **call})])

    async def reserve(
        self, job_id: str, budgets: list[Budget], usd: float, now_s: float | None = None
    ) -> Hold | Refusal:
        """Reserve ``usd`` against every one of ``budgets`` (all or none)."""
        hold_id = f"{job_id}:{secrets.token_hex(4)}"
        reply = await self._call(
            op="reserve", now=now_s, id=hold_id, usd=usd, ttl_s=self.hold_ttl_s,
            budgets=[[b.scope, b.window, b.limit_usd] for b in budgets],
        )
        if int(reply[0]) == 1:
            found = json.loads(text(reply[2]))
            return Hold(hold_id, usd, tuple((str(key), float(end)) for key, end in (found or [])))
        _, now, index, spent, reserved, end = reply
        return Refusal(budgets[int(index) - 1], float(spent), float(reserved), usd, float(end), float(now))

    async def settle(self, hold: Hold, usd: float, now_s: float | None = None) -> None:
        """Replace the reservation by the actual cost (0: the call failed, or was never made)."""
        await self._call(op="settle", now=now_s, id=hold.id, usd=max(0.0, usd), hold_keys=[list(k) for k in hold.keys])

    async def snapshot(self, now_s: float | None = None) -> list[dict[str, Any]]:
        """For ``flexq stats``: each budget's current window, spend, reservations and what is left."""
        if not self.budgets:
            return []
        reply = await self._call(op="peek", now=now_s, budgets=[[b.scope, b.window, b.limit_usd] for b in self.budgets])
        out = []
        for budget, (window_id, spent, reserved, end) in zip(self.budgets, reply[1:], strict=True):
            spent_usd, reserved_usd = round(float(spent), 6), round(float(reserved), 6)
            out.append({
                "scope": budget.scope, "window": budget.window, "window_id": text(window_id),
                "limit_usd": budget.limit_usd, "spent_usd": spent_usd, "reserved_usd": reserved_usd,
                "left_usd": round(max(0.0, budget.limit_usd - spent_usd - reserved_usd), 6),
                "ends_at": _when(float(end)),
            })
        return out

