-- release: return one permit and learn from the attempt's outcome.
--
-- KEYS[1] state    hash  {queue}:flow:state:{model}:{tier}
-- KEYS[2] permits  zset  {queue}:flow:permits:{model}:{tier}
-- KEYS[3] pause    hash  {queue}:flow:pause:{model}
-- KEYS[4] quota    hash  {queue}:flow:quota:{model}  quota alert: kind, reason, since_s, last_s, count
-- KEYS[5] rate     hash  {queue}:flow:rate:{model}
-- KEYS[6] log      list  {queue}:flow:log
-- KEYS[7] waiters  zset  {queue}:flow:waiters:{model}:{tier}
-- KEYS[8] arq queue zset {queue}:arq  job -> due time (ms)
-- KEYS[9] woken    hash  {queue}:flow:woken
-- KEYS[10] reserved zset {queue}:flow:reserved:{model}:{tier}  woken job -> until when its permit is held (s)
-- The state hash also holds the counts per in-flight level, field 'L<level>' -> "calls sheds t" (decayed),
-- and 'reserved_until_s', when the latest reservation ends (acquire.lua skips the reserved set after it).
-- ARGV[1] JSON {job, now, started, level, model, tier, outcome, breaker, pause_s, alert, reason,
--               rq_delta, tk_delta, worker, touch (true: also the housekeeping: expired permits and
--               reservations swept, TTLs refreshed)}
--   outcome: 'ok' | 'overloaded' (503) | another outcome | '' (the call was never made: a refund)
--   breaker: what the outcome tells the breaker when it is not a 503: success | failure | neutral
--   pause_s: a 429's pause of the model (null: none); alert: '' | per_day | billing
-- ARGV[2] JSON config (worker/flow_store.py: FlowControl._release_cfg)
-- Reply: {limit after this outcome, verdict} where verdict, for a 503, says what it was taken for:
--   'capacity' (above the learned capacity step), 'excess' (the shed rate jumped and hardly any call
--   was answered lately: a cold start, an outage), 'random' (load-independent shedding); '' for other outcomes.
--
-- The limit (see docs/flow-control.md). Each 503 and each answer is counted at the in-flight level
-- its call was admitted at, with exponential decay over time. A 503 shrinks the limit only when the
-- counts show a capacity step below its level (levels above the step are shed more often, by at
-- least step_min_gap, with a log-likelihood ratio of at least step_min_llr), or when the recent
-- shed rate jumps above the learned load-independent rate with nothing seen below. A
-- load-independent 503 changes nothing but the baseline rate, and its permit goes to the next job in
-- line, paid for from a budget that answers refill (so mistaken verdicts cannot churn). Answers
-- grow the limit: +1 each while no step is known (slow start), else +probe_gain/limit (one level
-- above the step is tried about once per round trip).

local a, cfg = cjson.decode(ARGV[1]), cjson.decode(ARGV[2])
local job, now, started, model, tier = a.job, clock(a.now), tonumber(a.started), a.model, a.tier
local outcome, event = a.outcome, a.breaker
local WOKEN_MAX = 10000  -- wakes kept before the stale ones are swept
local APP_LIMITED = 0.5
-- variance factor of an exponentially weighted mean over `excess_window` outcomes
local alpha = 1 / cfg.excess_window
local EWMA_VAR = alpha / (2 - alpha)

-- The counts of one level after one more call (`raw`: its field as read, or false), as the field's text.
local function counted(raw, shed)
  local n, s = 0, 0
  if raw then
    local rn, rs, rt = string.match(raw, '^(%S+) (%S+) (%S+)$')
    local f = 0.5 ^ ((now - tonumber(rt)) / cfg.level_half_life_s)
    n, s = tonumber(rn) * f, tonumber(rs) * f
  end
  return num(n + 1) .. ' ' .. num(s + shed) .. ' ' .. num(now)
end

local function loglik(s, n)
  local out = 0
  if s > 0 then out = out + s * math.log(s / n) end
  if n - s > 0 then out = out + (n - s) * math.log(1 - s / n) end
  return out
end

