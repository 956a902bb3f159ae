-- Shared helpers, prepended to every flow-control script (worker/flow_store.py loads them once).
-- Times are seconds on the Redis server's clock (TIME) unless a call passes `now` (tests).

local function num(x) return string.format('%.17g', x) end

local redis_now = nil  -- the server's clock, read once per script call (a batch of calls shares it)
local function clock(given)
  if given ~= nil and given ~= cjson.null and given ~= '' then return tonumber(given) end
  if not redis_now then
    local t = redis.call('TIME')
    redis_now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return redis_now
end

-- Writes a group commit holds back to send merged at the batch's end (worker/flow_store.py); a step that
-- reads arq's queue calls this first. Nothing to do outside a batch.
local flush_writes = function() end

local function clamp(x, lo, hi) return math.max(lo, math.min(hi, x)) end

-- Two fixed windows, the older weighted by how much of it still overlaps the sliding one:
-- returns the window index, the current pair, the previous pair and the previous window's weight.
local function slide(index, a, b, pa, pb, now, window)
  local idx = math.max(index, math.floor(now / window))
  if idx == index + 1 then pa, pb, a, b = a, b, 0, 0
  elseif idx > index + 1 then pa, pb, a, b = 0, 0, 0, 0 end
  return idx, a, b, pa, pb, clamp(1 - (now - idx * window) / window, 0, 1)
end

local LOG_LAST = 99
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
