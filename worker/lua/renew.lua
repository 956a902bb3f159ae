-- renew: extend the leases of permits this process still holds; lapsed permits are not revived.
--
-- KEYS[1] state    hash  {queue}:flow:state:{model}:{tier}  (probe_until_s follows the probe's lease)
-- KEYS[2] permits  zset  {queue}:flow:permits:{model}:{tier}
-- ARGV[1] now ('' = Redis TIME), ARGV[2] permit ttl (s), ARGV[3..] job ids
-- Reply: how many were still held.

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
