-- Take a request from every bucket at once, or say how long to wait.
-- (after prelude.lua and leases.lua; the loader fills in the starting AIMD cap)
-- KEYS[1] = bucket hash, KEYS[2] = lease zset, KEYS[3] = lease records
-- ARGV = key ttl, max_concurrency (0 = none), lease id, lease seconds, aimd (1: cap the
--        leases at the shared AIMD cap while no limit is known), learn (1: refuse when the
--        quota's learned limits differ from the caller's), the learned limits the caller
--        paces at, the request's units (requests, tokens, input_tokens, output_tokens),
--        n, then per dimension (name, capacity, rate/s, amount, initial_fill, cushion,
--        transit refill).
-- Returns {status, learned, pause}: `learned` is the quota's learned limits
-- ("rpm=600,tpm=150000"), `pause` the seconds left of a 429's pause. Status "learned":
-- the caller does not pace at `learned` yet, nothing was taken; a number > 0: the wait;
-- -1: a concurrency slot is needed; 0: taken, and then per dimension: available after,
-- what was outstanding (taken, not yet released) before, cumulative corrections,
-- cumulative taken, what the bucket was charged (the amount, plus transit refill), and
-- cumulative refunds.
local ttl, maxc, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local lease_seconds, aimd, learn = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local learned = redis.call('HGET', key, 'learned') or ''
if learn == 1 and learned ~= ARGV[7] then
  -- Another process learned a limit: charge this request for it too, so adopt it first.
  return {'learned', learned, '0'}
end
local units = {ARGV[8], ARGV[9], ARGV[10], ARGV[11]}
local n = tonumber(ARGV[12])
local wait, pause_left = 0, 0
local pause = tonumber(redis.call('HGET', key, 'pause_until') or '0')
if pause > now then
  wait = pause - now
  pause_left = wait
end
purge_expired()
local names, levels, amounts, texts, caps, charges = {}, {}, {}, {}, {}, {}
local i = 13
for d = 1, n do
  local name = ARGV[i]
  local cap, rate = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local amount, fill, cushion = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local transit, text = tonumber(ARGV[i + 6]), ARGV[i + 3]
  i = i + 7
  local level = level_now(key, name, cap, rate, fill, now)
  if redis.call('HEXISTS', key, name .. ':level') == 0 then
    -- A new bucket starts now, whether or not this request fits: its refill must
    -- count from here, or a refused first request would wait forever.
    redis.call('HSET', key, name .. ':level', level, name .. ':ts', now)
  end
  -- a (nearly) full bucket: the server's, full too, gains nothing while it is on its way
  charges[d] = math.max(level, transit) + amount - level
  names[d], levels[d], amounts[d], texts[d], caps[d] = name, level, amount, text, cap
  if amount + cushion > cap then cushion = 0 end
  local missing = level + amount + cushion - cap
  if missing > 1e-9 then wait = math.max(wait, missing / rate) end
end
if aimd == 1 and n == 0 and learned == '' and maxc > 0 then
  local probe = tonumber(redis.call('HGET', key, 'aimd_cap') or '') or math.min(maxc, AIMD_START)
  maxc = math.max(1, math.min(maxc, math.floor(probe)))
end
if maxc > 0 and wait == 0 and redis.call('ZCARD', leases) >= maxc then wait = -1 end
if wait ~= 0 then
  touch(ttl)
  return {tostring(wait), learned, tostring(pause_left)}
end
local result = {'0', learned, '0'}
local record = {}
for d = 1, n do
  local name = names[d]
  redis.call('HSET', key, name .. ':level', levels[d] + charges[d], name .. ':ts', now)
  local out_before = tonumber(redis.call('HGET', key, name .. ':out') or '0')
  local adj = tonumber(redis.call('HGET', key, name .. ':adj') or '0')
  local refunded = tonumber(redis.call('HGET', key, name .. ':refunded') or '0')
  local taken = tonumber(redis.call('HINCRBYFLOAT', key, name .. ':taken', amounts[d]))
  if amounts[d] ~= 0 then
    -- the amount as given, so that forgetting the lease subtracts exactly this
    redis.call('HINCRBYFLOAT', key, name .. ':out', texts[d])
    table.insert(record, name .. ':out=' .. texts[d])
  end
  local j = (d - 1) * 6 + 4
  result[j] = tostring(caps[d] - levels[d] - charges[d])
  result[j + 1] = tostring(out_before)
  result[j + 2] = tostring(adj)
  result[j + 3] = tostring(taken)
  result[j + 4] = tostring(charges[d])
  result[j + 5] = tostring(refunded)
end
local unit_names = {'requests', 'tokens', 'input_tokens', 'output_tokens'}
for u = 1, 4 do
  if tonumber(units[u]) ~= 0 then
    local field = 'u:' .. unit_names[u] .. ':out'
    redis.call('HINCRBYFLOAT', key, field, units[u])
    table.insert(record, field .. '=' .. units[u])
  end
end
redis.call('ZADD', leases, now + lease_seconds, lease)
redis.call('HSET', counted, lease, table.concat(record, ','))
touch(ttl)
return result
