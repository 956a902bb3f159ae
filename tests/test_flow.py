"""Flow control as truth tables: limits parsing, the limit's learning rule, sliding windows, breaker,
429 pauses, admission.

No Redis, no clock: ``now_s`` is an argument and the random source is injected. The rules the Lua
scripts implement are read from their oracle, tests/flow_oracle.py (tests/test_flow_store.py
checks the scripts against it); the convergence tests drive the learning rule against a simulated
pool in simulated time.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from producer.request import parse_request
from producer.settings import settings_error
from producer.status import Outcome
from tests.flow_oracle import (
    Breaker,
    BreakerState,
    Limit,
    Oracle,
    breaker_event_after,
    breaker_gate,
    breaker_next,
    fit,
    learn,
    record,
    slide,
    window_wait_s,
)
from worker.classify import QuotaKind
from worker.config import Limits, WorkerConfig
from worker.flow import (
    LIMIT_OUTCOMES,
    Admission,
    FlowConfig,
    breaker_event,
    defer_s,
    estimate_tokens,
    pause_after_429,
)
from worker.policy import DAILY_QUOTA_MIN_DELAY_S

CFG = FlowConfig()
#: The breaker rows are about the rules: their own failure ratio (the shipped one is 0.75).
BREAKER_CFG = FlowConfig(breaker_failure_ratio=0.5)
INF = math.inf

# -- FLEXQ_LIMITS: JSON, read by pydantic-settings --------------------------------------------------


def limits_from_env(monkeypatch: pytest.MonkeyPatch, text: str) -> dict[str, Limits]:
    monkeypatch.setenv("FLEXQ_LIMITS", text)
    return WorkerConfig().limits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", {}),
        ('{"gemini-2.5-flash": {"rpm": 1000}}', {"gemini-2.5-flash": Limits(rpm=1000)}),
        (
            '{"gemini-2.5-flash": {"rpm": 1000, "tpm": 1000000}, "gemini-2.5-pro": {"rpm": 150}}',
            {"gemini-2.5-flash": Limits(rpm=1000, tpm=1000000), "gemini-2.5-pro": Limits(rpm=150)},
        ),
        ('{"models/gemini-3-flash-preview": {"tpm": 1}}', {"gemini-3-flash-preview": Limits(tpm=1)}),
        ('{"tunedModels/my-tune": {"rpm": 2}}', {"tunedModels/my-tune": Limits(rpm=2)}),
    ],
)
def test_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch, text: str, expected: dict[str, Limits]) -> None:
    assert limits_from_env(monkeypatch, text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gemini-2.5-flash=rpm:5", "FLEXQ_LIMITS: not valid JSON"),  # the old text form
        ('{"bad model": {"rpm": 5}}', "'bad model' is not a model name"),
        ('{"m": {"qps": 5}}', "FLEXQ_LIMITS.m.qps: Extra inputs are not permitted"),
        ('{"m": {"rpm": 0}}', "FLEXQ_LIMITS.m.rpm: Input should be greater than 0"),
        ('{"m": {"rpm": -1}}', "FLEXQ_LIMITS.m.rpm: Input should be greater than 0"),
        ('{"m": {"rpm": 1.5}}', "FLEXQ_LIMITS.m.rpm: Input should be a valid integer"),
        ('{"m": {"rpm": "x"}}', "FLEXQ_LIMITS.m.rpm: Input should be a valid integer"),
        ('{"m": {"rpm": 5}, "models/m": {"tpm": 5}}', "model 'm' is given twice"),
        ('{"models/": {"rpm": 5}}', "'models/' is not a model name"),
        ('["m"]', "FLEXQ_LIMITS: Input should be a valid dictionary"),
    ],
)
def test_limits_rejected_naming_the_bad_part(monkeypatch: pytest.MonkeyPatch, text: str, message: str) -> None:
    monkeypatch.setenv("FLEXQ_LIMITS", text)
    with pytest.raises((ValidationError, SettingsError)) as info:
        WorkerConfig()
    line = settings_error(info.value, WorkerConfig)
    assert line.startswith("bad configuration: FLEXQ_LIMITS")
    assert message in line
    assert "\n" not in line


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_limit": 0.5},
        {"initial_limit": 2000.0},
        {"min_limit": 5.0, "initial_limit": 4.0},
        {"decrease_factor": 1.0},
        {"decrease_factor": 0.0},
        {"breaker_failure_ratio": 0.0},
        {"permit_ttl_s": 0.0},
        {"breaker_window_s": -1.0},
        {"poll_min_s": 2.0, "poll_max_s": 1.0},
    ],
)
def test_flow_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        FlowConfig(**kwargs)


@pytest.mark.parametrize(
    ("request_data", "expected"),
    [
        ({"model": "m", "prompt": "x" * 400}, 100 + 1024),
        ({"model": "m", "prompt": "x" * 401}, 101 + 1024),
        ({"model": "m", "prompt": "abcd", "config": {"max_output_tokens": 50}}, 1 + 50),
        ({"model": "m", "prompt": "abcd", "config": {"maxOutputTokens": 7}}, 1 + 7),
        ({"model": "m", "prompt": "abcd", "config": {"max_output_tokens": 0}}, 1 + 1024),
        ({"model": "m", "prompt": "abcd", "system_instruction": "x" * 8}, 3 + 1024),
        ({"model": "m", "contents": [{"role": "user", "parts": [{"text": "a" * 40}, {"text": "b" * 39}]}]}, 20 + 1024),
    ],
)
def test_estimate_tokens(request_data: dict[str, Any], expected: int) -> None:
    request = parse_request(request_data, max_bytes=1 << 20)
    assert estimate_tokens(request, output_tokens_default=1024) == expected


# -- the limit: capacity 503s against load-independent ones -------------------------------------


def test_flow_config_defaults() -> None:
    """The shipped tuning (FLEXQ_FLOW_* settings map onto part of it): pinned, so a change is deliberate."""
    cfg = FlowConfig()
    assert (cfg.initial_limit, cfg.min_limit, cfg.max_limit, cfg.decrease_factor) == (32.0, 1.0, 1000.0, 0.9)
    assert (cfg.poll_min_s, cfg.poll_max_s, cfg.waiter_timeout_s) == (0.2, 1.0, 30.0)
    assert (cfg.level_half_life_s, cfg.step_min_gap, cfg.step_min_llr, cfg.step_min_n) == (3.0, 0.25, 14.0, 2.0)
    assert (cfg.baseline_window, cfg.baseline_prior_n, cfg.excess_window, cfg.excess_z, cfg.blind_n) == (
        200, 50, 16, 3.0, 5.0)
    assert (cfg.raise_min_n, cfg.probe_gain, cfg.replace_ratio, cfg.replace_burst) == (5.0, 0.5, 1.5, 10.0)
    assert (cfg.shed_backoff_base_s, cfg.shed_backoff_max_s, cfg.breaker_failure_ratio) == (0.5, 2.0, 0.75)


def test_only_answers_and_503s_teach_the_limit() -> None:
    assert {Outcome.OK, Outcome.OVERLOADED} == LIMIT_OUTCOMES


def counts(rows: dict[int, tuple[float, float]], now_s: float = 100.0) -> dict[int, tuple[float, float, float]]:
    """Per-level counts as (calls, 503s), all last updated at ``now_s`` (no decay yet)."""
    return {level: (calls, sheds, now_s) for level, (calls, sheds) in rows.items()}


#: 30% of calls shed at every level from 1 to 20: load-independent shedding, no step
FLAT = {k: (10.0, 3.0) for k in range(1, 21)}
#: 30% up to level 20, then every call shed: a pool of capacity 20 beside load-independent shedding
STEP = {**FLAT, 21: (6.0, 6.0), 22: (4.0, 4.0)}


@pytest.mark.parametrize(
    ("rows", "level", "step"),
    [
        (FLAT, 20, None),  # the same rate everywhere: no step, however much data
        (STEP, 21, 20),
        (STEP, 5, 20),  # the step does not depend on where the 503 was
        ({**FLAT, 21: (1.0, 1.0)}, 21, None),  # one call above proves nothing
        ({**FLAT, 21: (6.0, 3.0)}, 21, None),  # 50% against 30%: a gap, but not enough evidence
        ({**FLAT, 21: (40.0, 28.0)}, 21, 20),  # 70%, with enough of it
        ({k: (10.0, 1.0) for k in range(1, 11)} | {k: (10.0, 2.5) for k in range(11, 21)}, 20, None),  # gap < 0.25
        ({**STEP, 23: (0.5, 0.5)}, 23, 20),
        ({1: (30.0, 0.0), 5: (8.0, 8.0)}, 5, 4),  # levels 2-4 unseen: the step is placed just below the 503s
    ],
)
def test_fit_finds_the_capacity_step(rows: dict[int, tuple[float, float]], level: int, step: int | None) -> None:
    assert fit(counts(rows), 100.0, CFG)[0] == step


def test_fit_forgets_with_time() -> None:
    levels = counts(STEP, now_s=100.0)
    assert fit(levels, 100.0, CFG)[0] == 20
    later = 100.0 + 3 * CFG.level_half_life_s  # every count at 1/8: the step is no longer significant
    assert fit(levels, later, CFG)[0] is None
    step, answered, kept = fit(levels, 100.0 + 30 * CFG.level_half_life_s, CFG)
    assert (step, answered, kept) == (None, 0.0, {})  # faded levels are dropped


def test_record_decays_the_level_before_counting() -> None:
    levels = record({}, 7, 1, 100.0, CFG)
    assert levels == {7: (1.0, 1.0, 100.0)}
    levels = record(levels, 7, 0, 100.0 + CFG.level_half_life_s, CFG)
    assert levels[7] == (1.5, 0.5, 100.0 + CFG.level_half_life_s)


def limit_state(**changes: Any) -> Limit:
    return replace(Limit.initial(CFG), **changes)


def step_of(state: Limit, shed: bool, *, level: int, in_flight: int = 20, waiting: int = 5,
            started_s: float = 99.0) -> tuple[Limit, str, int]:
    return learn(state, shed, level=level, now_s=100.0, started_s=started_s, in_flight=in_flight, waiting=waiting,
                 cfg=CFG)


#: answers at level 21, a level above a believed capacity of 20, at about the usual 503 rate
ABOVE = counts({**FLAT, 21: (5.0, 1.0)})


@pytest.mark.parametrize(
    ("state", "level", "in_flight", "waiting", "limit", "cap"),
    [
        # nothing known: slow start, +1 an answer while the limit is the bottleneck
        (limit_state(limit=8.0), 8, 8, 0, 9.0, None),
        (limit_state(limit=8.0), 1, 1, 3, 9.0, None),  # jobs in line are demand too
        (limit_state(limit=8.0), 3, 3, 0, 8.0, None),  # app-limited: no growth
        (limit_state(limit=1000.0), 10, 1000, 5, 1000.0, None),  # capped
        # at the capacity believed in: +probe_gain/limit, one level up about every other round trip
        (limit_state(limit=20.0, cap=20), 20, 20, 5, 20.025, 20),
        # one answer a level above: look one level further, believe nothing yet (calls still on their
        # way blur the step by a level now and then)
        (limit_state(limit=20.3, cap=20, levels=counts(FLAT)), 21, 21, 5, 22.0, 20),
        (limit_state(limit=20.3, cap=20, levels=counts(FLAT)), 23, 23, 5, 22.0, 20),  # never past cap + 2
        # several answers above it, shed no more often than below: the pool grew; slow-start again
        (limit_state(limit=21.0, cap=20, p_hat=0.3, levels=ABOVE), 21, 21, 5, 22.0, None),
        # ...but not if they are shed far more often there (the step holds)
        (limit_state(limit=21.0, cap=20, p_hat=0.3, levels=counts({**FLAT, 21: (6.0, 5.0)})), 21, 21, 5, 22.0, 20),
    ],
)
def test_an_answer_grows_the_limit(
    state: Limit, level: int, in_flight: int, waiting: int, limit: float, cap: int | None
) -> None:
    new, verdict, replace_it = step_of(state, False, level=level, in_flight=in_flight, waiting=waiting)
    assert (new.limit, new.cap) == (pytest.approx(limit), cap)
    assert (verdict, replace_it) == ("", 1)  # an answer's permit always goes to the next in line
    assert new.tokens == min(CFG.replace_burst, state.tokens + CFG.replace_ratio)


def test_a_503_above_a_step_in_the_counts_is_capacity() -> None:
    state = limit_state(limit=24.0, levels=counts(STEP))
    new, verdict, replace_it = step_of(state, True, level=22)
    assert (verdict, replace_it, new.cap, new.limit) == ("capacity", 0, 20, 20.0)
    assert (new.p_hat, new.p_n) == (state.p_hat, state.p_n)  # not load-independent: the baseline is untouched


def test_a_503_above_the_believed_capacity_is_capacity() -> None:
    new, verdict, replace_it = step_of(limit_state(limit=21.5, cap=20), True, level=21)
    assert (verdict, replace_it, new.limit, new.cap) == ("capacity", 0, 20.0, 20)


def test_a_load_independent_503_leaves_the_limit_and_hands_its_permit_on() -> None:
    state = limit_state(limit=20.0, cap=20, levels=counts(FLAT), p_hat=0.3, p_n=200.0, short=0.3)
    new, verdict, replace_it = step_of(state, True, level=20)
    assert (verdict, replace_it, new.limit, new.cap) == ("random", 1, 20.0, 20)
    assert new.p_hat == pytest.approx(0.3 + 0.7 / 200)
    assert new.tokens == state.tokens - 1
    dry, verdict, replace_it = step_of(replace(state, tokens=0.5), True, level=20)
    assert (verdict, replace_it, dry.limit) == ("random", 0, 20.0)  # no hand-over left: the permit waits


def test_a_jump_of_the_503_rate_with_hardly_an_answer_decreases_once() -> None:
    """A cold start above a small pool: 503s pour in at the top levels before any answer is back."""
    state = limit_state(limit=32.0, short=0.6, last_decrease_s=50.0)
    new, verdict, replace_it = step_of(state, True, level=30, in_flight=30, started_s=99.0)
    assert (verdict, replace_it, new.limit, new.last_decrease_s) == ("excess", 0, pytest.approx(27.0), 100.0)
    # a call sent before that decrease comes back shed too: the same overload event, no second decrease
    again, verdict, _ = learn(new, True, level=29, now_s=100.1, started_s=99.5, in_flight=29, waiting=5, cfg=CFG)
    assert (verdict, again.limit) == ("excess", pytest.approx(27.0))
    # with answers seen lately, the same rates are no jump but load-independent shedding
    seen = replace(state, levels=counts({k: (1.0, 0.0) for k in range(1, 11)}))
    assert step_of(seen, True, level=30)[1] == "random"
    assert step_of(seen, True, level=3)[1] == "random"


def test_the_baseline_starts_from_a_prior() -> None:
    """The first 503s of a cold start barely move the load-independent rate: they may be capacity."""
    state = replace(Limit.initial(CFG), limit=32.0)
    for level in range(21, 33):
        state, _, _ = learn(state, True, level=level, now_s=100.0, started_s=100.0, in_flight=32, waiting=0, cfg=CFG)
    assert state.p_hat <= 0.2
    assert state.limit < 32.0  # the jump was taken for excess load


def simulate_pool(
    capacity: Any, rate_503: float, *, seconds: float, seed: int = 1, cfg: FlowConfig = CFG,
    transit_s: float = 0.005, pickup_s: float = 0.02, service_s: float = 1.0, fallback_s: float = 1.0,
) -> dict[str, Any]:
    """A backlog that never runs dry, admitted the way the worker admits it, in simulated time.

    Each release hands its permit on (``learn``'s replace, plus one per whole permit the limit
    grew), and a handed-on job asks ``pickup_s`` later (arq's poll); besides, every ``fallback_s``
    the free permits are filled (jobs back from their own backoff, fresh ones). A call reaches the
    pool ``transit_s`` after its permit and is shed at once if the pool is full (``capacity(t)`` in
    service) or at random (``rate_503``), else served for an exponential time. Returns samples
    (t, limit, in service, capacity) and counts."""
    rng = random.Random(seed)
    state = Limit.initial(cfg)
    events: list[tuple[float, int, str, int, float]] = []  # (time, seq, kind, level, started)
    seq, in_flight, in_service = 0, 0, 0
    samples: list[tuple[float, float, int, int]] = []
    tally = {"ok": 0, "capacity_503": 0, "random_503": 0}

    def push(t: float, kind: str, level: int = 0, started: float = 0.0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, level, started))

    push(0.0, "fill")
    push(0.0, "sample")
    while events and events[0][0] < seconds:
        t, _, kind, level, started = heapq.heappop(events)
        if kind in ("ask", "fill"):
            room = math.floor(cfg.clamp(state.limit)) - in_flight
            for _ in range(room if kind == "fill" else min(1, room)):
                in_flight += 1
                push(t + transit_s, "arrive", in_flight, t)
            if kind == "fill":
                push(t + fallback_s, "fill")
        elif kind == "sample":
            samples.append((t, state.limit, in_service, capacity(t)))
            push(t + 0.5, "sample")
        elif kind == "arrive":
            full = in_service >= capacity(t)
            if full or rng.random() < rate_503:
                tally["capacity_503" if full else "random_503"] += 1
                push(t + transit_s, "shed", level, started)
            else:
                in_service += 1
                push(t + rng.expovariate(1 / service_s), "served", level, started)
        elif kind == "served":
            in_service -= 1
            push(t + transit_s, "ok", level, started)
        else:
            in_flight -= 1
            tally["ok"] += kind == "ok"
            before = math.floor(cfg.clamp(state.limit))
            state, _, replace_it = learn(state, kind == "shed", level=level, now_s=t, started_s=started,
                                         in_flight=in_flight + 1, waiting=10, cfg=cfg)
            for _ in range(replace_it + max(0, math.floor(cfg.clamp(state.limit)) - before)):
                push(t + pickup_s * rng.random(), "ask")
    calls = tally["ok"] + tally["capacity_503"] + tally["random_503"]
    return {"samples": samples, **tally, "calls_per_success": calls / max(1, tally["ok"])}


def mean_in_service(run: dict[str, Any], start_s: float, end_s: float) -> float:
    rows = [(served, cap) for t, _, served, cap in run["samples"] if start_s <= t < end_s]
    return sum(served for served, _ in rows) / sum(cap for _, cap in rows)


@pytest.mark.parametrize(
    ("capacity", "rate_503", "max_calls_per_success"),
    [
        # the floor is 1 / (1 - rate_503): 1, 1.43, 1.82; the rest is the price of finding the pool
        (8, 0.0, 1.15),
        (20, 0.0, 1.15),
        (8, 0.3, 1.65),
        (20, 0.3, 1.6),
        (60, 0.3, 1.65),
        (8, 0.45, 2.25),
        (20, 0.45, 2.15),
        # a large pool at peak shedding: calls still on their way blur the step over a few levels, and
        # 45% random 503s hide it more; it is found and held, at more 503s (docs/flow-control.md)
        (60, 0.45, 2.5),
    ],
)
def test_the_limit_finds_a_pool_whatever_its_random_shedding(
    capacity: int, rate_503: float, max_calls_per_success: float
) -> None:
    """A fixed pool beside load-independent shedding: the pool is kept full (the limit does not
    collapse to its floor, as AIMD does when every 503 counts), and few calls are shed for capacity."""
    run = simulate_pool(lambda _t: capacity, rate_503, seconds=120.0)
    assert mean_in_service(run, 20.0, 120.0) >= 0.9, run["samples"][-5:]
    late = [limit for t, limit, _, _ in run["samples"] if t >= 20.0]
    assert min(late) >= 0.6 * capacity
    assert run["calls_per_success"] <= max_calls_per_success, run


def test_random_shedding_alone_never_collapses_the_limit() -> None:
    """No capacity to find (a pool larger than anything asked), 30% shed at random: the limit grows
    to its maximum (a short run of 503s at the top may look like a step for a moment, never for
    long), and calls per success stay at the floor 1 / (1 - 0.3)."""
    run = simulate_pool(lambda _t: 10_000, 0.3, seconds=30.0, cfg=FlowConfig(initial_limit=32.0, max_limit=200.0))
    limits = [limit for t, limit, _, _ in run["samples"] if t >= 5.0]  # once answers are back from every level
    assert all(limit >= 0.75 * max(limits[: i + 1]) for i, limit in enumerate(limits))  # no collapse, ever
    assert limits[-1] == 200.0
    assert run["capacity_503"] == 0
    assert run["calls_per_success"] == pytest.approx(1 / 0.7, rel=0.05)


def test_the_limit_follows_a_pool_that_shrinks_and_grows() -> None:
    """The shared-pool benchmark's shape: 30% shed at random, capacity 20, then 8, then 30."""
    def capacity(t: float) -> int:
        return 20 if t < 40 else 8 if t < 80 else 30

    run = simulate_pool(capacity, 0.3, seconds=120.0)
    for start_s, end_s in ((10.0, 40.0), (50.0, 80.0), (90.0, 120.0)):
        assert mean_in_service(run, start_s, end_s) >= 0.8, (start_s, run["samples"])
    assert run["calls_per_success"] <= 1 / 0.7 + 0.25


# -- sliding windows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "cur", "prev", "now_s", "expected"),
    [
        (10, (3.0, 1.0), (5.0, 5.0), 105.0, (10, (3.0, 1.0), (5.0, 5.0), 0.5)),  # same window
        (10, (3.0, 1.0), (5.0, 5.0), 112.5, (11, (0.0, 0.0), (3.0, 1.0), 0.75)),  # next: current -> previous
        (10, (3.0, 1.0), (5.0, 5.0), 125.0, (12, (0.0, 0.0), (0.0, 0.0), 0.5)),  # two later: all gone
        (10, (3.0, 1.0), (5.0, 5.0), 99.0, (10, (3.0, 1.0), (5.0, 5.0), 1.0)),  # clock behind: clamp
        (0, (0.0, 0.0), (0.0, 0.0), 100.0, (10, (0.0, 0.0), (0.0, 0.0), 1.0)),  # fresh
    ],
)
def test_slide(index: int, cur: Any, prev: Any, now_s: float, expected: Any) -> None:
    assert slide(index, cur, prev, now_s, 10.0) == expected


