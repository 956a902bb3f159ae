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
-- A group commit (worker/flow_store.py: several calls sent as one) sets `staged` to a list: the commands
-- below, whose keys no other step of the batch reads (a release that reads arq's queue sends them first),
-- are then kept there and sent once per batch, merged by `merged` (one ZREM, ZADD, LPUSH, LTRIM or
-- FLEXQ.HADD per key, one DEL), instead of one by one.
local staged = nil
local MERGEABLE = {ZREM = true, DEL = true, LPUSH = true, LTRIM = true, ['FLEXQ.HADD'] = true}

local function run_now(command)
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

local function run(command)
  local name = command[1]
  if staged and (MERGEABLE[name] or (name == 'ZADD' and tonumber(command[3]))) then  -- ZADD without flags
    staged[#staged + 1] = command
    return
  end
  return run_now(command)
end

-- Staged commands as few commands as give the same end state: for each command and key (DEL: all
-- keys), in the order first seen, the members, pairs, values or summed amounts of every one of them;
-- LTRIM keeps its last range.
local function merged(commands)
  local out, by = {}, {}
  for _, command in ipairs(commands) do
    local name = command[1]
    local id = name == 'DEL' and 'DEL' or name .. ' ' .. command[2]
    local m = by[id]
    if not m then
      m = name == 'DEL' and {'DEL'} or {name, command[2]}
      if name == 'FLEXQ.HADD' then m.sums, m.fields = {}, {} end
      by[id], out[#out + 1] = m, m
    end
    if name == 'LTRIM' then
      m[3], m[4] = command[3], command[4]
    elseif name == 'FLEXQ.HADD' then
      for i = 3, #command, 2 do
        local field = command[i]
        if not m.sums[field] then m.fields[#m.fields + 1], m.sums[field] = field, 0 end
        m.sums[field] = m.sums[field] + tonumber(command[i + 1])
      end
    else
      for i = name == 'DEL' and 2 or 3, #command do m[#m + 1] = command[i] end
    end
  end
  for _, m in ipairs(out) do
    if m.fields then
      for _, field in ipairs(m.fields) do
        m[#m + 1] = field
        m[#m + 1] = string.format('%.17g', m.sums[field])
      end
      m.sums, m.fields = nil, nil
    end
  end
  return out
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
