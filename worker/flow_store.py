"""Flow-control state in Redis, shared by every worker: one Lua script per attempt start, one per end.

Use (the runner):

    admission = await flow.acquire(job_id, model, tier, est_tokens)      # before begin_attempt
    if not admission.admitted:
        return defer_s(admission, flow.cfg, rand)                         # not an attempt; no slot held
    ...call Gemini, classify...
    await flow.release(admission.permit, outcome, retry_after_s=..., quota=..., used_tokens=...)
    # a permit taken for a job that then did not run: release(permit, None) refunds it

and, in the lease keeper's loop, ``await flow.renew()`` every ``permit_ttl_s / 3``.

``acquire`` checks, atomically: the model's 429 pause, the (model, tier) breaker, the model's RPM/TPM
window, then a concurrency permit: a member of a sorted set scored by lease expiry, so a dead
worker's permits lapse after ``permit_ttl_s`` (expired members are purged by every acquire).
``release`` returns the permit and records the outcome: AIMD limit, breaker, pause / quota alert,
TPM correction. The scripts mirror ``worker.flow`` (``admit``, ``aimd_next``, ``breaker_next``,
``slide``, ``window_wait_s``); change both together. Times are the Redis server's (``TIME``) unless
``now_s`` is given (tests), so workers' clock skew does not matter.

Keys (``Keys.flow``): ``state:{model}:{tier}`` hash (AIMD + breaker), ``permits:{model}:{tier}``
zset, ``pause:{model}`` / ``quota:{model}`` / ``rate:{model}`` hashes, ``scopes`` set, ``log`` list
of breaker and quota transitions. A single Redis (not Cluster): keys share no hash tag.
Redis errors propagate; a release that never arrives costs one permit for ``permit_ttl_s``.
``snapshot()`` is the ``flexq stats`` document, ``flow_lines()`` its console lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis

from producer.keys import Keys
from worker.flow import (
    AIMD_EVENTS,
    APP_LIMITED_RATIO,
    RATE_WINDOW_S,
    Admission,
    FlowConfig,
    Permit,
    breaker_event,
    flow_model,
    pause_after_429,
)
from worker.policy import QuotaKind

LOG_ENTRIES = 100
STATE_TTL_S = 7 * 24 * 3600  # learned limits outlive a quiet week, not forever
QUOTA_ALERT_TTL_S = 2 * 24 * 3600

_PRELUDE = """
local function num(x) return string.format('%.17g', x) end
local function clock(arg)
  local n = tonumber(arg)
  if n then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function clamp(x, lo, hi) return math.max(lo, math.min(hi, x)) end
-- worker.flow.slide
local function slide(index, a, b, pa, pb, now, window)
  local idx = math.max(index, math.floor(now / window))
  if idx == index + 1 then pa, pb, a, b = a, b, 0, 0
  elseif idx > index + 1 then pa, pb, a, b = 0, 0, 0, 0 end
  return idx, a, b, pa, pb, clamp(1 - (now - idx * window) / window, 0, 1)
end
local function log(key, entry)
  redis.call('LPUSH', key, cjson.encode(entry))
  redis.call('LTRIM', key, 0, LOG_LAST)
end
local function extend_pause(key, until_s, reason, now)
  local old = tonumber(redis.call('HGET', key, 'until_s')) or 0
  if until_s <= old then return end
  if old <= now then redis.call('HSET', key, 'since_s', num(now)) end
  redis.call('HSET', key, 'until_s', num(until_s), 'reason', reason)
  redis.call('EXPIRE', key, math.ceil(until_s - now) + 86400)
end
""".replace("LOG_LAST", str(LOG_ENTRIES - 1))

# KEYS: state, permits, pause, rate, scopes, log, waiters, woken, arq queue
# ARGV: job, now, est tokens, model, tier, rpm (0: none), tpm (0: none), initial, min, max, permit ttl s, worker
# A job refused for want of a permit joins the waiters (FIFO); a release wakes as many as it frees.
_ACQUIRE = """
local job, now, cost, model, tier = ARGV[1], clock(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local rpm, tpm, initial, lo, hi, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
  tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
redis.call('SADD', KEYS[5], model .. ' ' .. tier)
local s = redis.call('HMGET', KEYS[1], 'limit', 'state', 'open_until_s', 'probe_until_s', 'probe')
local limit = clamp(tonumber(s[1]) or initial, lo, hi)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now))
local in_flight = redis.call('ZCARD', KEYS[2])
local function reply(ok, reason, wait, probe, held)
  return {ok, reason, num(wait), probe, num(now), num(limit), held}
