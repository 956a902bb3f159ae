-- budget: reserve an attempt's estimated cost against every budget of its job, settle it, or read them.
--
-- KEYS[1] holds  zset  {queue}:budget:holds  reservation id -> when it lapses (s)
-- KEYS[2] held   hash  {queue}:budget:held  reservation id -> JSON {usd, keys: [[key, window end s], ...]}
-- ARGV[1] JSON {op ('reserve' | 'settle' | 'peek'), now ('' = Redis TIME), prefix ('{queue}:budget:'),
--               budgets: [[scope, window ('day' | 'month'), limit usd], ...] (reserve, peek),
--               id, usd, ttl_s (reserve), hold_keys: [[key, end s], ...] (settle)}
--
-- Each budget's window is a UTC calendar day or month of the Redis clock: its hash is
-- {prefix}{scope}:{window id} (`2026-12-03`, `2026-12`) with `spent` and `reserved` (USD), kept
-- GRACE_S past the window's end. Those keys are built here from the clock, not passed in KEYS
-- (a single Redis, not Cluster, like the flow-control scripts).
--
-- Every call first purges the reservations that lapsed (a worker died between reserve and settle).
-- reserve: if the estimate fits every budget (spent + reserved + usd <= limit, and spent < limit),
--   add it to each one's `reserved`, remember the reservation, reply {1, now, keys}; else reserve
--   nothing and reply {0, now, index (1-based) of the first budget that refused, spent, reserved, end}.
-- settle: drop the reservation (if it has not lapsed) and add `usd`, the actual cost, to `spent` of
--   the windows it was reserved in (the window the call started in). Reply 1.
-- peek: {now, {window id, spent, reserved, end}...} per budget, for `flexq stats`.

local GRACE_S = 86400 * 7
local a = cjson.decode(ARGV[1])
local now = clock(a.now)

local function civil(days)  -- days since 1970-01-01 -> year, month, day (H. Hinnant's algorithm)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

-- the window holding `now`: its id and its end (s)
local function window(kind)
  local days = math.floor(now / 86400)
  local y, m, d = civil(days)
  if kind == 'day' then return string.format('%04d-%02d-%02d', y, m, d), (days + 1) * 86400 end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return string.format('%04d-%02d', y, m), days_from_civil(ny, nm, 1) * 86400
end

local function undo(id)
  local raw = redis.call('HGET', KEYS[2], id)
  if raw then
    local h = cjson.decode(raw)
    for _, k in ipairs(h.keys) do
      if h.usd > 0 and redis.call('EXISTS', k[1]) == 1 then redis.call('HINCRBYFLOAT', k[1], 'reserved', num(-h.usd)) end
    end
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', num(now))) do undo(id) end

local function state(b)
  local wid, ends = window(b[2])
  local key = a.prefix .. b[1] .. ':' .. wid
  local s = redis.call('HMGET', key, 'spent', 'reserved')
  return key, wid, ends, tonumber(s[1]) or 0, math.max(0, tonumber(s[2]) or 0)
end

if a.op == 'peek' then
  local out = {num(now)}
  for _, b in ipairs(a.budgets) do
    local _, wid, ends, spent, reserved = state(b)
    table.insert(out, {wid, num(spent), num(reserved), num(ends)})
  end
  return out
end

if a.op == 'settle' then
  undo(a.id)
  local usd = tonumber(a.usd) or 0
  if usd > 0 then
    for _, k in ipairs(a.hold_keys) do
      redis.call('HINCRBYFLOAT', k[1], 'spent', num(usd))
      redis.call('EXPIREAT', k[1], math.ceil(k[2] + GRACE_S))
    end
  end
  return 1
end

-- reserve
local usd = math.max(0, tonumber(a.usd) or 0)
local found = {}
for i, b in ipairs(a.budgets) do
  local key, _, ends, spent, reserved = state(b)
  local limit = tonumber(b[3])
  if spent >= limit or spent + reserved + usd > limit * (1 + 1e-9) then
    return {0, num(now), i, num(spent), num(reserved), num(ends)}
  end
  table.insert(found, {key, ends})
end
for _, k in ipairs(found) do
  redis.call('HINCRBYFLOAT', k[1], 'reserved', num(usd))
  redis.call('EXPIREAT', k[1], math.ceil(k[2] + GRACE_S))
end
if #found > 0 then
  redis.call('HSET', KEYS[2], a.id, cjson.encode({usd = usd, keys = found}))
  redis.call('ZADD', KEYS[1], num(now + tonumber(a.ttl_s)), a.id)
end
return {1, num(now), cjson.encode(found)}
