-- acquire: admit one attempt of one job, or say why not.
--
-- KEYS[1] state    hash  {queue}:flow:state:{model}:{tier}  (limit, breaker, controller state)
-- KEYS[2] permits  zset  {queue}:flow:permits:{model}:{tier}  job -> lease expiry (s)
-- KEYS[3] pause    hash  {queue}:flow:pause:{model}  until_s, reason, since_s
-- KEYS[4] rate     hash  {queue}:flow:rate:{model}  RPM/TPM sliding-window counters
-- KEYS[5] scopes   set   {queue}:flow:scopes  "model tier" of every scope seen
-- KEYS[6] log      list  {queue}:flow:log  breaker and quota transitions (JSON)
-- KEYS[7] waiters  zset  {queue}:flow:waiters:{model}:{tier}  job -> its enqueue time (FIFO by job)
-- KEYS[8] woken    hash  {queue}:flow:woken  job -> wake time (ms) not yet spent
-- KEYS[9] arq queue zset (unused here; kept so both scripts take the same key list)
-- KEYS[10] reserved zset {queue}:flow:reserved:{model}:{tier}  woken job -> until when its permit is held (s)
-- ARGV[1] JSON {job, now ('' = Redis TIME), since (the job's enqueue time, s: its place in line), cost
--               (estimated tokens), model, tier, rpm, tpm (0 = none), worker, touch (true: also the
--               housekeeping: scope seen, expired permits and reservations swept, TTLs refreshed)}
-- ARGV[2] JSON config {initial, min, max, permit_ttl_s, state_ttl_s, rate_window_s}
--
-- A release that wakes a job reserves a permit for it (release.lua) for wake_hold_s: nobody else
-- takes that permit meanwhile, whatever stale wake it carries, so the line stays FIFO.
--
-- Checks, in order: the model's 429 pause, the scope's breaker, the model's RPM/TPM window, then a
-- concurrency permit. A job refused for want of a permit joins the waiters (oldest job first: a job
-- shed and retried keeps its place) and is woken by a
-- release; while others wait, a free permit belongs to a woken job or to one of the first `free` in
-- line, not to a newcomer (ack clocking). Reply: {admitted, reason, wait_s, probe, now, limit, level, line}
-- where level is the number of permits held once this one is taken (the in-flight level it ran at) and
-- line is 1 while the scope's line may hold anyone (the limit binds: worker/flow_store.py limit_binds).

local a, cfg = cjson.decode(ARGV[1]), cjson.decode(ARGV[2])
local job, now, cost, model, tier = a.job, clock(a.now), tonumber(a.cost), a.model, a.tier
local rpm, tpm, ttl, window = tonumber(a.rpm), tonumber(a.tpm), cfg.permit_ttl_s, cfg.rate_window_s
local live = '(' .. num(now)  -- permits and reservations expire by score: only later ones count
if a.touch then  -- housekeeping, once in a while per worker and scope (worker/flow_store.py), not per call
  redis.call('ZADD', KEYS[5], num(now), model .. ' ' .. tier)  -- scopes by last use: stats show recent ones
  redis.call('EXPIRE', KEYS[5], cfg.state_ttl_s)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now))
  redis.call('EXPIRE', KEYS[2], cfg.state_ttl_s)
end
local s = redis.call('HMGET', KEYS[1], 'limit', 'state', 'open_until_s', 'probe_until_s', 'probe', 'reserved_until_s',
  'line')
local limit = clamp(tonumber(s[1]) or cfg.initial, cfg.min, cfg.max)
local line = s[7]  -- set while the line may hold anyone (see below)
local in_flight = redis.call('ZCOUNT', KEYS[2], live, '+inf')
if in_flight == 0 and not a.touch then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now)) end  -- lapsed ones
local function reply(ok, reason, wait, probe, held)
  return {ok, reason, num(wait), probe, num(now), num(limit), held, line and 1 or 0}
