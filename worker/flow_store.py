"""Flow-control state in Redis, shared by every worker: one Lua call per attempt start, one per end (the
starts, or the ends, a worker makes in one event-loop turn sent together: ``worker.group_commit``).

Use (the runner):

    admission = await flow.acquire(job_id, model, tier, est_tokens)      # before begin_attempt
    if not admission.admitted:
        return defer_s(admission, flow.cfg, rand)                         # not an attempt; no slot held
    ...call Gemini, classify...
    await flow.release(admission.permit, outcome, retry_after_s=..., quota=..., used_tokens=...)
    # a permit taken for a job that then did not run: release(permit, None) refunds it

and, in the lease keeper's loop, ``await flow.renew()`` every ``permit_ttl_s / 3``. Either call may
carry the job record's change (``write=JobStore.prepare(...)``: the attempt's opening, applied only if
admitted; its outcome), so that a permit and the record move in one round trip (``script_with_write``),
shared with the other starts or ends of the same event-loop turn (``FlowControl.acquires``, ``.releases``).

The rules are the scripts in ``worker/lua/`` (each documents its KEYS and ARGV at the top):
``acquire.lua`` checks, atomically, the model's 429 pause, the (model, tier) breaker, the model's
RPM/TPM window, then a concurrency permit: a member of a sorted set scored by lease expiry, so a
dead worker's permits lapse after ``permit_ttl_s``. ``release.lua`` returns the permit and learns
from the outcome: the limit (capacity 503s against load-independent ones), the breaker, a pause or
quota alert, the TPM correction. Times are the Redis server's (``TIME``) unless ``now_s`` is given
(tests), so workers' clock skew does not matter.

Keys (``Keys.flow``): ``state:{model}:{tier}`` hash (limit, controller, breaker, the decayed calls and
503s per in-flight level as fields ``L<level>``, when the latest reservation ends),
``permits:{model}:{tier}`` zset, ``waiters:{model}:{tier}`` zset, ``pause:{model}`` / ``quota:{model}`` /
``rate:{model}`` hashes, ``reserved:{model}:{tier}`` zset (permits held for woken jobs), ``woken``
hash, ``scopes_seen`` (scopes by last use), ``log`` list of breaker and quota transitions. A single
Redis (not Cluster): keys share no hash tag. Redis errors propagate; a release that never arrives
costs one permit for ``permit_ttl_s``. ``snapshot()`` is the ``flexq stats`` document,
``flow_lines()`` its console lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from dataclasses import replace
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis

from producer.events import text
from producer.keys import Keys
from producer.status import Outcome
from producer.store import Write
from worker.classify import QuotaKind
from worker.config import flow_model, limits_model
from worker.flow import (
    BINDING_VERDICTS,
    LIMIT_OUTCOMES,
    RATE_WINDOW_S,
    Admission,
    FlowConfig,
    Permit,
    Release,
    breaker_event,
    pause_after_429,
)
from worker.group_commit import GroupCommit

LOG_ENTRIES = 100
#: How often (s) one worker's acquire or release of one scope also does the scope's housekeeping (the
#: scope marked seen, expired permits and reservations swept, TTLs refreshed) instead of on every call.
TOUCH_EVERY_S = 30.0


@cache
def script(name: str) -> str:
    """The text of ``worker/lua/{name}.lua`` with the shared prelude in front, read once."""
    folder = resources.files("worker").joinpath("lua")
    return folder.joinpath("prelude.lua").read_text() + "\n" + folder.joinpath(f"{name}.lua").read_text()


#: Keys and arguments of one flow call that carries a record write: the flow script's (acquire and release
#: take the same ten keys), then the record's; the flow script's two arguments, then the compare-and-set's three.
WRITE_KEYS = 11
WRITE_ARGS = 5

#: How a flow script that carries a record write does one call: its own reply, then the compare-and-set's.
_THEN_WRITE = {
    "acquire": "local function call(KEYS, ARGV)\nlocal reply = flow_call(KEYS, ARGV)\nlocal written = 0\n"
               "if tonumber(reply[1]) == 1 then written = cas(KEYS[#KEYS], ARGV[3], ARGV[4], ARGV[5]) end\n"
               "reply[#reply + 1] = written\nreturn reply\nend\n",
    "release": "local function call(KEYS, ARGV)\nlocal reply = flow_call(KEYS, ARGV)\n"
               "reply[#reply + 1] = cas(KEYS[#KEYS], ARGV[3], ARGV[4], ARGV[5])\nreturn reply\nend\n",
}

#: A group commit: the calls of one batch, KEYS and ARGV each the calls' own, one after the other (``nk``
#: keys and ``na`` arguments per call). Each call runs as it would alone, in order, except that the
#: compare-and-set's mergeable commands are sent once, merged, at the end (``staged``, ``merged`` in
#: ``producer/lua/cas.lua``) and the server's clock is read once. A call that raises an error fails alone:
#: its reply is {0, message}; the others' are {1, reply}.
_BATCH = """
local nk, na = {nk}, {na}
local pending = {{}}
staged = {{}}
flush_writes = function()
  for _, command in ipairs(merged(pending)) do run_now(command) end
  pending = {{}}
