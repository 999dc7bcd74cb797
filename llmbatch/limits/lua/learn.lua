-- Adopt limits a server reported. (after prelude.lua and leases.lua)
-- KEYS[1] = bucket hash, KEYS[2] = lease zset, KEYS[3] = lease records
-- ARGV = ttl, initial fill, n, then per dimension (name, limit, capacity, rate/s,
--        remaining, unit, own units)
-- The quota's `learned` list is updated, and a bucket seen for the first time starts at
-- what the server has left, less what requests still in flight (other than the reporting
-- one, `own`; expired leases no longer count) will spend there. A -1 remaining leaves a
-- new bucket to start at the configured fill.
-- Returns {learned list, then per dimension what its bucket has available now}.
local ttl, fill, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
purge_expired()
local learned = {}
for part in string.gmatch(redis.call('HGET', key, 'learned') or '', '[^,]+') do
  local name, value = string.match(part, '([^=]+)=(.+)')
  learned[name] = value
end
local i = 4
local available = {}
for d = 1, n do
  local name, limit, cap, rate = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local remaining, unit, own = tonumber(ARGV[i + 4]), ARGV[i + 5], tonumber(ARGV[i + 6])
  i = i + 7
  learned[name] = limit
  if remaining >= 0 and redis.call('HEXISTS', key, name .. ':level') == 0 then
    local others = tonumber(redis.call('HGET', key, 'u:' .. unit .. ':out') or '0') - own
    local level = math.min(cap, math.max(0, cap - remaining + math.max(0, others)))
    redis.call('HSET', key, name .. ':level', level, name .. ':ts', now)
    redis.call('HSET', key, name .. ':synced', 1)
  end
  available[d] = tostring(cap - level_now(key, name, cap, rate, fill, now))
end
local names = {}
for name in pairs(learned) do table.insert(names, name) end
table.sort(names)
local parts = {}
for _, name in ipairs(names) do table.insert(parts, name .. '=' .. learned[name]) end
local text = table.concat(parts, ',')
redis.call('HSET', key, 'learned', text)
touch(ttl)
local result = {text}
for d = 1, n do result[d + 1] = available[d] end
return result
