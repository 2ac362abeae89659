-- Take a read lease of a writer-preferring RW lock (per-reader leases, Redisson-style).
-- KEYS[1] readers ZSET    {prefix}:l:{name}:rw:r    member = reader token, score = expiry
--                                                    (server TIME, ms)
-- KEYS[2] writer key      {prefix}:l:{name}:rw:w    value = writer token, PX lease
-- KEYS[3] writer intents  {prefix}:l:{name}:rw:wq   ZSET of waiting writers (expiring)
-- KEYS[4] reader signal   {prefix}:l:{name}:rw:rs   list that waiting readers BLPOP
-- ARGV[1] reader token, ARGV[2] lease ms, ARGV[3] 1 if this reader waited,
-- ARGV[4] signal lifetime ms
-- A waiting writer blocks new readers (writer preference: no writer starvation).
-- A reader that got in after waiting passes a signal on so the next waiting reader
-- wakes too (one release of a writer lets every waiting reader in, one by one).
-- Returns {1, 0}     acquired (also for a retry that finds its own token)
--         {0, wait}  blocked; wait = ms until the blocking lease/intent ends
-- @include _shared
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local w = redis.call('PTTL', KEYS[2])
  if w > 0 then
    return {0, w}
  end
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if first[1] then
    return {0, math.max(1, tonumber(first[2]) - now)}
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]) + 1)
if ARGV[3] == '1' then
  push_wakeup(KEYS[4], 1, ARGV[4])
end
return {1, 0}
