-- Acquire an exclusive lease and issue its fencing token in one round trip.
-- KEYS[1] lock key        {prefix}:l:{name}
-- KEYS[2] fence counter   {prefix}:l:{name}:fence  (never expires: fences must only grow)
-- ARGV[1] token (random per acquisition)
-- ARGV[2] lease in milliseconds
-- Returns {1, fence}  acquired; also when the key already holds ARGV[1] (a retried
--                     acquire whose first reply was lost): the TTL is replaced, and the
--                     fence is the current counter (nobody else can have incremented it
--                     while we held the key)
--         {0, pttl}   busy; pttl is the holder's remaining lease in ms, so a waiter that
--                     misses a wake-up re-checks no later than the lease's end (Redisson)
local cur = redis.call('GET', KEYS[1])
if cur == false then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, fence}
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
return {0, redis.call('PTTL', KEYS[1])}
