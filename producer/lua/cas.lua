-- cas: apply one record change only if the record is still the text it was decided from.
--
-- KEYS[1] record  string {queue}:job:{id}
-- ARGV[1] sha1 (hex) of the record text the change was decided from, or (ARGV[3] = 'text') that text
--         itself (fakeredis's Lua, used by the embedded `flexq batch`, has no redis.sha1hex)
-- ARGV[2] JSON list of the change's commands, each [name, arg, ...] with every argument a string:
--         the record's SET, its status index move, its event, arq scheduling, leases, counters
--         (``producer.store`` builds them; the keys they name are the queue's and arq's, on this
--         one Redis, as every flexq key is: flexq does not run on Redis Cluster).
-- Reply: 1 applied; 0 the record changed meanwhile (read it and decide again); -1 the record is gone.

local function cas(key, expected, commands, mode)
  local raw = redis.call('GET', key)
  if not raw then return -1 end
  local seen = mode == 'text' and raw or redis.sha1hex(raw)
  if seen ~= expected then return 0 end
  for _, command in ipairs(cjson.decode(commands)) do
    redis.call(unpack(command))
  end
  return 1
end
-- END OF cas (worker/flow_store.py appends the function above to its flow scripts, not this line)
return cas(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
