-- claim: take the due arq jobs this worker has slots for and read their flexq records, in one call.
--
-- Replaces, per job, arq's start (WATCH in-progress, EXISTS, ZSCORE, MULTI PSETEX EXEC) and the first
-- step of its run (MULTI GET job, INCR retries, EXPIRE, ZREM abort EXEC), plus flexq's own record read:
-- one round trip for all the jobs one poll found due instead of five per job. The queue's scores, the
-- abort requests and the records are read and written once for the whole batch (ZMSCORE, ZREM, MGET);
-- only the in-progress keys are set one by one. flexq's only arq task is ``run_generation(job_id)``,
-- so arq's job hash is not read (it stays, for arq's tools and for a plain arq worker), and its retry
-- counter is not kept (flexq bounds retries by the deadline; arq's max_tries is unbounded here).
--
-- KEYS[1] arq queue zset   KEYS[2] arq abort zset
-- KEYS[1 + 2i] job i's arq in-progress key   KEYS[2 + 2i] job i's flexq record   (i = 1 .. n)
-- ARGV[1] now (ms)   ARGV[2] in-progress TTL (ms): the worker's lease, so that the attempt's opening
--         need not set it again   ARGV[2 + i] job i's id
-- Reply, one entry per job in order: {0} not claimed (running elsewhere, no longer queued, or deferred
--        past now); {1, score, record text or false}: claimed, its in-progress key set. A pending abort
--        request is spent (as arq's run does): the record, which a cancel has changed first, says what to do.

local n = #ARGV - 2
local now = tonumber(ARGV[1])
local ids = {}
for i = 1, n do ids[i] = ARGV[2 + i] end
local scores = redis.call('ZMSCORE', KEYS[1], unpack(ids))
local out, claimed, records = {}, {}, {}
for i = 1, n do
  local score = scores[i]
  out[i] = {0}
  if score and tonumber(score) <= now and redis.call('SET', KEYS[1 + 2 * i], '1', 'NX', 'PX', ARGV[2]) then
    out[i] = {1, score}
    claimed[#claimed + 1] = ids[i]
    records[#records + 1] = KEYS[2 + 2 * i]
  end
end
if #claimed > 0 then
  redis.call('ZREM', KEYS[2], unpack(claimed))
  local texts = redis.call('MGET', unpack(records))
  local j = 0
  for i = 1, n do
    if out[i][1] == 1 then
      j = j + 1
      out[i][3] = texts[j]
    end
  end
end
return out
