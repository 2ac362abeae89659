-- admin_force_release: an operator takes a lock away from its holders
-- (lock.force_release(), `rcache locks release NAME --force`).
-- KEYS[1]        holder key: a lock or RW-writer key (string: token, PX lease) or a
--                ZSET of leases (RW readers, semaphore permits: token -> expiry ms)
-- KEYS[2]        fence counter of that kind ({prefix}:l:{name}:fence, :rw:fence, ...)
-- KEYS[3..2+n]   n signal lists that waiters BLPOP: each gets one wake-up
-- KEYS[3+n]      (exclusive locks only) fair queue ZSET {prefix}:l:{name}:fq
-- KEYS[4+n]      (exclusive locks only) fair signal prefix {prefix}:l:{name}:fs:
-- ARGV[1]        'string' or 'zset' (the type of KEYS[1])
-- ARGV[2]        signal lifetime in ms
-- ARGV[3]        '1' to bump the fence counter, '0' to leave it (read leases are not
--                fenced)
-- ARGV[4]        n, the number of signal lists
-- ARGV[5]        '1' when KEYS[3+n], KEYS[4+n] (fair queue) are given
-- The fence is bumped only if the counter exists: a missing counter (never used, or
-- lost with the dataset) is left for the acquire script to create, so force-releasing
-- never makes a fence smaller than one the acquire script would issue.
-- Every key is in the name's hash tag: one cluster slot.
-- Returns {tokens, fence}: the tokens of the live holders removed (possibly none) and
-- the fence counter afterwards (0 when there is none).
-- @include _shared
local now = server_ms()
local tokens = {}
if ARGV[1] == 'zset' then
  tokens = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
else
  local cur = redis.call('GET', KEYS[1])
  if cur then tokens = {cur} end
end
redis.call('DEL', KEYS[1])
local fence = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[3] == '1' then
    fence = redis.call('INCR', KEYS[2])
  else
    fence = tonumber(redis.call('GET', KEYS[2]))
  end
end
-- one wake-up per freed lease (a semaphore may free several permits at once)
local wakes = math.max(1, #tokens)
local n = tonumber(ARGV[4])
for i = 3, 2 + n do
  for _ = 1, wakes do redis.call('LPUSH', KEYS[i], '1') end
  redis.call('LTRIM', KEYS[i], 0, wakes - 1)
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
if ARGV[5] == '1' then
  local head = redis.call('ZRANGE', KEYS[3 + n], 0, 0)
  if head[1] then
    push_wakeup(KEYS[4 + n] .. head[1], 1, ARGV[2])
  end
end
return {tokens, fence}