end
-- a wake is spent by this attempt, whatever answers it (a paused job must not re-run at once)
local was_woken = redis.call('HDEL', KEYS[8], job) == 1
local paused_until = tonumber(redis.call('HGET', KEYS[3], 'until_s')) or 0
if paused_until > now then return reply(0, 'paused', paused_until - now, 0, in_flight) end
if redis.call('ZSCORE', KEYS[2], job) then  -- a repeated acquire: keep the permit, count nothing twice
  redis.call('ZADD', KEYS[2], num(now + ttl), job)
  return reply(1, 'ok', 0, s[5] == job and 1 or 0, in_flight)
end
local state, probe = s[2] or 'closed', 0
if state == 'open' then
  local open_until = tonumber(s[3]) or 0
  if now < open_until then return reply(0, 'circuit_open', open_until - now, 0, in_flight) end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', state, 'since_s', num(now), 'probe_until_s', '0', 'probe', '')
  log(KEYS[6], {t = now, model = model, tier = tier, from = 'open', to = state, why = 'cool-down over',
    worker = ARGV[12]})
elseif state == 'half_open' and (tonumber(s[4]) or 0) > now then
  return reply(0, 'probe_busy', 0, 0, in_flight)
end
if state == 'half_open' then probe = 1 end
local win, rq, tk, prq, ptk, weight
if rpm > 0 or tpm > 0 then
  local r = redis.call('HMGET', KEYS[4], 'win', 'rq', 'tk', 'prev_rq', 'prev_tk')
  win, rq, tk, prq, ptk, weight = slide(tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0,
    tonumber(r[4]) or 0, tonumber(r[5]) or 0, now, WINDOW)
  -- worker.flow.window_wait_s
  local function wait_for(cur, prev, lim, c)
    c = math.min(c, lim)
    if prev * weight + cur + c <= lim then return 0 end
    if cur + c <= lim then return math.max(0, (weight - (lim - cur - c) / prev) * WINDOW) end
    return weight * WINDOW + (1 - (lim - c) / cur) * WINDOW
  end
  if rpm > 0 then
    local w = wait_for(rq, prq, rpm, 1)
    if w > 0 then return reply(0, 'rpm', w, 0, in_flight) end
  end
  if tpm > 0 then
    local w = wait_for(tk, ptk, tpm, cost)
    if w > 0 then return reply(0, 'tpm', w, 0, in_flight) end
  end
end
-- Ack clocking: while others wait in line, a free permit belongs to a woken job (or, for a waiter
-- back on its own after waiter_timeout_s, to one of the first `free` in line), not to a newcomer
-- or to a job just shed with a 503 and retrying: that keeps in-flight at what the pool serves.
local free = math.floor(limit) - in_flight
local in_line = false
-- (only while something is in flight: an idle scope has no release to come, and stale waiters,
-- whose jobs were cancelled or moved on, must not lock it)
if not was_woken and free > 0 and in_flight > 0 and redis.call('ZCARD', KEYS[7]) > 0 then
  local rank = redis.call('ZRANK', KEYS[7], job)
  in_line = rank == false or rank >= free
end
if free <= 0 or in_line then
  redis.call('ZADD', KEYS[7], 'NX', num(now), job)
  redis.call('EXPIRE', KEYS[7], STATE_TTL)
  return reply(0, 'no_permit', 0, 0, in_flight)
end
redis.call('ZREM', KEYS[7], job)
redis.call('ZADD', KEYS[2], num(now + ttl), job)
if probe == 1 then redis.call('HSET', KEYS[1], 'probe', job, 'probe_until_s', num(now + ttl)) end
if win then
  redis.call('HSET', KEYS[4], 'win', num(win), 'rq', num(rq + 1), 'tk', num(tk + cost), 'prev_rq', num(prq),
    'prev_tk', num(ptk))
  redis.call('EXPIRE', KEYS[4], 3 * WINDOW)
