-- Take one leased permit of a counting semaphore (RedissonPermitExpirableSemaphore).
-- KEYS[1] permits ZSET    {prefix}:l:{name}:sem   member = permit id, score = expiry
--                                                  (server TIME, ms)
-- KEYS[2] fence counter   {prefix}:l:{name}:sem:fence
-- ARGV[1] permit id (random per acquisition)
-- ARGV[2] lease in milliseconds
-- ARGV[3] limit (permits in total)
-- Expired permits (a crashed holder's) are removed first, so no permit leaks.
-- Returns {1, fence}   acquired (also when ARGV[1] already holds a permit: a retry; its
--                      lease is replaced)
--         {0, wait}    all permits taken; wait = ms until the first lease ends
-- @include _shared
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[2])
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if mine or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]) + 1)
  local fence
  if mine then
    fence = tonumber(redis.call('GET', KEYS[2]) or '0')
  else
    fence = next_fence(KEYS[2])
  end
  return {1, fence}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(1, tonumber(first[2]) - now)}
