-- The shared AIMD concurrency cap: +1/cap after a success, halved on a 429.
-- (on its own; the loader fills in the starting AIMD cap)
-- KEYS[1] = bucket hash; ARGV = "up" | "down", ceiling, ttl
-- Returns the cap.
local key = KEYS[1]
local ceiling, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local cap = tonumber(redis.call('HGET', key, 'aimd_cap') or '') or math.min(ceiling, AIMD_START)
if ARGV[1] == 'up' then
  cap = math.min(ceiling, cap + 1 / cap)
else
  cap = math.max(1, cap / 2)
end
redis.call('HSET', key, 'aimd_cap', cap)
redis.call('EXPIRE', key, ttl)
return tostring(cap)