end
local out = {{}}
for i = 0, #KEYS / nk - 1 do
  local keys, argv = {{}}, {{}}
  for j = 1, nk do keys[j] = KEYS[i * nk + j] end
  for j = 1, na do argv[j] = ARGV[i * na + j] end
  staged = {{}}
  local ok, reply = pcall(call, keys, argv)
  for _, command in ipairs(staged) do pending[#pending + 1] = command end  -- what ran, ran
  if ok then
    out[#out + 1] = {{1, reply}}
  else
    out[#out + 1] = {{0, type(reply) == 'table' and (reply.err or cjson.encode(reply)) or tostring(reply)}}
  end
end
staged = nil
flush_writes()
return out
"""


@cache
def script_with_write(name: str) -> str:
    """``acquire`` or ``release`` followed by a job record's compare-and-set (``producer/lua/cas.lua``), so
    that an attempt's start (its permit and the record's ``running``) or its end (the permit back and the
    outcome recorded) is one round trip. KEYS: the flow script's, then the record's; ARGV: the flow
    script's two, then the compare-and-set's three. Reply: the flow script's, then the write's (1 applied,
    0 the record changed meanwhile, -1 gone); an acquire applies the write only when it admits. In the
    group-commit form (``_BATCH``): many such calls in one, each call's KEYS and ARGV after the other's."""
    cas = resources.files("producer").joinpath("lua", "cas.lua").read_text()
    folder = resources.files("worker").joinpath("lua")
    return "\n".join([
        folder.joinpath("prelude.lua").read_text(),
        cas[: cas.index("-- END OF cas")],
        "local function flow_call(KEYS, ARGV)", folder.joinpath(f"{name}.lua").read_text(), "end",
        _THEN_WRITE[name],
        _BATCH.format(nk=WRITE_KEYS, na=WRITE_ARGS),
    ])


def _arg(now_s: float | None) -> str:
    return "" if now_s is None else repr(float(now_s))


def _hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def _num(fields: dict[str, str], name: str, default: float = 0.0) -> float:
    try:
        return float(fields[name]) if fields.get(name) not in (None, "") else default
    except ValueError:
        return default


class FlowControl:
    """Flow-control state of one queue, shared by all workers. One instance per worker process."""

    def __init__(self, redis: Redis, keys: Keys, cfg: FlowConfig, *, worker: str = "") -> None:
        self.redis = redis
        self.keys = keys
        self.cfg = cfg
        self.worker = worker
        #: Permits this process holds (renewed by ``renew``), by job id.
        self.held: dict[str, Permit] = {}
        #: Until when (monotonic s) the limit binds, as this process last saw (``limit_binds``), and whether
        #: the pool has answered one of its calls yet (until then the limit is unknown and taken to bind).
        self._binds_until_s = 0.0
        self._answered = False
        #: When (monotonic s) this process last did each script's housekeeping of each scope.
        self._touched: dict[tuple[str, str, str], float] = {}
        self._acquire = redis.register_script(script("acquire"))
        self._release = redis.register_script(script("release"))
        self._renew = redis.register_script(script("renew"))
        self._pause = redis.register_script(script("pause"))
        self._settle = redis.register_script(script("settle"))
        batch_acquire = redis.register_script(script_with_write("acquire"))
        batch_release = redis.register_script(script_with_write("release"))
        #: An attempt's start (its permit and the record's ``running``) and its end (the permit back and the
        #: outcome recorded) are group-committed: the starts, or the ends, ready in one event-loop turn go to
        #: Redis as one call (worker.group_commit).
        self.acquires = GroupCommit(lambda keys, args: batch_acquire(keys=keys, args=args))
        self.releases = GroupCommit(lambda keys, args: batch_release(keys=keys, args=args))
        self._acquire_cfg = json.dumps({
            "initial": cfg.initial_limit, "min": cfg.min_limit, "max": cfg.max_limit, "permit_ttl_s": cfg.permit_ttl_s,
            "state_ttl_s": cfg.state_ttl_s, "rate_window_s": RATE_WINDOW_S,
        })
        self._release_cfg = json.dumps({
            "initial": cfg.initial_limit, "min": cfg.min_limit, "max": cfg.max_limit, "decrease": cfg.decrease_factor,
            "state_ttl_s": cfg.state_ttl_s, "quota_ttl_s": cfg.quota_ttl_s, "rate_window_s": RATE_WINDOW_S,
            "breaker_window_s": cfg.breaker_window_s, "breaker_min_failures": cfg.breaker_min_failures,
            "breaker_failure_ratio": cfg.breaker_failure_ratio, "cool_down_s": cfg.breaker_cool_down_s,
            "cool_down_max_s": cfg.breaker_cool_down_max_s, "level_half_life_s": cfg.level_half_life_s,
            "step_min_gap": cfg.step_min_gap, "step_min_llr": cfg.step_min_llr, "step_min_n": cfg.step_min_n,
            "baseline_window": cfg.baseline_window, "baseline_prior_n": cfg.baseline_prior_n,
            "excess_window": cfg.excess_window, "excess_z": cfg.excess_z,
            "blind_n": cfg.blind_n, "raise_min_n": cfg.raise_min_n, "probe_gain": cfg.probe_gain,
            "replace_ratio": cfg.replace_ratio, "replace_burst": cfg.replace_burst, "wake_hold_s": cfg.wake_hold_s,
            "waiter_timeout_s": cfg.waiter_timeout_s,
        })

    def limit_binds(self) -> bool:
        """Whether the limit of some scope bound lately, as this process saw it: an acquire of its own found
        jobs in the scope's line (or joined it), or a 503 of its own was taken for capacity or excess, less
        than ``binds_memory_s`` ago; or the pool has not answered any of its calls yet (a cold start, when
        the limit is still unknown). While it binds, the order in which calls reach the pool is what the
        limit learns from (their in-flight levels), so jobs are claimed one at a time (worker.runtime)."""
        return not self._answered or time.monotonic() < self._binds_until_s

    def _binding(self) -> None:
        self._binds_until_s = time.monotonic() + self.cfg.binds_memory_s

    def _scope(self, model: str, tier: str) -> tuple[str, str]:
        return self.keys.flow(f"state:{model}:{tier}"), self.keys.flow(f"permits:{model}:{tier}")

    def _touch(self, script: str, model: str, tier: str) -> bool:
        """Whether this call should do the scope's housekeeping (at most every ``TOUCH_EVERY_S`` per process)."""
        now = time.monotonic()
        key = (script, model, tier)
        last = self._touched.get(key)
        if last is not None and now - last < TOUCH_EVERY_S:
            return False
        self._touched[key] = now
        return True

    async def settle_wake(self, job_id: str) -> bool:
        """After arq re-scored a finished run: re-apply a wake that arrived while it was finishing."""
        return bool(await self._settle(keys=[self.keys.flow("woken"), self.keys.arq_queue], args=[job_id]))

    def _waiters(self, model: str, tier: str) -> str:
        return self.keys.flow(f"waiters:{model}:{tier}")

    def _reserved(self, model: str, tier: str) -> str:
        return self.keys.flow(f"reserved:{model}:{tier}")

    def _model(self, model: str) -> tuple[str, str, str]:
        return self.keys.flow(f"pause:{model}"), self.keys.flow(f"quota:{model}"), self.keys.flow(f"rate:{model}")

    async def acquire(
        self, job_id: str, model: str, tier: str, est_tokens: int, now_s: float | None = None,
        since_s: float | None = None, channel: str | None = None, write: Write[Any] | None = None,
    ) -> Admission:
        """Admit one attempt (holding a permit until ``release``) or say why not and for how long.
        ``channel``: its own scope (limit, breaker, pause) unless it is the ``default`` one. ``write``: the
        job record's change that opens the attempt, applied in the same call if (only if) it admits."""
        model = flow_model(model, channel)
        limits = self.cfg.limits.get(limits_model(model))
        state, permits = self._scope(model, tier)
        pause, _, rate = self._model(model)
        call = {
            "job": job_id, "now": now_s, "since": since_s, "cost": max(0, est_tokens), "model": model, "tier": tier,
            "rpm": (limits.rpm or 0) if limits else 0, "tpm": (limits.tpm or 0) if limits else 0,
            "worker": self.worker, "touch": self._touch("acquire", model, tier),
        }
        keys = [state, permits, pause, rate, self.keys.flow("scopes_seen"), self.keys.flow("log"),
                self._waiters(model, tier), self.keys.flow("woken"), self.keys.arq_queue, self._reserved(model, tier)]
        args = [json.dumps(call), self._acquire_cfg]
        if write is None:
            reply = await self._acquire(keys=keys, args=args)
        else:
            reply = await self.acquires.call([*keys, write.key], [*args, *write.args])
        admitted, reason, wait_s, probe, started_s, limit, in_flight, line = reply[:8]
        admission = Admission(
            bool(int(admitted)), text(reason), float(wait_s), bool(int(probe)), float(limit), int(in_flight),
            line=bool(int(line)), written=int(reply[8]) if write is not None else None,
        )
        if admission.line:
            self._binding()
        if admission.admitted:
            permit = Permit(job_id, model, tier, max(0, est_tokens), float(started_s), int(in_flight),
                            held_since_s=time.time() if now_s is None else now_s)
            self.held[job_id] = permit
            admission = replace(admission, permit=permit)
        return admission

    async def release(
        self,
        permit: Permit | None,
        outcome: str | None,
        *,
        retry_after_s: float | None = None,
        quota: QuotaKind | str | None = None,
        used_tokens: int | None = None,
        reason: str = "",
        now_s: float | None = None,
        write: Write[Any] | None = None,
    ) -> Release | None:
        """Return the permit and learn from the attempt's outcome (``None``: the call was never made,
        refund it). ``used_tokens``: tokens the usage reported, to correct the TPM estimate. ``write``:
        the job record's change that records the outcome, applied in the same call.
        Returns what was learned (the limit, a 503's verdict), or None when there was no permit."""
        if permit is None:
            return None
        self.held.pop(permit.job_id, None)
        cfg = self.cfg
        state, permits = self._scope(permit.model, permit.tier)
        pause, quota_key, rate = self._model(permit.model)
        pause_s: float | None = None
        alert = ""
        if outcome == "rate_limited":
            pause_s, kind = pause_after_429(retry_after_s, quota, cfg)
            alert = str(kind or "")
            reason = reason or f"429 {quota or 'rate limit'}" + (
                f", retryDelay {retry_after_s:g}s" if retry_after_s is not None else ""
            )
        limits = cfg.limits.get(limits_model(permit.model))
        requests_delta, tokens_delta = 0, 0
        if limits is not None and outcome is None:
            requests_delta, tokens_delta = -1, -permit.est_tokens
        elif limits is not None and used_tokens is not None:
            tokens_delta = used_tokens - permit.est_tokens
        call = {
            "job": permit.job_id, "now": now_s, "started": permit.started_s, "level": permit.level,
            "model": permit.model, "tier": permit.tier,
            "outcome": str(outcome) if outcome in LIMIT_OUTCOMES else ("" if outcome is None else str(outcome)),
            "breaker": breaker_event(outcome), "pause_s": pause_s, "alert": alert, "reason": reason,
            "rq_delta": requests_delta, "tk_delta": tokens_delta, "worker": self.worker,
            "touch": self._touch("release", permit.model, permit.tier),
            # wake scores go into arq's queue, which arq compares with the worker's clock, not Redis's
            "arq_now_ms": int(time.time() * 1000) if now_s is None else None,
        }
        keys = [state, permits, pause, quota_key, rate, self.keys.flow("log"),
                self._waiters(permit.model, permit.tier), self.keys.arq_queue, self.keys.flow("woken"),
                self._reserved(permit.model, permit.tier)]
        args = [json.dumps(call), self._release_cfg]
        if write is None:
            limit, verdict = await self._release(keys=keys, args=args)
            learned = Release(float(limit), text(verdict))
        else:
            limit, verdict, written = await self.releases.call([*keys, write.key], [*args, *write.args])
            learned = Release(float(limit), text(verdict), written=int(written))
        if learned.verdict in BINDING_VERDICTS:
            self._binding()
        self._answered = self._answered or outcome == Outcome.OK
        return learned

    async def renew(self, now_s: float | None = None) -> int:
        """Extend the leases of the permits this process holds; returns how many were still held.

        A permit held longer than ``permit_max_hold_s`` (its release never came: a bug, not a slow
        call) is no longer renewed, so even a live process cannot shrink capacity forever."""
        local_now_s = time.time() if now_s is None else now_s
        by_scope: dict[tuple[str, str], list[str]] = {}
        for permit in list(self.held.values()):
            if local_now_s - permit.held_since_s > self.cfg.permit_max_hold_s:  # one clock: this process's
                self.held.pop(permit.job_id, None)
                continue
            by_scope.setdefault((permit.model, permit.tier), []).append(permit.job_id)
        if not by_scope:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for (model, tier), job_ids in by_scope.items():
                await self._renew(
                    keys=list(self._scope(model, tier)), args=[_arg(now_s), self.cfg.permit_ttl_s, *job_ids],
                    client=pipe,
                )
            return sum(int(n) for n in await pipe.execute())

    async def pause(self, model: str, until_s: float, reason: str, now_s: float | None = None) -> None:
        """Pause ``model`` for every worker until ``until_s`` (epoch s); a pause is only ever extended."""
        await self._pause(keys=[self._model(flow_model(model))[0]], args=[repr(float(until_s)), reason, _arg(now_s)])

    async def resume(self, model: str) -> None:
        """Lift the pause and the quota alert of ``model`` (e.g. after topping up credits)."""
        pause, quota, _ = self._model(flow_model(model))
        await self.redis.delete(pause, quota)

    async def snapshot(self, now_s: float | None = None) -> dict[str, Any]:
        """For ``flexq stats``: per (model, tier) limit, permits in flight and breaker; per model
        pause, quota alert and RPM/TPM use; the latest breaker and quota transitions."""
        if now_s is None:
            seconds, micros = await self.redis.time()
            now_s = seconds + micros / 1e6
        seen_since = (now_s if now_s is not None else time.time()) - self.cfg.state_ttl_s
        members = await cast("Awaitable[list[bytes]]", self.redis.zrangebyscore(
            self.keys.flow("scopes_seen"), seen_since, "+inf"))
        scopes = sorted(text(m).split(" ", 1) for m in members)
        models = sorted({model for model, _ in scopes})
        async with self.redis.pipeline(transaction=False) as pipe:
            for model, tier in scopes:
                state, permits = self._scope(model, tier)
                pipe.hgetall(state)
                pipe.zcount(permits, f"({now_s!r}", "+inf")
            for model in models:
                for key in self._model(model):
                    pipe.hgetall(key)
            pipe.lrange(self.keys.flow("log"), 0, LOG_ENTRIES - 1)
            replies = await pipe.execute()
        doc: dict[str, Any] = {"now_s": now_s, "scopes": [], "models": {}, "transitions": []}
        for i, (model, tier) in enumerate(scopes):
            doc["scopes"].append(self._scope_doc(model, tier, _hash(replies[2 * i]), int(replies[2 * i + 1]), now_s))
        base = 2 * len(scopes)
        for j, model in enumerate(models):
            pause, quota, rate = (_hash(replies[base + 3 * j + k]) for k in range(3))
            doc["models"][model] = self._model_doc(model, pause, quota, rate, now_s)
        doc["transitions"] = [json.loads(text(entry)) for entry in replies[-1]]
        return doc

    def _scope_doc(self, model: str, tier: str, s: dict[str, str], in_flight: int, now_s: float) -> dict[str, Any]:
        limit = self.cfg.clamp(_num(s, "limit", self.cfg.initial_limit))
        state = s.get("state") or "closed"
        return {
            "model": model, "tier": tier, "limit": round(limit, 3), "in_flight": in_flight,
            "capacity_step": int(_num(s, "cap")) if s.get("cap") else None,
            "random_503_rate": round(_num(s, "p_hat"), 4) if s.get("p_n") else None,
            "last_decrease_s": _num(s, "last_decrease_s") or None,
            "breaker": {
                "state": state, "since_s": _num(s, "since_s") or None, "opens": int(_num(s, "opens")),
                "open_for_s": round(max(0.0, _num(s, "open_until_s") - now_s), 3) if state == "open" else 0.0,
                "window_ok": _num(s, "ok"), "window_failed": _num(s, "failed"),
                "probe_out": state == "half_open" and _num(s, "probe_until_s") > now_s,
            },
        }

    def _model_doc(
        self, model: str, pause: dict[str, str], quota: dict[str, str], rate: dict[str, str], now_s: float
    ) -> dict[str, Any]:
        until_s = _num(pause, "until_s")
        limits = self.cfg.limits.get(limits_model(model))
        current = _num(rate, "win") == float(int(now_s // RATE_WINDOW_S))
        return {
            "paused": until_s > now_s,
            "pause": {"until_s": until_s, "left_s": round(until_s - now_s, 3), "reason": pause.get("reason", ""),
                      "since_s": _num(pause, "since_s")} if until_s > now_s else None,
            "quota_alert": {"kind": quota["kind"], "reason": quota.get("reason", ""), "since_s": _num(quota, "since_s"),
                            "last_s": _num(quota, "last_s"), "count": int(_num(quota, "count"))} if quota else None,
            "limits": {"rpm": limits.rpm, "tpm": limits.tpm} if limits else None,
            "this_minute": {"requests": _num(rate, "rq"), "tokens": _num(rate, "tk")} if current else None,
        }


def flow_lines(snapshot: dict[str, Any]) -> list[str]:
    """``snapshot()`` as console lines for ``flexq stats`` (``flexq.render`` prints ``doc["flow"]``)."""
    lines = []
    for scope in snapshot["scopes"]:
        breaker = scope["breaker"]
        state = breaker["state"].replace("_", "-")
        if breaker["state"] == "open":
            state += f" for {breaker['open_for_s']:.0f}s more (opened {breaker['opens']}x in a row)"
        elif breaker["probe_out"]:
            state += ", probe out"
        learned = ""
        if scope["capacity_step"] is not None:
            learned += f", capacity ~{scope['capacity_step']}"
        if scope["random_503_rate"] is not None:
            learned += f", load-independent 503s {scope['random_503_rate'] * 100:.0f}%"
        lines.append(
            f"flow {scope['model']} {scope['tier']}: limit {scope['limit']:g}, "
            f"in flight {scope['in_flight']}{learned}, breaker {state}"
        )
    for model, info in snapshot["models"].items():
        if info["pause"]:
            lines.append(f"flow {model}: paused {info['pause']['left_s']:.0f}s more ({info['pause']['reason']})")
        if info["quota_alert"]:
            alert = info["quota_alert"]
            since = datetime.fromtimestamp(alert["since_s"], UTC).isoformat(timespec="seconds")
            lines.append(
                f"QUOTA ALERT {model}: {alert['kind']} quota, {alert['count']} x 429 since {since}: {alert['reason']}"
            )
    return lines