@pytest.mark.parametrize(
    ("cur", "prev", "weight", "limit", "cost", "expected"),
    [
        (0.0, 0.0, 1.0, 10.0, 1.0, 0.0),
        (9.0, 0.0, 0.5, 10.0, 1.0, 0.0),  # exactly fits
        (10.0, 0.0, 0.5, 10.0, 1.0, 30.0 + 6.0),  # full: next window, once 10% of it has passed
        (4.0, 10.0, 0.5, 10.0, 1.0, 0.5 * 60 - 0.5 * 60),  # 5 + 4 + 1 fits now
        (4.0, 10.0, 0.75, 10.0, 1.0, (0.75 - 0.5) * 60),  # wait until prev's weight is 0.5
        (0.0, 0.0, 1.0, 100.0, 500.0, 0.0),  # one request above the whole limit runs alone
        (1.0, 0.0, 1.0, 100.0, 500.0, 120.0),  # ...but not beside another: once the window is empty
    ],
)
def test_window_wait_s(cur: float, prev: float, weight: float, limit: float, cost: float, expected: float) -> None:
    assert window_wait_s(cur, prev, weight, limit=limit, cost=cost, window_s=60.0) == pytest.approx(expected)


# -- circuit breaker -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "event"),
    [
        (Outcome.OK, "success"),
        (Outcome.CLIENT_ERROR, "success"),
        (Outcome.BLOCKED, "success"),
        (Outcome.OVERLOADED, "failure"),
        (Outcome.SERVER_ERROR, "failure"),
        (Outcome.TIMEOUT, "failure"),
        (Outcome.CONNECTION_ERROR, "failure"),
        (Outcome.RATE_LIMITED, "neutral"),
        (Outcome.INTERRUPTED, "neutral"),
        (None, "neutral"),
    ],
)
def test_breaker_event(outcome: Outcome | None, event: str) -> None:
    assert breaker_event(outcome) == event  # the default; release.lua decides a 503's (below)


