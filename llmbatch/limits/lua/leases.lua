-- Shared by the scripts that count permits (acquire, learn, release; after prelude.lua).
-- Every permit is a lease: KEYS[2] scores it by its expiry, KEYS[3] records what it
-- counted as outstanding ("rpm:out=1,u:tokens:out=400": fields of the bucket hash, and
-- amounts). Releasing a lease, or its expiry (a worker that was killed), subtracts
-- exactly that, once.
local leases, counted = KEYS[2], KEYS[3]
local function forget(lease)
  redis.call('ZREM', leases, lease)
  local record = redis.call('HGET', counted, lease)
  if not record then return end
  redis.call('HDEL', counted, lease)
  for field, amount in string.gmatch(record, '([^,=]+)=([^,]+)') do
    local out = tonumber(redis.call('HGET', key, field) or '0') - tonumber(amount)
    if out > 1e-9 then
      redis.call('HSET', key, field, out)
    else
      redis.call('HDEL', key, field)
    end
  end
end
local function purge_expired()
  for _, lease in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
    forget(lease)
  end
end
local function touch(ttl)
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', leases, ttl)
  redis.call('EXPIRE', counted, ttl)
end