-- The capacity step: the highest level below the best significant rise of the shed rate (nil: none),
-- the decayed number of answers at any level, and the decayed calls and 503s above `cap` (when
-- given). Levels whose counts decayed away are dropped. `pending`: state fields this call will write.
local function fit(key, pending, cap)
  local raw, fields = redis.call('HGETALL', key), {}
  for i = 1, #raw, 2 do fields[raw[i]] = raw[i + 1] end
  for field, value in pairs(pending) do fields[field] = value end
  local levels, stale = {}, {}
  for field, value in pairs(fields) do
    local at = string.match(field, '^L(%d+)$')
    if at then
      local rn, rs, rt = string.match(value, '^(%S+) (%S+) (%S+)$')
      local f = 0.5 ^ ((now - tonumber(rt)) / cfg.level_half_life_s)
      local n = tonumber(rn) * f
      if n < 0.01 then stale[#stale + 1] = field
      else levels[#levels + 1] = {tonumber(at), n, tonumber(rs) * f} end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  table.sort(levels, function(x, y) return x[1] < y[1] end)
  local n_all, s_all, answered, n_up, s_up = 0, 0, 0, 0, 0
  for _, l in ipairs(levels) do
    n_all, s_all = n_all + l[2], s_all + l[3]
    answered = answered + l[2] - l[3]
    if cap and l[1] > cap then n_up, s_up = n_up + l[2], s_up + l[3] end
  end
  local base, best, step, nl, sl = loglik(s_all, n_all), 0, nil, 0, 0
  for i = 1, #levels - 1 do
    nl, sl = nl + levels[i][2], sl + levels[i][3]
    local nr, sr = n_all - nl, s_all - sl
    if nl >= cfg.step_min_n and nr >= cfg.step_min_n and sr / nr - sl / nl >= cfg.step_min_gap then
      local g = 2 * (loglik(sl, nl) + loglik(sr, nr) - base)
      if g >= cfg.step_min_llr and g > best then best, step = g, levels[i + 1][1] - 1 end
    end
  end
  return step, answered, n_up, s_up
end

local live = '(' .. num(now)  -- permits and reservations expire by score: only later ones count
if a.touch then  -- housekeeping, once in a while per worker and scope (worker/flow_store.py), not per call
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now))
  redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', num(now))
  for _, key in ipairs({KEYS[9], KEYS[10]}) do redis.call('EXPIRE', key, cfg.state_ttl_s) end
end
redis.call('ZREM', KEYS[2], job)
local others = redis.call('ZCOUNT', KEYS[2], live, '+inf')  -- permits still held by other calls
local in_flight = others + 1  -- this one included (its lease may have lapsed: it still ran)
local level = math.max(1, math.floor(tonumber(a.level) or in_flight))  -- the level the call ran at
local s = redis.call('HMGET', KEYS[1], 'limit', 'cap', 'p_hat', 'p_n', 'short', 'tokens', 'last_decrease_s',
  'state', 'opens', 'win', 'ok', 'failed', 'prev_ok', 'prev_failed', 'probe', 'L' .. level, 'reserved_until_s',
  'line')
local fresh = true  -- no such state yet: the hash this call writes is new and needs its TTL
for i = 1, 18 do if s[i] then fresh = false end end
-- how many wait in line (the 'line' field, set by acquire.lua, says whether anyone may: else none)
local waiting = nil
local function line_length()
  if waiting == nil then
    waiting = s[18] and redis.call('ZCARD', KEYS[7]) or 0
    if waiting == 0 and s[18] then redis.call('HDEL', KEYS[1], 'line') end  -- found empty: nobody waits
  end
  return waiting
end
-- fields of the state hash to write, all in one HSET at the end
local put = {}
local function set(...)
  local kv = {...}
  for i = 1, #kv, 2 do put[kv[i]] = kv[i + 1] end