end
return reply(1, 'ok', 0, probe, in_flight + 1)
""".replace("WINDOW", repr(RATE_WINDOW_S)).replace("STATE_TTL", str(STATE_TTL_S))

# KEYS: state, permits, pause, quota, rate, log
# ARGV: 1 job, 2 now, 3 started s, 4 model, 5 tier, 6 aimd event ('' | ok | overloaded),
#   7 breaker event (success | failure | neutral), 8 pause s (''), 9 quota alert (''), 10 reason,
#   11 requests delta, 12 tokens delta, 13 initial, 14 min, 15 max, 16 decrease factor,
#   17 decrease interval s, 18 breaker window s, 19 min failures, 20 failure ratio, 21 cool-down s,
#   22 cool-down max s, 23 worker
_RELEASE = """
local job, now, started, model, tier = ARGV[1], clock(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local aimd, event = ARGV[6], ARGV[7]
local initial, lo, hi = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now))
local in_flight = redis.call('ZCARD', KEYS[2])
if redis.call('ZREM', KEYS[2], job) == 0 then in_flight = in_flight + 1 end  -- lease lapsed, still ran
local s = redis.call('HMGET', KEYS[1], 'limit', 'ssthresh', 'last_decrease_s', 'state', 'opens', 'win', 'ok',
  'failed', 'prev_ok', 'prev_failed', 'probe')
-- worker.flow.aimd_next
local limit = clamp(tonumber(s[1]) or initial, lo, hi)
local limit_before = limit
local ssthresh, last_dec = tonumber(s[2]) or math.huge, tonumber(s[3]) or 0
if aimd == 'ok' and (in_flight >= limit * APP_LIMITED or redis.call('ZCARD', KEYS[7]) > 0) then
  local step = 1
  if limit >= ssthresh then step = 1 / limit end
  limit = math.min(hi, limit + step)
  redis.call('HSET', KEYS[1], 'limit', num(limit))
elseif aimd == 'overloaded' and started >= last_dec and now - last_dec >= tonumber(ARGV[17]) then
  limit = math.max(lo, math.min(limit, in_flight) * tonumber(ARGV[16]))
  redis.call('HSET', KEYS[1], 'limit', num(limit), 'ssthresh', num(limit), 'last_decrease_s', num(now))
end
-- worker.flow.breaker_event: a 503 trips the breaker only once AIMD cannot shrink any further
if aimd == 'overloaded' and event == 'failure' and limit > lo then event = 'neutral' end
-- worker.flow.breaker_next
local state = s[4] or 'closed'
local function transition(to, why, extra)
  local opens, open_until = 0, 0
  if to == 'open' then
    opens = (tonumber(s[5]) or 0) + 1
    open_until = now + math.min(tonumber(ARGV[22]), tonumber(ARGV[21]) * 2 ^ (opens - 1))
  end
  redis.call('HSET', KEYS[1], 'state', to, 'since_s', num(now), 'open_until_s', num(open_until),
    'opens', opens, 'win', 0, 'ok', 0, 'failed', 0, 'prev_ok', 0, 'prev_failed', 0, 'probe', '',
    'probe_until_s', 0)
  log(KEYS[6], {t = now, model = model, tier = tier, from = state, to = to, why = why, worker = ARGV[23]})
end
if state == 'closed' and event ~= 'neutral' then
  local idx, ok, failed, pok, pfailed, weight = slide(tonumber(s[6]) or 0, tonumber(s[7]) or 0,
    tonumber(s[8]) or 0, tonumber(s[9]) or 0, tonumber(s[10]) or 0, now, tonumber(ARGV[18]))
  if event == 'success' then ok = ok + 1 else failed = failed + 1 end
  local rf, ro = failed + pfailed * weight, ok + pok * weight
  if event == 'failure' and rf >= tonumber(ARGV[19]) and rf >= tonumber(ARGV[20]) * (rf + ro) then
    transition('open', string.format('%.1f failures, %d%% of outcomes in %ss', rf,
      math.floor(100 * rf / (rf + ro)), ARGV[18]))
  else
    redis.call('HSET', KEYS[1], 'win', num(idx), 'ok', num(ok), 'failed', num(failed), 'prev_ok', num(pok),
      'prev_failed', num(pfailed))
  end