@pytest.mark.parametrize(
    ("outcome", "verdict", "limit", "event"),
    [
        # a 503 the limit handles (capacity, or a jump of the 503 rate) is no verdict on the service...
        ("overloaded", "capacity", 14.0, "neutral"),
        ("overloaded", "excess", 1.01, "neutral"),
        # ...until the limit is at its floor: the pool refuses even that much
        ("overloaded", "capacity", 1.0, "failure"),
        ("overloaded", "excess", 1.0, "failure"),
        # a load-independent 503 is the service failing that call: a failure (a total outage opens it)
        ("overloaded", "random", 14.0, "failure"),
        # the other outcomes: as breaker_event says, whatever the limit
        ("server_error", "", 14.0, "failure"),
        ("timeout", "", 14.0, "failure"),
        ("ok", "", 1.0, "success"),
        ("client_error", "", 14.0, "success"),
        ("rate_limited", "", 1.0, "neutral"),
        (None, "", 1.0, "neutral"),
    ],
)
def test_breaker_event_after_the_limit_learned(outcome: str | None, verdict: str, limit: float, event: str) -> None:
    assert breaker_event_after(outcome, verdict, limit, CFG) == event


def test_random_503s_at_peak_rates_leave_the_breaker_closed() -> None:
    """45% of calls shed at random (the peak the sources report), 20 in flight: below the shipped
    ratio, so the breaker stays closed; a total outage (every call shed) opens it."""
    rng = random.Random(7)
    state = BreakerState()
    for i in range(2000):
        event = "failure" if rng.random() < 0.45 else "success"
        state = breaker_next(state, event, probe=False, now_s=100.0 + i * 0.05, cfg=CFG, in_flight=20)
    assert state.state == Breaker.CLOSED
    for i in range(400):  # then every call shed, as fast as they come back
        state = breaker_next(state, "failure", probe=False, now_s=200.0 + i * 0.025, cfg=CFG, in_flight=0)
        if state.state == Breaker.OPEN:
            break
    assert state.state == Breaker.OPEN
    assert state.since_s <= 200.0 + CFG.breaker_window_s  # within one window of the outage