end
local limit = clamp(tonumber(s[1]) or cfg.initial, cfg.min, cfg.max)
local limit_before = limit
local replace, verdict = 1, ''
if outcome == 'ok' or outcome == 'overloaded' then
  local cap = tonumber(s[2])
  local p_hat, p_n, short = tonumber(s[3]) or 0, tonumber(s[4]) or cfg.baseline_prior_n, tonumber(s[5]) or 0
  local tokens, last_dec = tonumber(s[6]) or cfg.replace_burst, tonumber(s[7]) or 0
  local shed = outcome == 'overloaded' and 1 or 0
  local function baseline(x)
    p_n = math.min(cfg.baseline_window, p_n + 1)
    p_hat = p_hat + (x - p_hat) / p_n
  end
  set('L' .. level, counted(s[16], shed))
  short = short + (shed - short) / cfg.excess_window
  if shed == 0 then
    tokens = math.min(cfg.replace_burst, tokens + cfg.replace_ratio)
    if not cap or level <= cap then baseline(0) end
    local grow = in_flight >= limit * APP_LIMITED or line_length() > 0
    if cap and level > cap then
      local _, _, n_up, s_up = fit(KEYS[1], put, cap)
      if n_up >= cfg.raise_min_n and s_up / n_up <= p_hat + cfg.step_min_gap then
        -- answers above the capacity we believed in, several and about as often as below (calls
        -- still on their way blur the step by a level now and then, not like this): the pool grew.
        -- Forget the old capacity and slow-start again until a 503 says where the pool stops.
        cap = nil
        limit = math.min(cfg.max, math.max(limit, level + 1))
      else
        limit = math.min(cfg.max, math.max(limit, math.min(level + 1, cap + 2)))  -- look one further
      end
    elseif grow then
      limit = math.min(cfg.max, limit + (cap and cfg.probe_gain / limit or 1))
    end
  else
    local step, answered = fit(KEYS[1], put)
    local jump = math.max(cfg.step_min_gap, cfg.excess_z * math.sqrt(math.max(p_hat * (1 - p_hat), 0.01) * EWMA_VAR))
    replace = 0
    if step and level > step then
      verdict, cap = 'capacity', step
      limit = math.max(cfg.min, math.min(limit, step))
    elseif cap and level > cap then
      verdict = 'capacity'
      limit = math.max(cfg.min, math.min(limit, cap))
    elseif answered < cfg.blind_n and short - p_hat >= jump then
      verdict = 'excess'
      if started >= last_dec then  -- one decrease per overload event, from what was really in flight
        limit = math.max(cfg.min, math.min(limit, in_flight) * cfg.decrease)
        last_dec = now
      end
    else
      verdict = 'random'
      baseline(1)
      if tokens >= 1 then tokens, replace = tokens - 1, 1 end
    end
    -- a 503 the limit handles is neutral for the breaker until the limit is at its floor
    event = (verdict == 'random' or limit <= cfg.min) and 'failure' or 'neutral'
  end
  set('limit', num(limit), 'cap', cap and num(cap) or '',
    'p_hat', num(p_hat), 'p_n', num(p_n), 'short', num(short), 'tokens', num(tokens),
    'last_decrease_s', num(last_dec))
end
-- the breaker: closed -> open on enough failures making up enough of the recent outcomes and of
-- the calls in flight; half-open
-- lets one probe through, whose success closes it and whose failure re-opens it for longer
local state = s[8] or 'closed'
local function transition(to, why)
  local opens, open_until = 0, 0
  if to == 'open' then
    opens = (tonumber(s[9]) or 0) + 1
    open_until = now + math.min(cfg.cool_down_max_s, cfg.cool_down_s * 2 ^ (opens - 1))
  end
  set('state', to, 'since_s', num(now), 'open_until_s', num(open_until),
    'opens', opens, 'win', 0, 'ok', 0, 'failed', 0, 'prev_ok', 0, 'prev_failed', 0, 'probe', '',
    'probe_until_s', 0)
  log(KEYS[6], {t = now, model = model, tier = tier, from = state, to = to, why = why, worker = a.worker})
