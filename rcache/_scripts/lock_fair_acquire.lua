-- Acquire an exclusive lease in FIFO order (fair=True; after RedissonFairLock).
-- KEYS[1] lock key        {prefix}:l:{name}
-- KEYS[2] fence counter   {prefix}:l:{name}:fence
-- KEYS[3] queue ZSET      {prefix}:l:{name}:fq    member = waiter token, score = ticket
-- KEYS[4] waiter expiry   {prefix}:l:{name}:fqt   member = waiter token, score = expiry
--                                                  (server TIME, ms: no client clocks)
-- KEYS[5] ticket counter  {prefix}:l:{name}:fqn
-- ARGV[1] token, ARGV[2] lease ms, ARGV[3] waiter lifetime ms (a waiter refreshes it on
-- every retry; a crashed waiter leaves the queue when it runs out), ARGV[4] '1' to join
-- the queue when not granted (a blocking acquire), '0' for a single try
-- The lock is granted only when it is free and the caller is first in the queue (or the
-- queue is empty): no barging.
-- Returns {1, fence}  acquired (a retry that finds its own token: lease replaced)
--         {0, pttl}   not granted; pttl of the holder, or 0 while a waiter ahead of the
--                     caller is taking its turn
-- @include _shared
local now = server_ms()
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, d in ipairs(dead) do
  redis.call('ZREM', KEYS[3], d)
  redis.call('ZREM', KEYS[4], d)
end
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
if cur == false then
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)
  if head[1] == nil or head[1] == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[4], ARGV[1])
    return {1, next_fence(KEYS[2])}
  end
end
if ARGV[4] == '1' then
  if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), ARGV[1])
  end
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
  redis.call('PEXPIRE', KEYS[5], ARGV[3])
end
local w = redis.call('PTTL', KEYS[1])
if w < 0 then w = 0 end
return {0, w}