elseif state == 'half_open' and s[11] == job then
  if event == 'success' then transition('closed', 'probe succeeded')
  elseif event == 'failure' then transition('open', 'probe failed')
  else redis.call('HSET', KEYS[1], 'probe', '', 'probe_until_s', 0) end
end
redis.call('EXPIRE', KEYS[1], STATE_TTL)
-- wake waiters into the permits this release (and any growth of the limit) freed: their arq jobs
-- become due now (ZADD XX: only jobs still queued), instead of every waiter polling
-- (not after a 503: the pool is full, and a woken waiter would only be shed in turn). A waiter
-- whose arq run is still finishing would lose the wake to arq's re-scoring: the woken hash lets
-- the worker's after-job hook (``settle_wake``) re-apply it.
-- Ack clocking: one waiter replaces the request that ended, plus one per whole permit the limit
-- grew; waiters whose arq job is gone (cancelled, finished) are skipped.
local free = math.floor(limit) - redis.call('ZCARD', KEYS[2])
local wake = math.min(free, 1 + math.max(0, math.floor(limit) - math.floor(limit_before)))
local paused = (tonumber(redis.call('HGET', KEYS[3], 'until_s')) or 0) > now
if wake > 0 and aimd ~= 'overloaded' and ARGV[8] == '' and not paused then
  local now_ms = math.floor(now * 1000)
  local tries = 0
  while wake > 0 and tries < 64 do
    tries = tries + 1
    local head = redis.call('ZPOPMIN', KEYS[7], 1)
    if #head == 0 then break end
    if redis.call('ZSCORE', KEYS[8], head[1]) then
      redis.call('ZADD', KEYS[8], 'XX', now_ms, head[1])
      redis.call('HSET', KEYS[9], head[1], now_ms)
      wake = wake - 1
    end
  end
end
-- 429: pause the model for every worker; per-day and billing quotas raise an alert
if ARGV[8] ~= '' then
  extend_pause(KEYS[3], now + tonumber(ARGV[8]), ARGV[10], now)
  if ARGV[9] ~= '' then
    if redis.call('HGET', KEYS[4], 'kind') == ARGV[9] then
      redis.call('HINCRBY', KEYS[4], 'count', 1)
      redis.call('HSET', KEYS[4], 'last_s', num(now), 'reason', ARGV[10])
    else
      redis.call('DEL', KEYS[4])
      redis.call('HSET', KEYS[4], 'kind', ARGV[9], 'reason', ARGV[10], 'since_s', num(now), 'last_s', num(now),
        'count', 1)
      log(KEYS[6], {t = now, model = model, tier = tier, from = 'quota_ok', to = 'quota_' .. ARGV[9],
        why = ARGV[10], worker = ARGV[23]})
    end
    redis.call('EXPIRE', KEYS[4], QUOTA_TTL)
  end
elseif aimd == 'ok' then  -- an answer to a request sent after the alert: the quota is back
  local since = tonumber(redis.call('HGET', KEYS[4], 'since_s'))
  if since and started >= since then
    local kind = redis.call('HGET', KEYS[4], 'kind')
    redis.call('DEL', KEYS[4])
    log(KEYS[6], {t = now, model = model, tier = tier, from = 'quota_' .. kind, to = 'quota_ok',
      why = 'a request succeeded', worker = ARGV[23]})
  end
end
-- RPM/TPM: refund or correct the window the request was counted in
local drq, dtk = tonumber(ARGV[11]), tonumber(ARGV[12])
if drq ~= 0 or dtk ~= 0 then
  local r = redis.call('HMGET', KEYS[5], 'win', 'rq', 'tk', 'prev_rq', 'prev_tk')
  local win, at = tonumber(r[1]), math.floor(started / WINDOW)
  local rq, tk = 'rq', 'tk'
  if win and at == win - 1 then rq, tk = 'prev_rq', 'prev_tk' end
  if win and at >= win - 1 and at <= win then
    local i = (rq == 'rq') and 2 or 4
    redis.call('HSET', KEYS[5], rq, num(math.max(0, (tonumber(r[i]) or 0) + drq)),
      tk, num(math.max(0, (tonumber(r[i + 1]) or 0) + dtk)))
  end