end
if state == 'closed' and event ~= 'neutral' then
  local idx, ok, failed, pok, pfailed, weight = slide(tonumber(s[10]) or 0, tonumber(s[11]) or 0,
    tonumber(s[12]) or 0, tonumber(s[13]) or 0, tonumber(s[14]) or 0, now, cfg.breaker_window_s)
  if event == 'success' then ok = ok + 1 else failed = failed + 1 end
  -- calls still in flight count as not failed: a burst of fast 503s must not outvote the answers
  -- still on their way (a shed comes back at once, an answer after its service time)
  local rf, ro = failed + pfailed * weight, ok + pok * weight + others
  if event == 'failure' and rf >= cfg.breaker_min_failures and rf >= cfg.breaker_failure_ratio * (rf + ro) then
    transition('open', string.format('%.1f failures, %d%% of outcomes in %gs', rf,
      math.floor(100 * rf / (rf + ro)), cfg.breaker_window_s))
  else
    set('win', num(idx), 'ok', num(ok), 'failed', num(failed), 'prev_ok', num(pok), 'prev_failed', num(pfailed))
  end
elseif state == 'half_open' and s[15] == job then
  if event == 'success' then transition('closed', 'probe succeeded')
  elseif event == 'failure' then transition('open', 'probe failed')
  else set('probe', '', 'probe_until_s', 0) end