def test_calls_in_flight_count_as_not_failed() -> None:
    """A cold start: 20 calls come back shed at once while 25 are still being served."""
    burst = [("failure", 100.0 + i * 0.001) for i in range(20)]
    assert run_events(BreakerState(), burst, in_flight=0).state == Breaker.OPEN
    assert run_events(BreakerState(), burst, in_flight=25).state == Breaker.CLOSED  # 20 < 0.5 x (20 + 25)


def run_events(
    state: BreakerState, events: list[tuple[str, float]], *, probe: bool = False, in_flight: int = 0
) -> BreakerState:
    for event, now_s in events:
        state = breaker_next(state, event, probe=probe, now_s=now_s, cfg=BREAKER_CFG, in_flight=in_flight)  # type: ignore[arg-type]
    return state


def test_breaker_opens_on_a_burst_of_failures() -> None:
    state = run_events(BreakerState(), [("failure", 100.0 + i * 0.1) for i in range(20)])
    assert (state.state, state.opens, state.window, state.failed) == (Breaker.OPEN, 1, 0, 0.0)
    assert (state.since_s, state.open_until_s) == pytest.approx((101.9, 111.9))


@pytest.mark.parametrize(
    ("events", "state"),
    [
        ([("failure", 100.0)] * 19, Breaker.CLOSED),  # below min failures
        ([("success", 100.0)] * 21 + [("failure", 100.5)] * 20, Breaker.CLOSED),  # 20/41 < 50%
        ([("success", 100.0)] * 20 + [("failure", 100.5)] * 20, Breaker.OPEN),  # 20/40 = 50%
        ([("success", 100.0)] * 100 + [("failure", 100.5)] * 20, Breaker.CLOSED),  # 503s at the edge
        ([("failure", 95.0)] * 10 + [("failure", 105.0)] * 10, Breaker.CLOSED),  # 10 + 10 * 0.5 = 15 < 20
        ([("failure", 99.5)] * 10 + [("failure", 100.5)] * 10, Breaker.CLOSED),  # 10 + 10 * 0.95 = 19.5
        ([("failure", 100.0)] * 10 + [("failure", 100.5)] * 10, Breaker.OPEN),  # 20 in one window
        ([("failure", 80.0)] * 19 + [("failure", 101.0)], Breaker.CLOSED),  # old failures slid out
        ([("neutral", 100.0)] * 50, Breaker.CLOSED),  # 429s and interruptions are no verdict
    ],
)
def test_breaker_window(events: list[tuple[str, float]], state: Breaker) -> None:
    assert run_events(BreakerState(), events).state == state


