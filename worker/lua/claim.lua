-- claim: take one due arq job for this worker and read its flexq record, in one call.
--
-- Replaces arq's start (WATCH in-progress, EXISTS, ZSCORE, MULTI PSETEX EXEC) and the first step of
-- its run (MULTI GET job, INCR retries, EXPIRE, ZREM abort EXEC), plus flexq's own record read:
-- one round trip instead of five. flexq's only arq task is ``run_generation(job_id)``, so arq's job
-- hash is not read (it stays, for arq's tools and for a plain arq worker), and its retry counter is not
-- kept (flexq bounds retries by the deadline; arq's max_tries is unbounded here).
--
-- KEYS[1] arq in-progress key   KEYS[2] arq queue zset   KEYS[3] arq abort zset   KEYS[4] flexq record
-- ARGV[1] job id   ARGV[2] now (ms)   ARGV[3] in-progress TTL (ms): the worker's lease, so that the
--         attempt's opening need not set it again
-- Reply: {0} not claimed (running elsewhere, no longer queued, or deferred past now);
--        {1, score, record text or false}: claimed, the in-progress key set. A pending abort request is
--        spent (as arq's run does): the record, which a cancel has changed first, says what to do.

local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return {0} end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then return {0} end  -- running elsewhere
redis.call('ZREM', KEYS[3], ARGV[1])
return {1, score, redis.call('GET', KEYS[4])}