end
if next(put) then
  local flat = {}
  for k, v in pairs(put) do flat[#flat + 1] = k; flat[#flat + 1] = v end
  redis.call('HSET', KEYS[1], unpack(flat))
end
if fresh or a.touch then redis.call('EXPIRE', KEYS[1], cfg.state_ttl_s) end
-- Wake waiters into the permits this release freed: their arq jobs become due now (ZADD XX: only
-- jobs still queued) instead of every waiter polling. One replaces the call that ended (not after
-- a 503 taken for capacity, nor past the replacement budget), plus one per whole permit the limit
-- grew. The woken hash lets the worker's after-job hook re-apply a wake that arq's own re-scoring
-- of a finishing run overwrote (settle.lua). While the model is paused by a 429 (this call's or an
-- earlier one's), the woken jobs are due when the pause ends, their permits held for them until then:
-- a wake skipped for the pause would leave its permit idle while the line waits for its fallback timer
-- (pauses longer than that timer excepted).
local pause_s = tonumber(a.pause_s)
local want = replace + math.max(0, math.floor(limit) - math.floor(limit_before))
-- the last call in flight: no other release is to come, so a line left asleep would wait for its
-- fallback timer (a 503 taken for capacity replaces nobody, and the limit may have room all the same)
if others == 0 then want = math.max(want, 1) end
local wake = 0
if want > 0 and line_length() > 0 then  -- someone waits
  local reserved = 0  -- permits held for woken jobs (none live once the latest reservation has ended)
  if (tonumber(s[17]) or 0) > now then reserved = redis.call('ZCOUNT', KEYS[10], live, '+inf') end
  wake = math.min(math.floor(limit) - others - reserved, want)
end
local resume = now  -- when the woken jobs may run: now, or when the model's pause ends
if wake > 0 then
  resume = math.max(pause_s and now + pause_s or now, tonumber(redis.call('HGET', KEYS[3], 'until_s')) or 0)
  -- a pause past the line's own fallback timer: its jobs come back on that timer and are told the
  -- pause's end (a wake so far ahead would hold its permit after an operator's `flexq resume`)
  if resume - now > cfg.waiter_timeout_s then wake = 0 end
end
if wake > 0 then
  flush_writes()  -- arq's queue as the batch's earlier calls left it (worker/flow_store.py group commit)
  -- a woken job goes ahead of jobs that are due but were never tried (a backlog would otherwise
  -- hold it up: arq takes due jobs oldest first, and each of those would only join the line)
  -- arq compares due times with each worker's own clock, not Redis's: wakes are written on that clock
  local now_ms, due, woke, tries = nil, nil, 0, 0
  while wake > 0 and tries < 64 do
    tries = tries + 1
    local head = redis.call('ZPOPMIN', KEYS[7], 1)
    if #head == 0 then break end
    if redis.call('ZSCORE', KEYS[8], head[1]) then
      if not now_ms then
        now_ms = tonumber(a.arq_now_ms) or math.floor(now * 1000)
        if resume > now then  -- paused: due at the pause's end (ahead of nobody: all wait for it)
          due = a.arq_now_ms and now_ms + math.floor((resume - now) * 1000) or math.floor(resume * 1000)
        else
          local oldest = redis.call('ZRANGE', KEYS[8], 0, 0, 'WITHSCORES')
          if #oldest == 2 and tonumber(oldest[2]) <= now_ms then now_ms = math.max(1, tonumber(oldest[2]) - 1) end
          due = now_ms
        end
      end
      redis.call('ZADD', KEYS[8], 'XX', due, head[1])
      redis.call('HSET', KEYS[9], head[1], due)
      redis.call('ZADD', KEYS[10], num(resume + cfg.wake_hold_s), head[1])  -- its permit, nobody else's
      wake, woke = wake - 1, woke + 1
    end
  end
  if woke > 0 then
    -- acquire.lua reads it: when the latest reservation ends
    redis.call('HSET', KEYS[1], 'reserved_until_s', num(math.max(tonumber(s[17]) or 0, resume + cfg.wake_hold_s)))
    for _, key in ipairs({KEYS[1], KEYS[10]}) do redis.call('EXPIRE', key, cfg.state_ttl_s) end
    -- wakes of jobs that never came back to spend them (cancelled, ended elsewhere) must not pile up
    redis.call('EXPIRE', KEYS[9], cfg.state_ttl_s)
    if redis.call('HLEN', KEYS[9]) > WOKEN_MAX then
      local all, stale = redis.call('HGETALL', KEYS[9]), {}
      for i = 1, #all, 2 do
        if tonumber(all[i + 1]) < now_ms - 1000 * cfg.permit_ttl_s then stale[#stale + 1] = all[i] end
      end
      for i = 1, #stale, 1000 do redis.call('HDEL', KEYS[9], unpack(stale, i, math.min(i + 999, #stale))) end
    end
  end
end
-- 429: pause the model for every worker; per-day and billing quotas raise an alert
if pause_s then
  extend_pause(KEYS[3], now + pause_s, a.reason, now)
  if a.alert ~= '' then
    if redis.call('HGET', KEYS[4], 'kind') == a.alert then
      redis.call('HINCRBY', KEYS[4], 'count', 1)
      redis.call('HSET', KEYS[4], 'last_s', num(now), 'reason', a.reason)
    else
      redis.call('DEL', KEYS[4])
      redis.call('HSET', KEYS[4], 'kind', a.alert, 'reason', a.reason, 'since_s', num(now), 'last_s', num(now),
        'count', 1)
      log(KEYS[6], {t = now, model = model, tier = tier, from = 'quota_ok', to = 'quota_' .. a.alert,
        why = a.reason, worker = a.worker})
    end
    redis.call('EXPIRE', KEYS[4], cfg.quota_ttl_s)
  end
elseif outcome == 'ok' then  -- an answer to a request sent after the alert: the quota is back
  local since = tonumber(redis.call('HGET', KEYS[4], 'since_s'))
  if since and started >= since then
    local kind = redis.call('HGET', KEYS[4], 'kind')
    redis.call('DEL', KEYS[4])
    log(KEYS[6], {t = now, model = model, tier = tier, from = 'quota_' .. kind, to = 'quota_ok',
      why = 'a request succeeded', worker = a.worker})
  end
end
-- RPM/TPM: refund or correct the window the request was counted in
local drq, dtk = tonumber(a.rq_delta) or 0, tonumber(a.tk_delta) or 0
if drq ~= 0 or dtk ~= 0 then
  local r = redis.call('HMGET', KEYS[5], 'win', 'rq', 'tk', 'prev_rq', 'prev_tk')
  local win, at = tonumber(r[1]), math.floor(started / cfg.rate_window_s)
  local rq, tk = 'rq', 'tk'
  if win and at == win - 1 then rq, tk = 'prev_rq', 'prev_tk' end
  if win and at >= win - 1 and at <= win then
    local i = (rq == 'rq') and 2 or 4
    redis.call('HSET', KEYS[5], rq, num(math.max(0, (tonumber(r[i]) or 0) + drq)),
      tk, num(math.max(0, (tonumber(r[i + 1]) or 0) + dtk)))
  end
end
return {num(limit), verdict}
