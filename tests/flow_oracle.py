"""The flow-control rules in plain Python: the oracle the Lua scripts are checked against.

``worker/lua/acquire.lua`` and ``worker/lua/release.lua`` are the only implementation production
runs. This module says the same rules again, as small pure functions and one ``Oracle`` class that
keeps the state the scripts keep in Redis, so that tests/test_flow.py can read them as truth tables
and tests/test_flow_store.py can drive both with the same random walk and compare every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

from worker.classify import QuotaKind
from worker.flow import FlowConfig, breaker_event, pause_after_429

BreakerEvent = Literal["success", "failure", "neutral"]
#: Grow only while in_flight >= limit * this, unless jobs wait (the limit is the bottleneck).
APP_LIMITED_RATIO = 0.5
#: A release wakes at most this many heads of the line (skipping those gone from the arq queue).
WAKE_TRIES = 64


def ms(now_s: float) -> int:
    """A time on the arq queue: epoch milliseconds."""
    return math.floor(now_s * 1000)


# -- sliding windows -------------------------------------------------------------------------------


def slide(
    index: int, cur: tuple[float, float], prev: tuple[float, float], now_s: float, window_s: float
) -> tuple[int, tuple[float, float], tuple[float, float], float]:
    """Move two-window counters to ``now_s``: (window index, current, previous, previous's weight)."""
    idx = max(index, math.floor(now_s / window_s))
    if idx == index + 1:
        cur, prev = (0.0, 0.0), cur
    elif idx > index + 1:
        cur, prev = (0.0, 0.0), (0.0, 0.0)
    weight = min(1.0, max(0.0, 1 - (now_s - idx * window_s) / window_s))
    return idx, cur, prev, weight


def window_wait_s(cur: float, prev: float, weight: float, *, limit: float, cost: float, window_s: float) -> float:
    """0 if ``cost`` fits under ``limit`` now, else how long until it does (counters already slid)."""
    cost = min(cost, limit)  # one request above the whole limit still runs, alone
    if prev * weight + cur + cost <= limit:
        return 0.0
    if cur + cost <= limit:  # the previous window's share slides out during this one
        return max(0.0, (weight - (limit - cur - cost) / prev) * window_s)
    return weight * window_s + (1 - (limit - cost) / cur) * window_s  # into the next window


# -- circuit breaker -------------------------------------------------------------------------------


class Breaker(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerState:
    state: Breaker = Breaker.CLOSED
    since_s: float = 0.0  # time of the last transition
    open_until_s: float = 0.0
    opens: int = 0  # consecutive opens without a close: the cool-down doubles with each
    window: int = 0  # index of the current window: floor(now_s / breaker_window_s)
    ok: float = 0.0
    failed: float = 0.0
    prev_ok: float = 0.0
    prev_failed: float = 0.0
    probe_until_s: float = 0.0  # half-open: the probe's lease; 0 = no probe out


def breaker_gate(state: BreakerState, now_s: float) -> tuple[BreakerState, str, float]:
    """At admission: ("pass" | "probe" | "circuit_open" | "probe_busy", wait_s). Open ends lazily."""
    if state.state == Breaker.OPEN:
        if now_s < state.open_until_s:
            return state, "circuit_open", state.open_until_s - now_s
        state = replace(state, state=Breaker.HALF_OPEN, since_s=now_s, probe_until_s=0.0)
    if state.state == Breaker.HALF_OPEN:
        return state, ("probe_busy" if state.probe_until_s > now_s else "probe"), 0.0
    return state, "pass", 0.0


def breaker_next(
    state: BreakerState, event: BreakerEvent, *, probe: bool, now_s: float, cfg: FlowConfig, in_flight: int = 0
) -> BreakerState:
    """The breaker after one outcome. ``in_flight``: calls still out, counted as not failed (a burst
    of fast 503s must not outvote the answers still on their way). While open, and in half-open
    except for the probe, outcomes of requests sent earlier are ignored."""
    if state.state == Breaker.CLOSED and event != "neutral":
        idx, (ok, failed), (prev_ok, prev_failed), weight = slide(
            state.window, (state.ok, state.failed), (state.prev_ok, state.prev_failed), now_s, cfg.breaker_window_s
        )
        ok, failed = (ok + 1, failed) if event == "success" else (ok, failed + 1)
        recent_failed, recent_ok = failed + prev_failed * weight, ok + prev_ok * weight + in_flight
        if (
            event == "failure"
            and recent_failed >= cfg.breaker_min_failures
            and recent_failed >= cfg.breaker_failure_ratio * (recent_failed + recent_ok)
        ):
            return _open(state, now_s, cfg)
        return replace(state, window=idx, ok=ok, failed=failed, prev_ok=prev_ok, prev_failed=prev_failed)
    if state.state == Breaker.HALF_OPEN and probe:
        if event == "success":
            return BreakerState(Breaker.CLOSED, since_s=now_s)
        if event == "failure":
            return _open(state, now_s, cfg)
        return replace(state, probe_until_s=0.0)  # no verdict: let another request probe
    return state


def _open(state: BreakerState, now_s: float, cfg: FlowConfig) -> BreakerState:
    opens = state.opens + 1
    cool_down_s = min(cfg.breaker_cool_down_max_s, cfg.breaker_cool_down_s * 2.0 ** (opens - 1))
    return BreakerState(Breaker.OPEN, since_s=now_s, open_until_s=now_s + cool_down_s, opens=opens)


# -- the capacity step -----------------------------------------------------------------------------

Levels = dict[int, tuple[float, float, float]]  # level -> (calls, 503s, time of the last update)


def record(levels: Levels, level: int, shed: int, now_s: float, cfg: FlowConfig) -> Levels:
    """Count one outcome at ``level``, after decaying that level's counts to ``now_s``."""
    calls, sheds = 0.0, 0.0
    if level in levels:
        n, s, t = levels[level]
        f = 0.5 ** ((now_s - t) / cfg.level_half_life_s)
        calls, sheds = n * f, s * f
    return {**levels, level: (calls + 1, sheds + shed, now_s)}


def loglik(s: float, n: float) -> float:
    out = 0.0
    if s > 0:
        out += s * math.log(s / n)
    if n - s > 0:
        out += (n - s) * math.log(1 - s / n)
    return out


def fit(levels: Levels, now_s: float, cfg: FlowConfig) -> tuple[int | None, float, Levels]:
    """The capacity step: the highest level below the best significant rise of the 503 rate (None:
    no step), the decayed answers at any level, and the counts with faded levels dropped."""
    step, answered, kept, _ = fit_above(levels, now_s, cfg, cap=None)
    return step, answered, kept


def fit_above(
    levels: Levels, now_s: float, cfg: FlowConfig, *, cap: int | None
) -> tuple[int | None, float, Levels, tuple[float, float]]:
    """``fit``, and the decayed calls and 503s at levels above ``cap``."""
    live: list[tuple[int, float, float]] = []
    kept: Levels = {}
    for k, (n, s, t) in levels.items():
        f = 0.5 ** ((now_s - t) / cfg.level_half_life_s)
        if n * f >= 0.01:
            live.append((k, n * f, s * f))
            kept[k] = (n, s, t)
    live.sort()
    n_all, s_all = sum(n for _, n, _ in live), sum(s for _, _, s in live)
    answered = sum(n - s for _, n, s in live)
    above = [(n, s) for k, n, s in live if cap is not None and k > cap]
    up = (sum(n for n, _ in above), sum(s for _, s in above))
    base, best, step, nl, sl = loglik(s_all, n_all), 0.0, None, 0.0, 0.0
    for i, (_, n, s) in enumerate(live[:-1]):
        nl, sl = nl + n, sl + s
        nr, sr = n_all - nl, s_all - sl
        if nl >= cfg.step_min_n and nr >= cfg.step_min_n and sr / nr - sl / nl >= cfg.step_min_gap:
            g = 2 * (loglik(sl, nl) + loglik(sr, nr) - base)
            if g >= cfg.step_min_llr and g > best:
                best, step = g, live[i + 1][0] - 1
    return step, answered, kept, up


@dataclass(frozen=True)
class Limit:
    """What release.lua keeps about the concurrency limit of one (model, tier)."""

    limit: float
    cap: int | None = None  # the capacity believed in (None: unknown)
    p_hat: float = 0.0  # load-independent 503 rate
    p_n: float = 20.0  # ...and the outcomes it rests on (starts at cfg.baseline_prior_n)
    short: float = 0.0  # recent 503 rate
    tokens: float = 10.0  # hand-overs of a load-independent 503's permit in store
    last_decrease_s: float = 0.0
    levels: Levels = field(default_factory=dict)

    @classmethod
    def initial(cls, cfg: FlowConfig) -> Limit:
        return cls(cfg.initial_limit, p_n=cfg.baseline_prior_n, tokens=cfg.replace_burst)


def learn(
    state: Limit, shed: bool, *, level: int, now_s: float, started_s: float, in_flight: int, waiting: int,
    cfg: FlowConfig,
) -> tuple[Limit, str, int]:
    """The limit after one answer (``shed`` False) or one 503: (state, verdict, replace). ``in_flight``
    counts permits held with this one; ``replace`` is 1 when the permit goes to the next in line."""
    limit = cfg.clamp(state.limit)
    cap, p_hat, p_n = state.cap, state.p_hat, state.p_n
    tokens, last_dec = state.tokens, state.last_decrease_s
    levels = record(state.levels, level, int(shed), now_s, cfg)
    short = state.short + (int(shed) - state.short) / cfg.excess_window

    def baseline(x: float) -> None:
        nonlocal p_n, p_hat
        p_n = min(cfg.baseline_window, p_n + 1)
        p_hat = p_hat + (x - p_hat) / p_n

    verdict, replace_it = "", 1
    if not shed:
        tokens = min(cfg.replace_burst, tokens + cfg.replace_ratio)
        if cap is None or level <= cap:
            baseline(0.0)
        grow = in_flight >= limit * APP_LIMITED_RATIO or waiting > 0
        if cap is not None and level > cap:
            _, _, levels, (n_up, s_up) = fit_above(levels, now_s, cfg, cap=cap)
            if n_up >= cfg.raise_min_n and s_up / n_up <= p_hat + cfg.step_min_gap:
                cap = None
                limit = min(cfg.max_limit, max(limit, level + 1))
            else:
                limit = min(cfg.max_limit, max(limit, min(level + 1, cap + 2)))
        elif grow:
            limit = min(cfg.max_limit, limit + (cfg.probe_gain / limit if cap is not None else 1.0))
    else:
        step, answered, levels = fit(levels, now_s, cfg)
        alpha = 1 / cfg.excess_window
        jump = max(cfg.step_min_gap, cfg.excess_z * math.sqrt(max(p_hat * (1 - p_hat), 0.01) * alpha / (2 - alpha)))
        replace_it = 0
        if step is not None and level > step:
            verdict, cap = "capacity", step
            limit = max(cfg.min_limit, min(limit, step))
        elif cap is not None and level > cap:
            verdict = "capacity"
            limit = max(cfg.min_limit, min(limit, cap))
        elif answered < cfg.blind_n and short - p_hat >= jump:
            verdict = "excess"
            if started_s >= last_dec:
                limit = max(cfg.min_limit, min(limit, in_flight) * cfg.decrease_factor)
                last_dec = now_s
        else:
            verdict = "random"
            baseline(1.0)
            if tokens >= 1:
                tokens, replace_it = tokens - 1, 1
    new = Limit(limit, cap, p_hat, p_n, short, tokens, last_dec, levels)
    return new, verdict, replace_it


def breaker_event_after(outcome: str | None, verdict: str, limit: float, cfg: FlowConfig) -> BreakerEvent:
    """What the breaker hears: a 503 the limit handles is neutral until the limit is at its floor."""
    if outcome == "overloaded":
        return "failure" if verdict == "random" or limit <= cfg.min_limit else "neutral"
    return breaker_event(outcome)


# -- admission -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    admitted: bool
    reason: str
    wait_s: float = 0.0
    probe: bool = False
    level: int = 0  # permits held once this one was taken (in flight before, when refused)


class Oracle:
    """The state the scripts keep for one (model, tier) and its model, and the same two calls."""

    def __init__(self, cfg: FlowConfig) -> None:
        self.cfg = cfg
        self.control = Limit.initial(cfg)
        self.breaker = BreakerState()
        self.paused_until_s = 0.0
        self.holders: dict[str, float] = {}  # job -> lease expiry
        self.probe_job: str | None = None
        self.waiters: dict[str, float] = {}  # job -> its place (the job's enqueue time)
        self.woken: dict[str, int] = {}  # job -> wake time (ms)
        self.reserved: dict[str, float] = {}  # woken job -> until when its permit is held (s)
        self.queued: dict[str, float] = {}  # jobs on the arq queue -> score (the test's stand-in for arq)
        self.seen = {"woken": 0, "skipped": 0, "rank_admitted": 0, "in_line_refused": 0, "woken_refused": 0,
                     "woken_for_resume": 0}
        self.verdicts: dict[str, int] = {}

    def _purge(self, now_s: float) -> None:
        self.holders = {j: expiry for j, expiry in self.holders.items() if expiry > now_s}

    def line(self) -> list[tuple[str, float]]:
        return sorted(self.waiters.items(), key=lambda item: (item[1], item[0]))

    def acquire(self, job: str, now_s: float, since_s: float | None = None) -> Admitted:
        self._purge(now_s)
        in_flight, limit = len(self.holders), self.cfg.clamp(self.control.limit)
        self.woken.pop(job, None)  # a wake is spent by any answer
        self.reserved = {j: until for j, until in self.reserved.items() if until > now_s}
        was_woken = self.reserved.pop(job, None) is not None  # only a live reservation jumps the line
        reserved = len(self.reserved)
        if self.paused_until_s > now_s:
            return Admitted(False, "paused", self.paused_until_s - now_s, level=in_flight)
        if job in self.holders:  # a repeated acquire keeps its permit
            self.holders[job] = now_s + self.cfg.permit_ttl_s
            return Admitted(True, "ok", probe=self.probe_job == job, level=len(self.holders))
        breaker, gate, wait_s = breaker_gate(self.breaker, now_s)
        if gate in ("circuit_open", "probe_busy"):
            self.breaker = breaker
            return Admitted(False, gate, wait_s, level=in_flight)
        self.breaker = breaker  # open -> half-open stands even when refused below
        free = math.floor(limit) - in_flight - reserved
        line = [j for j, _ in self.line()]
        rank = line.index(job) if job in self.waiters else None
        in_line = (not was_woken and free > 0 and in_flight + reserved > 0 and bool(self.waiters)
                   and (rank is None or rank >= free))
        if free <= 0 or in_line:
            self.seen["in_line_refused"] += in_line
            self.seen["woken_refused"] += was_woken
            self.waiters.setdefault(job, now_s if since_s is None else since_s)
            return Admitted(False, "no_permit", level=in_flight)
        self.seen["rank_admitted"] += rank is not None and not was_woken
        self.waiters.pop(job, None)
        self.holders[job] = now_s + self.cfg.permit_ttl_s
        if gate == "probe":
            self.probe_job = job
            self.breaker = replace(self.breaker, probe_until_s=now_s + self.cfg.permit_ttl_s)
        return Admitted(True, "ok", probe=gate == "probe", level=in_flight + 1)

    def release(
        self, job: str, *, started_s: float, level: int, outcome: str | None, retry_after_s: float | None,
        now_s: float,
    ) -> tuple[float, str]:
        """Return the permit; (limit after, a 503's verdict)."""
        self._purge(now_s)
        in_flight = len(self.holders) + (job not in self.holders)
        self.holders.pop(job, None)
        limit_before = self.cfg.clamp(self.control.limit)
        verdict, replace_it = "", 1
        if outcome in ("ok", "overloaded"):
            self.control, verdict, replace_it = learn(
                self.control, outcome == "overloaded", level=level, now_s=now_s, started_s=started_s,
                in_flight=in_flight, waiting=len(self.waiters), cfg=self.cfg,
            )
            self.verdicts[verdict or "answer"] = self.verdicts.get(verdict or "answer", 0) + 1
        limit = self.cfg.clamp(self.control.limit)
        event = breaker_event_after(outcome, verdict, limit, self.cfg)
        self.breaker = breaker_next(
            self.breaker, event, probe=self.probe_job == job, now_s=now_s, cfg=self.cfg, in_flight=len(self.holders)
        )
        if self.breaker.state != Breaker.HALF_OPEN or self.breaker.probe_until_s == 0.0:
            self.probe_job = None
        self.reserved = {j: until for j, until in self.reserved.items() if until > now_s}
        free = math.floor(limit) - len(self.holders) - len(self.reserved)
        want = replace_it + max(0, math.floor(limit) - math.floor(limit_before))
        if not self.holders:  # the last call in flight: no other release is to come
            want = max(want, 1)
        wake = min(free, want)
        pause_s = 0.0
        if outcome == "rate_limited":
            pause_s, _ = pause_after_429(retry_after_s, QuotaKind.PER_MINUTE, self.cfg)
        # while the model is paused, the woken jobs are due when the pause ends, their permits held until then
        resume_s = max(now_s + pause_s, self.paused_until_s)
        if resume_s - now_s > self.cfg.waiter_timeout_s:  # the line's own fallback timer comes first
            wake = 0
        if wake > 0 and self.waiters:
            if resume_s > now_s:
                now_ms = ms(resume_s)
            else:
                now_ms = ms(now_s)
                due = [score for score in self.queued.values()]
                if due and min(due) <= now_ms:
                    now_ms = max(1, int(min(due)) - 1)  # ahead of jobs that are due but were never tried
            for head, _ in self.line()[:WAKE_TRIES]:
                if wake == 0:
                    break
                del self.waiters[head]
                if head in self.queued:
                    self.woken[head] = now_ms
                    self.queued[head] = now_ms
                    self.reserved[head] = resume_s + self.cfg.wake_hold_s
                    self.seen["woken"] += 1
                    self.seen["woken_for_resume"] += resume_s > now_s
                    wake -= 1
                else:
                    self.seen["skipped"] += 1
        if outcome == "rate_limited":
            self.paused_until_s = max(self.paused_until_s, now_s + pause_s)
        return limit, verdict