end
return num(limit)
"""
# KEYS: woken hash, arq queue; ARGV: job
_SETTLE = """
local at = redis.call('HGET', KEYS[1], ARGV[1])
if not at or not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], 'XX', at, ARGV[1])  -- the wake stays in the hash until acquire spends it
return 1
"""

_RELEASE = (
    _RELEASE.replace("APP_LIMITED", repr(APP_LIMITED_RATIO))
    .replace("STATE_TTL", str(STATE_TTL_S))
    .replace("QUOTA_TTL", str(QUOTA_ALERT_TTL_S))
    .replace("WINDOW", repr(RATE_WINDOW_S))
)

# KEYS: state, permits. ARGV: now, permit ttl s, job ids... Lapsed permits are not revived.
_RENEW = """
local now = clock(ARGV[1])
local expiry = num(now + tonumber(ARGV[2]))
local probe, renewed = redis.call('HGET', KEYS[1], 'probe'), 0
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], expiry, ARGV[i])
    renewed = renewed + 1
    if ARGV[i] == probe then redis.call('HSET', KEYS[1], 'probe_until_s', expiry) end
  end
end
return renewed
"""

# KEYS: pause. ARGV: until s, reason, now
_PAUSE = "extend_pause(KEYS[1], tonumber(ARGV[1]), ARGV[2], clock(ARGV[3]))"


def _arg(now_s: float | None) -> str:
    return "" if now_s is None else repr(float(now_s))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


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
        self._acquire = redis.register_script(_PRELUDE + _ACQUIRE)
        self._release = redis.register_script(_PRELUDE + _RELEASE)
        self._renew = redis.register_script(_PRELUDE + _RENEW)
        self._pause = redis.register_script(_PRELUDE + _PAUSE)
        self._settle = redis.register_script(_SETTLE)

    def _scope(self, model: str, tier: str) -> tuple[str, str]:
        return self.keys.flow(f"state:{model}:{tier}"), self.keys.flow(f"permits:{model}:{tier}")

    async def settle_wake(self, job_id: str) -> bool:
        """After arq re-scored a finished run: re-apply a wake that arrived while it was finishing."""
        return bool(await self._settle(keys=[self.keys.flow("woken"), self.keys.arq_queue], args=[job_id]))

    def _waiters(self, model: str, tier: str) -> str:
        return self.keys.flow(f"waiters:{model}:{tier}")

    def _model(self, model: str) -> tuple[str, str, str]:
        return self.keys.flow(f"pause:{model}"), self.keys.flow(f"quota:{model}"), self.keys.flow(f"rate:{model}")

    async def acquire(
        self, job_id: str, model: str, tier: str, est_tokens: int, now_s: float | None = None
    ) -> Admission:
        """Admit one attempt (holding a permit until ``release``) or say why not and for how long."""
        model = flow_model(model)
        limits = self.cfg.limits.get(model)
        state, permits = self._scope(model, tier)
        pause, _, rate = self._model(model)
        cfg = self.cfg
        reply = await self._acquire(
            keys=[state, permits, pause, rate, self.keys.flow("scopes"), self.keys.flow("log"),
                  self._waiters(model, tier), self.keys.flow("woken"), self.keys.arq_queue],
            args=[
                job_id, _arg(now_s), max(0, est_tokens), model, tier,
                (limits.rpm or 0) if limits else 0, (limits.tpm or 0) if limits else 0,
                cfg.initial_limit, cfg.min_limit, cfg.max_limit, cfg.permit_ttl_s, self.worker,
            ],
        )
        admitted, reason, wait_s, probe, started_s, limit, in_flight = reply
        admission = Admission(
            bool(int(admitted)), _text(reason), float(wait_s), bool(int(probe)), float(limit), int(in_flight)
        )
        if admission.admitted:
            permit = Permit(job_id, model, tier, max(0, est_tokens), float(started_s))
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
    ) -> float | None:
        """Return the permit and record the attempt's outcome (``None``: the call was never made,
        refund it). ``used_tokens``: tokens the usage reported, to correct the TPM estimate.
        Returns the (model, tier) limit afterwards, or None when there was no permit."""
        if permit is None:
            return None
        self.held.pop(permit.job_id, None)
        cfg = self.cfg
        state, permits = self._scope(permit.model, permit.tier)
        pause, quota_key, rate = self._model(permit.model)
        pause_s, alert = "", ""
        if outcome == "rate_limited":
            seconds, kind = pause_after_429(retry_after_s, quota, cfg)
            pause_s, alert = repr(seconds), str(kind or "")
            reason = reason or f"429 {quota or 'rate limit'}" + (
                f", retryDelay {retry_after_s:g}s" if retry_after_s is not None else ""
            )
        limits = cfg.limits.get(permit.model)
        requests_delta, tokens_delta = 0, 0
        if limits is not None and outcome is None:
            requests_delta, tokens_delta = -1, -permit.est_tokens
        elif limits is not None and used_tokens is not None:
            tokens_delta = used_tokens - permit.est_tokens
        limit = await self._release(
            keys=[state, permits, pause, quota_key, rate, self.keys.flow("log"),
                  self._waiters(permit.model, permit.tier), self.keys.arq_queue, self.keys.flow("woken")],
            args=[
                permit.job_id, _arg(now_s), repr(permit.started_s), permit.model, permit.tier,
                AIMD_EVENTS.get(outcome or "", ""), breaker_event(outcome), pause_s, alert, reason,
                requests_delta, tokens_delta, cfg.initial_limit, cfg.min_limit, cfg.max_limit,
                cfg.decrease_factor, cfg.decrease_interval_s, cfg.breaker_window_s, cfg.breaker_min_failures,
                cfg.breaker_failure_ratio, cfg.breaker_cool_down_s, cfg.breaker_cool_down_max_s, self.worker,
            ],
        )
        return float(limit)

    async def renew(self, now_s: float | None = None) -> int:
        """Extend the leases of the permits this process holds; returns how many were still held.

        A permit held longer than ``permit_max_hold_s`` (its release never came: a bug, not a slow
        call) is no longer renewed, so even a live process cannot shrink capacity forever."""
        local_now_s = time.time() if now_s is None else now_s
        by_scope: dict[tuple[str, str], list[str]] = {}
        for permit in list(self.held.values()):
            if local_now_s - permit.started_s > self.cfg.permit_max_hold_s:
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
        members = await cast("Awaitable[set[bytes]]", self.redis.smembers(self.keys.flow("scopes")))
        scopes = sorted(_text(m).split(" ", 1) for m in members)
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
        doc["transitions"] = [json.loads(_text(entry)) for entry in replies[-1]]
        return doc

    def _scope_doc(self, model: str, tier: str, s: dict[str, str], in_flight: int, now_s: float) -> dict[str, Any]:
        limit = self.cfg.clamp(_num(s, "limit", self.cfg.initial_limit))
        state = s.get("state") or "closed"
        return {
            "model": model, "tier": tier, "limit": round(limit, 3), "in_flight": in_flight,
            "ssthresh": _num(s, "ssthresh") or None, "last_decrease_s": _num(s, "last_decrease_s") or None,
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
        limits = self.cfg.limits.get(model)
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
    """``snapshot()`` as console lines for ``flexq stats`` (``worker.render`` prints ``doc["flow"]``)."""
    lines = []
    for scope in snapshot["scopes"]:
        breaker = scope["breaker"]
        state = breaker["state"].replace("_", "-")
        if breaker["state"] == "open":
            state += f" for {breaker['open_for_s']:.0f}s more (opened {breaker['opens']}x in a row)"
        elif breaker["probe_out"]:
            state += ", probe out"
        lines.append(
            f"flow {scope['model']} {scope['tier']}: limit {scope['limit']:g}, "
            f"in flight {scope['in_flight']}, breaker {state}"
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