def test_breaker_window_weights_the_previous_window() -> None:
    # 10 failures at t=99 (window 9), 10 at t=101 (window 10, weight 0.9): 19 in the sliding window
    state = run_events(BreakerState(), [("failure", 99.0)] * 10 + [("failure", 101.0)] * 9)
    assert (state.state, state.window, state.failed, state.prev_failed) == (Breaker.CLOSED, 10, 9, 10)
    assert run_events(state, [("failure", 101.0)]).state == Breaker.CLOSED  # 10 + 10 * 0.9 = 19
    assert run_events(state, [("failure", 101.0)] * 2).state == Breaker.OPEN  # 11 + 9 = 20


OPEN = BreakerState(Breaker.OPEN, since_s=100.0, open_until_s=110.0, opens=1)
HALF = BreakerState(Breaker.HALF_OPEN, since_s=110.0, opens=1, probe_until_s=170.0)


@pytest.mark.parametrize(
    ("state", "now_s", "gate", "wait_s", "after"),
    [
        (BreakerState(), 5.0, "pass", 0.0, BreakerState()),
        (OPEN, 104.0, "circuit_open", 6.0, OPEN),
        (OPEN, 110.0, "probe", 0.0, BreakerState(Breaker.HALF_OPEN, since_s=110.0, open_until_s=110.0, opens=1)),
        (HALF, 120.0, "probe_busy", 0.0, HALF),  # one probe at a time
        (HALF, 170.0, "probe", 0.0, HALF),  # the probe's lease lapsed (its worker died): probe again
        (replace(HALF, probe_until_s=0.0), 120.0, "probe", 0.0, replace(HALF, probe_until_s=0.0)),
    ],
)
def test_breaker_gate(state: BreakerState, now_s: float, gate: str, wait_s: float, after: BreakerState) -> None:
    assert breaker_gate(state, now_s) == (after, gate, pytest.approx(wait_s))


