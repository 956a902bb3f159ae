"""worker.flow as truth tables: limits parsing, AIMD, sliding windows, breaker, 429 pauses, admission.

No Redis, no clock: ``now_s`` is an argument and the random source is injected. The AIMD
convergence test simulates a server of fixed capacity in simulated time.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import replace
from typing import Any

import pytest

from producer.errors import ConfigError
from producer.models import Outcome, parse_request
from worker.flow import (
    AIMD_EVENTS,
    Admission,
    AimdState,
    Breaker,
    BreakerState,
    FlowConfig,
    Limits,
    LimitsError,
    admit,
    aimd_next,
    breaker_event,
    breaker_gate,
    breaker_next,
    defer_s,
    estimate_tokens,
    parse_limits,
    pause_after_429,
    slide,
    window_wait_s,
)
from worker.policy import DAILY_QUOTA_MIN_DELAY_S, QuotaKind

CFG = FlowConfig()
INF = math.inf

# -- FLEXQ_LIMITS ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("  ;  ", {}),
        ("gemini-2.5-flash=rpm:1000", {"gemini-2.5-flash": Limits(rpm=1000)}),
        (
            "gemini-2.5-flash=rpm:1000,tpm:1000000;gemini-2.5-pro=rpm:150",
            {"gemini-2.5-flash": Limits(rpm=1000, tpm=1000000), "gemini-2.5-pro": Limits(rpm=150)},
        ),
        (" gemini-2.5-pro = TPM : 5 , RPM:7 ; ", {"gemini-2.5-pro": Limits(rpm=7, tpm=5)}),
        ("models/gemini-3-flash-preview=tpm:1", {"gemini-3-flash-preview": Limits(tpm=1)}),
        ("tunedModels/my-tune=rpm:2", {"tunedModels/my-tune": Limits(rpm=2)}),
    ],
)
def test_parse_limits(text: str, expected: dict[str, Limits]) -> None:
    assert parse_limits(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gemini-2.5-flash", "'gemini-2.5-flash': expected MODEL=rpm:N,tpm:N"),
        ("=rpm:5", "'=rpm:5': expected MODEL=rpm:N,tpm:N"),
        ("bad model=rpm:5", "'bad model=rpm:5': expected MODEL"),
        ("m=", "m: '': unknown limit"),
        ("m=qps:5", "m: 'qps:5': unknown limit (use rpm:N or tpm:N)"),
        ("m=rpm", "m: 'rpm': the value must be a positive integer"),
        ("m=rpm:0", "m: 'rpm:0': the value must be a positive integer"),
        ("m=rpm:-1", "m: 'rpm:-1': the value must be a positive integer"),
        ("m=rpm:1.5", "m: 'rpm:1.5': the value must be a positive integer"),
        ("m=rpm:1e3", "m: 'rpm:1e3': the value must be a positive integer"),
        ("m=rpm:5,", "m: '': unknown limit"),
        ("m=rpm:5,rpm:6", "m: rpm is given twice"),
        ("m=rpm:5;m=tpm:5", "model 'm' is given twice"),
        ("m=rpm:5;models/m=tpm:5", "model 'models/m' is given twice"),
        ("models/=rpm:5", "'models/=rpm:5': expected MODEL"),
        ("a=rpm:5;b=rpm:x", "b: 'rpm:x': the value must be a positive integer"),
    ],
)
def test_parse_limits_rejects_naming_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(LimitsError) as info:
        parse_limits(text)
    assert str(info.value) == f"FLEXQ_LIMITS: {message}" or message in str(info.value)
    assert str(info.value).startswith("FLEXQ_LIMITS: ")
    assert isinstance(info.value, ValueError)  # pydantic validators wrap it
    assert isinstance(info.value, ConfigError)


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


# -- AIMD ------------------------------------------------------------------------------------------

#: The AIMD rows are about the rules, not the tuning: their own beta and decrease interval.
AIMD_CFG = FlowConfig(initial_limit=8.0, decrease_factor=0.7, decrease_interval_s=2.0)


def test_flow_config_defaults() -> None:
    """The shipped tuning (FLEXQ_FLOW_* defaults map onto it): pinned, so a change is deliberate."""
    cfg = FlowConfig()
    assert (cfg.initial_limit, cfg.min_limit, cfg.max_limit) == (32.0, 1.0, 1000.0)
    assert (cfg.decrease_factor, cfg.decrease_interval_s) == (0.9, 0.5)
    assert (cfg.poll_min_s, cfg.poll_max_s, cfg.waiter_timeout_s) == (0.2, 1.0, 10.0)


@pytest.mark.parametrize(
    ("state", "event", "now_s", "started_s", "in_flight", "expected"),
    [
        # slow start (limit < ssthresh): +1 per success
        (AimdState(8.0), "ok", 100.0, 99.0, 8, AimdState(9.0)),
        # congestion avoidance: +1/limit per success, i.e. +1 per window of successes
        (AimdState(10.0, 10.0, 50.0), "ok", 100.0, 99.0, 10, AimdState(10.1, 10.0, 50.0)),
        (AimdState(10.0, 10.0, 50.0), "ok", 100.0, 99.0, 5, AimdState(10.1, 10.0, 50.0)),
        # app-limited (in_flight < limit/2, nobody waiting): the window is not the bottleneck, no growth
        (AimdState(10.0, 10.0, 50.0), "ok", 100.0, 99.0, 4, AimdState(10.0, 10.0, 50.0)),
        (AimdState(8.0), "ok", 100.0, 99.0, 3, AimdState(8.0)),
        # capped at max_limit
        (AimdState(1000.0), "ok", 100.0, 99.0, 1000, AimdState(1000.0)),
        (AimdState(999.5), "ok", 100.0, 99.0, 1000, AimdState(1000.0)),
        # a stale limit above max_limit is clamped first
        (AimdState(5000.0), "ok", 100.0, 99.0, 1, AimdState(1000.0)),
        # 503: x0.7 (this config's beta), ssthresh follows, the decrease time is remembered
        (AimdState(20.0), "overloaded", 100.0, 99.0, 20, AimdState(14.0, 14.0, 100.0)),
        (AimdState(20.0, 25.0, 97.9), "overloaded", 100.0, 99.0, 20, AimdState(14.0, 14.0, 100.0)),
        # ...from what was really in flight (TCP: cwnd = min(cwnd, flight) x beta)
        (AimdState(40.0), "overloaded", 100.0, 99.0, 10, AimdState(7.0, 7.0, 100.0)),
        (AimdState(40.0, 40.0, 50.0), "overloaded", 100.0, 99.0, 1, AimdState(1.0, 1.0, 100.0)),
        # ...but never from more than the limit (lapsed permits still answering count in flight)
        (AimdState(10.0), "overloaded", 100.0, 99.0, 12, AimdState(7.0, 7.0, 100.0)),
        # ...at most once per decrease_interval_s (2 s here)
        (AimdState(14.0, 14.0, 99.0), "overloaded", 100.0, 99.5, 14, AimdState(14.0, 14.0, 99.0)),
        (AimdState(14.0, 14.0, 98.0), "overloaded", 100.0, 99.5, 14, AimdState(9.8, 9.8, 100.0)),
        # ...and never for a request admitted before the last decrease (same overload event)
        (AimdState(14.0, 14.0, 90.0), "overloaded", 100.0, 89.0, 14, AimdState(14.0, 14.0, 90.0)),
        (AimdState(14.0, 14.0, 90.0), "overloaded", 100.0, 90.0, 14, AimdState(9.8, 9.8, 100.0)),
        # floored at min_limit
        (AimdState(1.2), "overloaded", 100.0, 99.0, 1, AimdState(1.0, 1.0, 100.0)),
    ],
)
def test_aimd_next(
    state: AimdState, event: Any, now_s: float, started_s: float, in_flight: int, expected: AimdState
) -> None:
    got = aimd_next(state, event, now_s=now_s, started_s=started_s, in_flight=in_flight, cfg=AIMD_CFG)
    assert got.limit == pytest.approx(expected.limit)
    assert (got.ssthresh, got.last_decrease_s) == pytest.approx((expected.ssthresh, expected.last_decrease_s))


@pytest.mark.parametrize(
    ("state", "event", "in_flight", "waiting", "expected"),
    [
        # jobs in line for a permit are demand: grow even when few permits are held
        (AimdState(10.0, 10.0, 50.0), "ok", 4, 1, AimdState(10.1, 10.0, 50.0)),
        (AimdState(10.0, 10.0, 50.0), "ok", 1, 30, AimdState(10.1, 10.0, 50.0)),  # +1/limit, however many
        (AimdState(8.0), "ok", 1, 3, AimdState(9.0)),  # slow start: +1
        (AimdState(8.0), "ok", 1, 0, AimdState(8.0)),  # the same without waiters: app-limited
        (AimdState(1000.0), "ok", 1, 5, AimdState(1000.0)),  # still capped
        # waiters never soften a decrease
        (AimdState(20.0), "overloaded", 20, 50, AimdState(14.0, 14.0, 100.0)),
        (AimdState(14.0, 14.0, 99.0), "overloaded", 14, 50, AimdState(14.0, 14.0, 99.0)),
    ],
)
def test_aimd_next_grows_while_jobs_wait(
    state: AimdState, event: Any, in_flight: int, waiting: int, expected: AimdState
) -> None:
    got = aimd_next(state, event, now_s=100.0, started_s=99.5, in_flight=in_flight, waiting=waiting, cfg=AIMD_CFG)
    assert got.limit == pytest.approx(expected.limit)
    assert (got.ssthresh, got.last_decrease_s) == pytest.approx((expected.ssthresh, expected.last_decrease_s))


def test_aimd_burst_of_503s_decreases_once() -> None:
    cfg = FlowConfig(initial_limit=30.0, decrease_factor=0.7, decrease_interval_s=0.5)
    state = AimdState(30.0)
    # one overload event: 30 requests sent at t=10 all answer 503 over 1.5 s (longer than the
    # decrease interval): the first decreases, the rest were sent before that decrease
    for i in range(30):
        state = aimd_next(state, "overloaded", now_s=10.2 + i * 0.05, started_s=10.0, in_flight=30 - i, cfg=cfg)
    assert (state.limit, state.last_decrease_s) == pytest.approx((21.0, 10.2))
    # a request sent after the decrease, answered after the interval: the next event, from its flight
    state = aimd_next(state, "overloaded", now_s=12.0, started_s=11.0, in_flight=10, cfg=cfg)
    assert (state.limit, state.ssthresh) == pytest.approx((7.0, 7.0))


def test_only_503_and_ok_move_the_window() -> None:
    assert dict(AIMD_EVENTS) == {Outcome.OK: "ok", Outcome.OVERLOADED: "overloaded"}


def simulate_capacity(
    capacity: int, *, seconds: float, cfg: FlowConfig, dt_s: float = 0.05, latency_s: float = 1.0
) -> dict[str, Any]:
    """A server that answers ``capacity`` concurrent requests (latency_s each) and 503s the rest at once;
    a client that keeps as many requests in flight as the AIMD limit allows. Simulated time.
    ``samples``: (time, limit, permits the limit grants: floor(limit))."""
    state = AimdState(cfg.initial_limit)
    ends: list[tuple[float, int, str, float]] = []  # (end, seq, outcome, started)
    serving, seq, now = 0, 0, 0.0
    samples: list[tuple[float, float, int]] = []
    counts = {"ok": 0, "overloaded": 0, "decreases": 0}
    while now < seconds:
        while ends and ends[0][0] <= now:
            end, _, outcome, started = heapq.heappop(ends)
            before = state.last_decrease_s
            state = aimd_next(state, outcome, now_s=end, started_s=started, in_flight=len(ends) + 1, cfg=cfg)  # type: ignore[arg-type]
            counts[outcome] += 1
            counts["decreases"] += state.last_decrease_s != before
            serving -= outcome == "ok"
        while len(ends) < math.floor(cfg.clamp(state.limit)):  # admit while a permit is free
            seq += 1
            if serving < capacity:
                serving += 1
                heapq.heappush(ends, (now + latency_s, seq, "ok", now))
            else:
                heapq.heappush(ends, (now + dt_s, seq, "overloaded", now))
        samples.append((now, state.limit, math.floor(cfg.clamp(state.limit))))
        now = round(now + dt_s, 6)
    return {"samples": samples, **counts}


#: The shipped beta and interval (gentle: 0.9 every 0.5 s), and the classic harsher ones (0.7 every 2 s).
SIM_CONFIGS = {
    "default": FlowConfig(initial_limit=4.0),
    "harsh": FlowConfig(initial_limit=4.0, decrease_factor=0.7, decrease_interval_s=2.0),
}


@pytest.mark.parametrize("tuning", sorted(SIM_CONFIGS))
@pytest.mark.parametrize("capacity", [5, 20, 120])
def test_aimd_converges_to_the_capacity_of_the_server(capacity: int, tuning: str) -> None:
    run = simulate_capacity(capacity, seconds=240.0, cfg=SIM_CONFIGS[tuning])
    late = [(limit, permits) for t, limit, permits in run["samples"] if t >= 120.0]
    assert min(limit for limit, _ in late) >= 0.6 * capacity  # never collapses
    assert max(limit for limit, _ in late) <= capacity + 2  # never runs away: a 503 follows each probe above capacity
    # the permits the limit grants (floor(limit): a limit of 5.7 runs 5 at once) average out near the capacity
    mean = sum(permits for _, permits in late) / len(late)
    assert 0.75 * capacity <= mean <= 1.05 * capacity, mean
    assert run["decreases"] >= 2  # it keeps probing: the limit oscillates around the capacity
    assert run["overloaded"] <= 0.15 * run["ok"]  # the price of probing: ~1 fast 503 per sawtooth


@pytest.mark.parametrize("capacity", [5, 20, 120])
def test_aimd_gentle_default_beta_stays_close_to_the_capacity(capacity: int) -> None:
    """0.9 from what is in flight: the sawtooth stays within ~10% of the capacity."""
    run = simulate_capacity(capacity, seconds=240.0, cfg=SIM_CONFIGS["default"])
    late = [permits for t, _, permits in run["samples"] if t >= 120.0]
    assert min(late) >= math.floor(0.88 * capacity)
    assert sum(late) / len(late) >= 0.9 * capacity


def test_aimd_from_the_default_initial_limit_comes_down_to_a_small_capacity() -> None:
    """The default start (32) above a server of capacity 5: one decrease per interval, each from
    what is in flight, brings the limit down within seconds, and it stays there."""
    run = simulate_capacity(5, seconds=60.0, cfg=FlowConfig())
    assert run["samples"][0][1] == 32.0
    settled_s = next(t for t, limit, _ in run["samples"] if limit < 7)
    assert settled_s <= 12.0, settled_s
    assert max(limit for t, limit, _ in run["samples"] if t >= settled_s) <= 7


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
    assert breaker_event(outcome) == event  # without the limit: a 503 is a failure


@pytest.mark.parametrize(
    ("outcome", "limit", "min_limit", "event"),
    [
        # a 503 is a capacity signal while AIMD can still shrink the limit: no verdict on the service
        (Outcome.OVERLOADED, 14.0, 1.0, "neutral"),
        (Outcome.OVERLOADED, 1.01, 1.0, "neutral"),
        # ...and a failure once the limit (after this outcome's AIMD step) is at its floor
        (Outcome.OVERLOADED, 1.0, 1.0, "failure"),
        (Outcome.OVERLOADED, 4.0, 4.0, "failure"),
        (Outcome.OVERLOADED, 4.5, 4.0, "neutral"),
        # the other failures count whatever the limit
        (Outcome.SERVER_ERROR, 14.0, 1.0, "failure"),
        (Outcome.TIMEOUT, 14.0, 1.0, "failure"),
        (Outcome.CONNECTION_ERROR, 14.0, 1.0, "failure"),
        (Outcome.OK, 1.0, 1.0, "success"),
        (Outcome.CLIENT_ERROR, 14.0, 1.0, "success"),
        (Outcome.RATE_LIMITED, 1.0, 1.0, "neutral"),
        (None, 1.0, 1.0, "neutral"),
    ],
)
def test_breaker_event_with_the_limit(outcome: Outcome | None, limit: float, min_limit: float, event: str) -> None:
    assert breaker_event(outcome, limit=limit, min_limit=min_limit) == event


def test_a_burst_of_503s_above_the_floor_shrinks_the_limit_and_leaves_the_breaker_closed() -> None:
    """The AIMD and breaker reactions to one outcome, in the order the store applies them."""
    cfg = FlowConfig(initial_limit=40.0, breaker_min_failures=20)
    aimd, breaker = AimdState(cfg.initial_limit), BreakerState()
    for i in range(100):  # 100 x 503 over 10 s, a new overload event every 0.5 s
        now_s = 100.0 + i * 0.1
        aimd = aimd_next(aimd, "overloaded", now_s=now_s, started_s=now_s - 0.1, in_flight=40, cfg=cfg)
        event = breaker_event(Outcome.OVERLOADED, limit=aimd.limit, min_limit=cfg.min_limit)
        breaker = breaker_next(breaker, event, probe=False, now_s=now_s, cfg=cfg)
    assert aimd.limit == pytest.approx(40.0 * 0.9**20)  # 20 decreases: 40 -> 4.86
    assert breaker == BreakerState()  # not even counted


def test_503s_open_the_breaker_once_the_limit_is_at_its_floor() -> None:
    cfg = FlowConfig(initial_limit=1.0, min_limit=1.0, max_limit=10.0, breaker_min_failures=20)
    aimd, breaker = AimdState(cfg.initial_limit), BreakerState()
    for i in range(20):
        now_s = 100.0 + i * 0.1
        aimd = aimd_next(aimd, "overloaded", now_s=now_s, started_s=now_s - 0.1, in_flight=1, cfg=cfg)
        event = breaker_event(Outcome.OVERLOADED, limit=aimd.limit, min_limit=cfg.min_limit)
        assert event == "failure"
        breaker = breaker_next(breaker, event, probe=False, now_s=now_s, cfg=cfg)
    assert aimd.limit == 1.0
    assert (breaker.state, breaker.opens) == (Breaker.OPEN, 1)


def run_events(state: BreakerState, events: list[tuple[str, float]], *, probe: bool = False) -> BreakerState:
    for event, now_s in events:
        state = breaker_next(state, event, probe=probe, now_s=now_s, cfg=CFG)  # type: ignore[arg-type]
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
    assert breaker_next(state, event, probe=probe, now_s=120.0, cfg=CFG) == expected


def test_breaker_full_cycle() -> None:
    state = run_events(BreakerState(), [("failure", 100.0)] * 20)
    assert (state.state, state.open_until_s) == (Breaker.OPEN, 110.0)
    state, gate, _ = breaker_gate(state, 110.0)
    assert (state.state, gate) == (Breaker.HALF_OPEN, "probe")
    state = breaker_next(replace(state, probe_until_s=170.0), "failure", probe=True, now_s=111.0, cfg=CFG)
    assert (state.state, state.open_until_s, state.opens) == (Breaker.OPEN, 131.0, 2)
    assert breaker_gate(state, 130.0)[1] == "circuit_open"
    state, gate, _ = breaker_gate(state, 131.0)
    state = breaker_next(replace(state, probe_until_s=191.0), "success", probe=True, now_s=132.0, cfg=CFG)
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

BASE: dict[str, Any] = {
    "now_s": 100.0, "paused_until_s": 0.0, "breaker": BreakerState(), "rpm_wait_s": 0.0, "tpm_wait_s": 0.0,
    "in_flight": 3, "limit": 8.6,
}


@pytest.mark.parametrize(
    ("changes", "admitted", "reason", "wait_s", "probe"),
    [
        ({}, True, "ok", 0.0, False),
        ({"in_flight": 7}, True, "ok", 0.0, False),
        ({"in_flight": 8}, False, "no_permit", 0.0, False),  # floor(8.6) permits
        ({"limit": 0.2, "in_flight": 0}, True, "ok", 0.0, False),  # min_limit: never starved
        ({"limit": 5000.0, "in_flight": 1000}, False, "no_permit", 0.0, False),  # max_limit
        ({"paused_until_s": 130.0}, False, "paused", 30.0, False),
        ({"paused_until_s": 100.0}, True, "ok", 0.0, False),
        ({"breaker": OPEN, "now_s": 104.0}, False, "circuit_open", 6.0, False),
        ({"breaker": OPEN, "now_s": 110.0}, True, "ok", 0.0, True),
        ({"breaker": HALF, "now_s": 120.0}, False, "probe_busy", 0.0, False),
        ({"rpm_wait_s": 2.5}, False, "rpm", 2.5, False),
        ({"tpm_wait_s": 4.0}, False, "tpm", 4.0, False),
        # order: pause, breaker, rpm, tpm, permit
        ({"paused_until_s": 130.0, "breaker": OPEN, "rpm_wait_s": 1.0, "in_flight": 9}, False, "paused", 30.0, False),
        ({"breaker": OPEN, "now_s": 104.0, "rpm_wait_s": 1.0, "in_flight": 9}, False, "circuit_open", 6.0, False),
        ({"rpm_wait_s": 1.0, "tpm_wait_s": 2.0, "in_flight": 9}, False, "rpm", 1.0, False),
        ({"tpm_wait_s": 2.0, "in_flight": 9}, False, "tpm", 2.0, False),
        ({"breaker": OPEN, "now_s": 110.0, "in_flight": 9}, False, "no_permit", 0.0, False),  # probe needs a permit
    ],
)
def test_admit(changes: dict[str, Any], admitted: bool, reason: str, wait_s: float, probe: bool) -> None:
    admission, _ = admit(**{**BASE, **changes}, cfg=CFG)
    assert (admission.admitted, admission.reason, admission.probe) == (admitted, reason, probe)
    assert admission.wait_s == pytest.approx(wait_s)


def test_admit_as_probe_claims_the_probe_slot() -> None:
    admission, breaker = admit(**{**BASE, "breaker": OPEN, "now_s": 110.0}, cfg=CFG)
    assert admission.probe
    assert (breaker.state, breaker.since_s, breaker.probe_until_s) == (Breaker.HALF_OPEN, 110.0, 170.0)
    refused, after = admit(**{**BASE, "breaker": OPEN, "now_s": 110.0, "in_flight": 9}, cfg=CFG)
    assert not refused.admitted
    assert (after.state, after.probe_until_s) == (Breaker.HALF_OPEN, 0.0)  # half-open, no probe claimed


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
