-- cas: apply one record change only if the record is still the text it was decided from.
--
-- KEYS[1] record  string {queue}:job:{id}
-- ARGV[1] sha1 (hex) of the record text the change was decided from, or (ARGV[3] = 'text') that text
--         itself (fakeredis's Lua, used by the embedded `flexq batch`, has no redis.sha1hex)
-- ARGV[2] JSON list of the change's commands, each [name, arg, ...] with every argument a string:
--         the record's SET, its status index move, its event, arq scheduling, leases, counters
--         (``producer.store`` builds them, ``producer.commands`` writes them down; the keys they name are the queue's and arq's, on this
--         one Redis, as every flexq key is: flexq does not run on Redis Cluster).
-- Reply: 1 applied; 0 the record changed meanwhile (read it and decide again); -1 the record is gone.

-- One command of the list. FLEXQ.HADD key field amount ... (producer.commands.Commands.hadd) is not
-- Redis's: it adds each amount to its field, as HINCRBYFLOAT does, with one HMGET and one HSET.
local function run(command)
  if command[1] ~= 'FLEXQ.HADD' then return redis.call(unpack(command)) end
  local fields, put = {}, {}
  for i = 3, #command, 2 do fields[#fields + 1] = command[i] end
  local old = redis.call('HMGET', command[2], unpack(fields))
  for i, field in ipairs(fields) do
    put[#put + 1] = field
    put[#put + 1] = string.format('%.17g', (tonumber(old[i]) or 0) + tonumber(command[2 + 2 * i]))
  end
  return redis.call('HSET', command[2], unpack(put))
end

local function cas(key, expected, commands, mode)
  local raw = redis.call('GET', key)
  if not raw then return -1 end
  local seen = mode == 'text' and raw or redis.sha1hex(raw)
  if seen ~= expected then return 0 end
  for _, command in ipairs(cjson.decode(commands)) do
    run(command)
  end
  return 1
end
-- END OF cas (worker/flow_store.py appends the function above to its flow scripts, not this line)
return cas(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