end
-- a wake is spent by this attempt, whatever answers it (a paused job must not re-run at once);
-- only a live reservation in this scope puts the job ahead of the line (a release writes the wake
-- and the reservation together, so a job with no wake to spend has no reservation either). The state's
-- reserved_until_s says when the scope's latest reservation ends: after it, the set holds none live.
local spent = redis.call('HDEL', KEYS[8], job) == 1
local was_woken, reserved = false, 0
if (tonumber(s[6]) or 0) > now then
  redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', num(now))
  was_woken = spent and redis.call('ZREM', KEYS[10], job) == 1
  reserved = redis.call('ZCARD', KEYS[10])
elseif s[6] then  -- every reservation has lapsed: drop them, once
  redis.call('DEL', KEYS[10])
  redis.call('HDEL', KEYS[1], 'reserved_until_s')
end
local paused_until = tonumber(redis.call('HGET', KEYS[3], 'until_s')) or 0
if paused_until > now then return reply(0, 'paused', paused_until - now, 0, in_flight) end
local held = redis.call('ZSCORE', KEYS[2], job)
if held and tonumber(held) > now then  -- a repeated acquire: keep the permit, count nothing twice
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
    worker = a.worker})
elseif state == 'half_open' and (tonumber(s[4]) or 0) > now then
  return reply(0, 'probe_busy', 0, 0, in_flight)
end
if state == 'half_open' then probe = 1 end
local win, rq, tk, prq, ptk, weight
if rpm > 0 or tpm > 0 then
  local r = redis.call('HMGET', KEYS[4], 'win', 'rq', 'tk', 'prev_rq', 'prev_tk')
  win, rq, tk, prq, ptk, weight = slide(tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0,
    tonumber(r[4]) or 0, tonumber(r[5]) or 0, now, window)
  -- how long until `c` more fits under `lim` (0: now); one request above the whole limit runs alone
  local function wait_for(cur, prev, lim, c)
    c = math.min(c, lim)
    if prev * weight + cur + c <= lim then return 0 end
    if cur + c <= lim then return math.max(0, (weight - (lim - cur - c) / prev) * window) end
    return weight * window + (1 - (lim - c) / cur) * window
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
-- Ack clocking (only while something is in flight: an idle scope has no release to come, and
-- stale waiters, whose jobs were cancelled or moved on, must not lock it)
-- The state's 'line' field is set while the line may hold anyone (set by the first to join, cleared by
-- whoever finds it empty): without it, nobody waits and the line is not looked at.
local free = math.floor(limit) - in_flight - reserved
local in_line, waiting = false, nil
if not line then waiting = 0 end
if line and not was_woken and free > 0 and in_flight + reserved > 0 then
  waiting = redis.call('ZCARD', KEYS[7])
  if waiting > 0 then
    local rank = redis.call('ZRANK', KEYS[7], job)
    in_line = rank == false or rank >= free
  else
    redis.call('HDEL', KEYS[1], 'line')
    line = false
  end
end
if free <= 0 or in_line then
  redis.call('ZADD', KEYS[7], 'NX', num(tonumber(a.since) or now), job)
  redis.call('EXPIRE', KEYS[7], cfg.state_ttl_s)
  if not line then
    redis.call('HSET', KEYS[1], 'line', '1')
    redis.call('EXPIRE', KEYS[1], cfg.state_ttl_s)  -- the hash may be new
    line = '1'
  end
  return reply(0, 'no_permit', 0, 0, in_flight)
end
if waiting ~= 0 then redis.call('ZREM', KEYS[7], job) end  -- it may have been in line
redis.call('ZADD', KEYS[2], num(now + ttl), job)
-- nothing live was held: the set may be new (every creation sets its TTL; a touch refreshes it)
if in_flight == 0 then redis.call('EXPIRE', KEYS[2], cfg.state_ttl_s) end
if probe == 1 then redis.call('HSET', KEYS[1], 'probe', job, 'probe_until_s', num(now + ttl)) end
if win then
  redis.call('HSET', KEYS[4], 'win', num(win), 'rq', num(rq + 1), 'tk', num(tk + cost), 'prev_rq', num(prq),
    'prev_tk', num(ptk))
  redis.call('EXPIRE', KEYS[4], 3 * window)
end
return reply(1, 'ok', 0, probe, in_flight + 1)
