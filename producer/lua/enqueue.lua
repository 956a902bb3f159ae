-- enqueue: store a new job's record and schedule its arq job, unless the id exists (idempotency).
--
-- KEYS[1] record        string {queue}:job:{id}  the job record (JSON)
-- KEYS[2] queued index  zset   {queue}:idx:queued  id -> time it entered the status (s)
-- KEYS[3] arq job       string arq:job:{id}  arq's job envelope (JSON, never pickle)
-- KEYS[4] arq queue     zset   {queue}:arq  id -> run time (ms)
-- KEYS[5] arq result    string arq:result:{id}   cleared: an old result would stop arq running it
-- KEYS[6] arq retry     string arq:retry:{id}    cleared: a new job starts at try 1
-- KEYS[7] arq abort set zset   arq:abort          the id is removed: an old abort must not hit it
-- KEYS[8] events        stream {queue}:events  one `queued` event appended (capped at ARGV[8], about)
-- ARGV[1] record JSON, ARGV[2] job id, ARGV[3] run-at (ms), ARGV[4] now (s), ARGV[5] arq envelope,
-- ARGV[6] arq job TTL (ms), ARGV[7] record TTL (s), ARGV[8] events kept (0: no event)
-- Reply: the existing record (the job is left as it is), or false when this one was created.

local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
redis.call('DEL', KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[2])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
if tonumber(ARGV[8]) > 0 then
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[8], '*', 'job', ARGV[2], 'status', 'queued', 'at', ARGV[4])
end
return false
