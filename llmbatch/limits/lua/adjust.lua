-- Change bucket levels: a settlement, a response's headers, a 429.
-- (after prelude.lua)
-- KEYS[1] = bucket hash
-- ARGV = mode, pause seconds, ttl, reserve, n, then per dimension (name, unit, capacity,
--        rate/s, fill, value, available_after, uncertain, adjusted_at, taken_at,
--        refunded_at)
-- mode "add": level += value (negative: a refund, counted in the dimension's refunds);
-- mode "observe": value = what the server says it has left right after admitting a
--   request; the last five describe that request's permit: what Redis had left right
--   after it, what may reach the server only after it (earlier permits outstanding then,
--   and the server's refill during its send lag), and the cumulative corrections, takings
--   and refunds when it was taken. Without a permit to compare with (available_after < 0)
--   the level now is compared with, and `uncertain` is the reporting request's own units
--   if Redis still counts them in flight (every other request in flight may not have
--   reached the server). The header-correction rule below is the one of
--   llmbatch.limits._headers.correction (one case table runs against both);
-- mode "empty": at least `pause` seconds of debt, and lifts suspended for a while.
-- Returns {seconds left of a 429's pause, then per dimension what it has available now}.

-- The header-correction rule: the change to what a bucket has available, or nil.
local function correction(server_left, believed, corrected, uncertain, taken, cap, reserve,
                          first, settling, measured)
  local difference = server_left - believed + corrected
  local delta
  if difference > 0 then
    delta = math.max(0, difference - uncertain)
  else
    delta = math.min(0, difference + taken)
  end
  if delta > 0 and (settling or not (measured or first)) then delta = 0 end
  local tolerance = 1 + cap * reserve
  if delta > 0 then tolerance = 0.5 end
  if first or math.abs(delta) > tolerance then return delta end
  return nil
end

local mode, pause, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if pause > 0 then
  local current = tonumber(redis.call('HGET', key, 'pause_until') or '0')
  redis.call('HSET', key, 'pause_until', math.max(current, now + pause))
  local settle = tonumber(redis.call('HGET', key, 'settle_until') or '0')
  redis.call('HSET', key, 'settle_until', math.max(settle, now + 2 * pause + 1))
end
local settle_until = tonumber(redis.call('HGET', key, 'settle_until') or '0')
local pause_until = tonumber(redis.call('HGET', key, 'pause_until') or '0')
local reserve = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local i = 6
local result = {tostring(math.max(0, pause_until - now))}
for d = 1, n do
  local name, unit = ARGV[i], ARGV[i + 1]
  local cap, rate, fill = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local value, after = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local uncertain = tonumber(ARGV[i + 7])
  local adj_at, taken_at = tonumber(ARGV[i + 8]), tonumber(ARGV[i + 9])
  local refunded_at = tonumber(ARGV[i + 10])
  i = i + 11
  local level = level_now(key, name, cap, rate, fill, now)
  local new_level = level
  if mode == 'add' then
    new_level = math.max(0, level + value)
    if value < 0 then
      redis.call('HINCRBYFLOAT', key, name .. ':refunded', level - new_level)
    end
  elseif mode == 'empty' then
    new_level = math.max(level, cap + pause * rate)
  elseif mode == 'observe' then
    local first = redis.call('HSETNX', key, name .. ':synced', 1) == 1
    local settling = now < settle_until
    local delta
    if after < 0 then
      local in_flight = tonumber(redis.call('HGET', key, 'u:' .. unit .. ':out') or '0')
      delta = correction(value, cap - level, 0, in_flight - uncertain, 0, cap, reserve, first,
                         settling, false)
    else
      local adj_now = tonumber(redis.call('HGET', key, name .. ':adj') or '0')
      local taken_now = tonumber(redis.call('HGET', key, name .. ':taken') or '0')
      local refunded_now = tonumber(redis.call('HGET', key, name .. ':refunded') or '0')
      delta = correction(value, after, adj_now - adj_at, uncertain + refunded_now - refunded_at,
                         taken_now - taken_at, cap, reserve, first, settling, true)
    end
    if delta then new_level = math.max(0, level - delta) end
  end
  if mode ~= 'add' then
    redis.call('HINCRBYFLOAT', key, name .. ':adj', new_level - level)
  end
  redis.call('HSET', key, name .. ':level', new_level, name .. ':ts', now)
  result[d + 1] = tostring(cap - new_level)
end
redis.call('EXPIRE', key, ttl)
return result