@pytest.mark.parametrize(
    ("state", "event", "probe", "expected"),
    [
        (OPEN, "failure", False, OPEN),  # stragglers sent before it opened: ignored
        (OPEN, "success", False, OPEN),
        (HALF, "failure", False, HALF),  # not the probe: ignored
        (HALF, "success", False, HALF),
        (HALF, "success", True, BreakerState(Breaker.CLOSED, since_s=120.0)),  # probe ok: closed, opens reset
        (HALF, "failure", True, BreakerState(Breaker.OPEN, since_s=120.0, open_until_s=140.0, opens=2)),  # x2
        (HALF, "neutral", True, replace(HALF, probe_until_s=0.0)),  # no verdict: free the probe slot
        (replace(HALF, opens=8), "failure", True, BreakerState(Breaker.OPEN, 120.0, 420.0, 9)),  # capped
    ],
)
def test_breaker_next_when_not_closed(state: BreakerState, event: Any, probe: bool, expected: BreakerState) -> None:
    assert breaker_next(state, event, probe=probe, now_s=120.0, cfg=BREAKER_CFG) == expected


def test_breaker_full_cycle() -> None:
    state = run_events(BreakerState(), [("failure", 100.0)] * 20)
    assert (state.state, state.open_until_s) == (Breaker.OPEN, 110.0)
    state, gate, _ = breaker_gate(state, 110.0)
    assert (state.state, gate) == (Breaker.HALF_OPEN, "probe")
    state = breaker_next(replace(state, probe_until_s=170.0), "failure", probe=True, now_s=111.0, cfg=BREAKER_CFG)
    assert (state.state, state.open_until_s, state.opens) == (Breaker.OPEN, 131.0, 2)
    assert breaker_gate(state, 130.0)[1] == "circuit_open"
    state, gate, _ = breaker_gate(state, 131.0)
    state = breaker_next(replace(state, probe_until_s=191.0), "success", probe=True, now_s=132.0, cfg=BREAKER_CFG)
    assert state == BreakerState(Breaker.CLOSED, since_s=132.0)
    state = run_events(state, [("failure", 140.0)] * 20)
    assert state.open_until_s == 150.0  # opens were reset by the close: base cool-down again


