-- Take the write lease of a writer-preferring RW lock, with a fencing token.
-- KEYS[1] readers ZSET    {prefix}:l:{name}:rw:r
-- KEYS[2] writer key      {prefix}:l:{name}:rw:w
-- KEYS[3] writer intents  {prefix}:l:{name}:rw:wq
-- KEYS[4] fence counter   {prefix}:l:{name}:rw:fence
-- ARGV[1] writer token, ARGV[2] lease ms, ARGV[3] intent lifetime ms (a waiting writer
-- refreshes its intent on every retry; a crashed one stops blocking readers after it)
-- Returns {1, fence}  acquired (a retry finding its own token: lease replaced)
--         {0, wait}   blocked by a writer or by live readers; the intent is recorded
-- @include _shared
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local cur = redis.call('GET', KEYS[2])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[4]) or '0')}
end
local wait = 0
if cur then
  wait = redis.call('PTTL', KEYS[2])
else
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[1] then
    wait = math.max(1, tonumber(first[2]) - now)
  end
end
if wait ~= 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  return {0, wait}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return {1, next_fence(KEYS[4])}
