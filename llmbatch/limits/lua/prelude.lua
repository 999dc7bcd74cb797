-- Shared by every script but aimd.lua (llmbatch.limits.redis puts it first): the server's
-- clock, and a bucket's level now (leaked since its last update; a bucket seen for the
-- first time starts at the configured fill).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = KEYS[1]
local function level_now(hash, name, cap, rate, fill, at)
  local level = tonumber(redis.call('HGET', hash, name .. ':level'))
  local ts = tonumber(redis.call('HGET', hash, name .. ':ts'))
  if level == nil or ts == nil then
    return cap * (1 - fill)
  end
  return math.max(0, level - math.max(0, at - ts) * rate)
end