# -- 429 pauses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after_s", "quota", "expected"),
    [
        (59.0, QuotaKind.PER_MINUTE, (60.0, None)),  # RetryInfo is truncated: +1 s
        (None, QuotaKind.PER_MINUTE, (10.0, None)),  # no RetryInfo: the default pause
        (0.0, None, (1.0, None)),
        (59.0, QuotaKind.PER_DAY, (DAILY_QUOTA_MIN_DELAY_S, QuotaKind.PER_DAY)),
        (7200.0, QuotaKind.PER_DAY, (7201.0, QuotaKind.PER_DAY)),
        (None, QuotaKind.BILLING, (600.0, QuotaKind.BILLING)),
        (None, "billing", (600.0, QuotaKind.BILLING)),
    ],
)
def test_pause_after_429(retry_after_s: float | None, quota: Any, expected: tuple[float, Any]) -> None:
    assert pause_after_429(retry_after_s, quota, CFG) == expected


# -- admission -------------------------------------------------------------------------------------


def oracle_with(*, held: int = 3, limit: float = 8.6, paused_until_s: float = 0.0,
                breaker: BreakerState | None = None) -> Oracle:
    oracle = Oracle(FlowConfig(max_limit=1000.0))
    oracle.control = replace(oracle.control, limit=limit)
    oracle.holders = {f"h{i}": 1000.0 for i in range(held)}
    oracle.paused_until_s = paused_until_s
    oracle.breaker = breaker or BreakerState()
    return oracle


