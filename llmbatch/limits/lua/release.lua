-- End a lease. (after prelude.lua and leases.lua)
-- KEYS[1] = bucket hash, KEYS[2] = lease zset, KEYS[3] = lease records
-- ARGV = ttl, lease, n, then per dimension (name, capacity, rate/s, fill, charge)
-- What the lease counted as outstanding is no longer (unless it expired already: then
-- that was subtracted then). An acquire that was cancelled also gives each bucket back
-- what it charged (n > 0); a release gives back nothing (n = 0).
local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[3])
purge_expired()
forget(ARGV[2])
local i = 4
for d = 1, n do
  local name = ARGV[i]
  local cap, rate, fill = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local charge = tonumber(ARGV[i + 4])
  i = i + 5
  local level = level_now(key, name, cap, rate, fill, now)
  redis.call('HSET', key, name .. ':level', math.max(0, level - charge), name .. ':ts', now)
end
touch(ttl)
return 1
