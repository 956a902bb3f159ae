-- settle: after arq re-scored a finished run, re-apply a wake that arrived while it was finishing.
--
-- KEYS[1] woken hash {queue}:flow:woken, KEYS[2] arq queue zset
-- ARGV[1] job id. Reply: 1 if the wake was re-applied.

local at = redis.call('HGET', KEYS[1], ARGV[1])
if not at or not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], 'XX', at, ARGV[1])  -- the wake stays in the hash until acquire spends it
return 1