@pytest.mark.parametrize(
    ("changes", "now_s", "admitted", "reason", "wait_s", "probe"),
    [
        ({}, 100.0, True, "ok", 0.0, False),
        ({"held": 7}, 100.0, True, "ok", 0.0, False),
        ({"held": 8}, 100.0, False, "no_permit", 0.0, False),  # floor(8.6) permits
        ({"limit": 0.2, "held": 0}, 100.0, True, "ok", 0.0, False),  # min_limit: never starved
        ({"limit": 5000.0, "held": 1000}, 100.0, False, "no_permit", 0.0, False),  # max_limit
        ({"paused_until_s": 130.0}, 100.0, False, "paused", 30.0, False),
        ({"paused_until_s": 100.0}, 100.0, True, "ok", 0.0, False),
        ({"breaker": OPEN}, 104.0, False, "circuit_open", 6.0, False),
        ({"breaker": OPEN}, 110.0, True, "ok", 0.0, True),
        ({"breaker": HALF}, 120.0, False, "probe_busy", 0.0, False),
        # order: pause, breaker, permit
        ({"paused_until_s": 130.0, "breaker": OPEN, "held": 9}, 100.0, False, "paused", 30.0, False),
        ({"breaker": OPEN, "held": 9}, 104.0, False, "circuit_open", 6.0, False),
        ({"breaker": OPEN, "held": 9}, 110.0, False, "no_permit", 0.0, False),  # the probe needs a permit
    ],
)
def test_admit(
    changes: dict[str, Any], now_s: float, admitted: bool, reason: str, wait_s: float, probe: bool
) -> None:
    got = oracle_with(**changes).acquire("job", now_s)
    assert (got.admitted, got.reason, got.probe) == (admitted, reason, probe)
    assert got.wait_s == pytest.approx(wait_s)


def test_admit_as_probe_claims_the_probe_slot() -> None:
    oracle = oracle_with(breaker=OPEN)
    assert oracle.acquire("job", 110.0).probe
    after = oracle.breaker
    assert (after.state, after.since_s, after.probe_until_s) == (Breaker.HALF_OPEN, 110.0, 170.0)
    full = oracle_with(breaker=OPEN, held=9)
    assert not full.acquire("job", 110.0).admitted
    assert (full.breaker.state, full.breaker.probe_until_s) == (Breaker.HALF_OPEN, 0.0)  # no probe claimed


def test_the_line_is_ordered_by_the_jobs_age() -> None:
    """A job shed and asking again keeps its place: the line is ordered by enqueue time, not by
    when the job last asked."""
    oracle = oracle_with(held=8, limit=8.0)
    for job, since_s in (("young", 90.0), ("old", 10.0), ("middle", 50.0)):
        assert oracle.acquire(job, 100.0, since_s=since_s).reason == "no_permit"
    assert [job for job, _ in oracle.line()] == ["old", "middle", "young"]


@pytest.mark.parametrize(
    ("admission", "r", "expected"),
    [
        # no permit: the job waits in line and a release wakes it; this is only the fallback
        (Admission(False, "no_permit"), 0.0, 10.0),
        (Admission(False, "no_permit"), 0.5, 10.5),
        (Admission(False, "no_permit"), 1.0, 11.0),
        # the half-open probe slot is busy: poll, uniform in [poll_min_s, poll_max_s]
        (Admission(False, "probe_busy"), 0.0, 0.2),
        (Admission(False, "probe_busy"), 0.5, 0.6),
        (Admission(False, "probe_busy"), 1.0, 1.0),
        # a known wait: it, + up to 10%, + the poll jitter
        (Admission(False, "paused", 60.0), 0.0, 60.2),
        (Admission(False, "paused", 60.0), 1.0, 60.0 * 1.1 + 1.0),
        (Admission(False, "circuit_open", 10.0), 0.5, 10.5 + 0.6),
        (Admission(False, "rpm", 0.25), 0.0, 0.45),
        (Admission(False, "tpm", 2.0), 0.5, 2.1 + 0.6),
    ],
)
def test_defer_s(admission: Admission, r: float, expected: float) -> None:
    cfg = FlowConfig(poll_min_s=0.2, poll_max_s=1.0, waiter_timeout_s=10.0)
    assert defer_s(admission, cfg, lambda: r) == pytest.approx(expected)


def test_defer_s_no_permit_follows_waiter_timeout() -> None:
    cfg = FlowConfig(waiter_timeout_s=3.0, poll_min_s=0.0, poll_max_s=0.0)
    assert defer_s(Admission(False, "no_permit"), cfg, lambda: 0.25) == pytest.approx(3.075)
