-- cache_store: write a computed entry unless an invalidation raced the computation,
-- then give up the lease and wake the waiters.
--
-- KEYS[1]     value key
-- KEYS[2]     lease key
-- KEYS[3]     signal list
-- KEYS[4..n]  stamp keys, in the order of ARGV[5..]
-- ARGV[1]     token (the lease is deleted only if it is still ours)
-- ARGV[2]     envelope bytes, or "" to only release (the computation failed)
-- ARGV[3]     entry ttl in ms (Redis TTL: fresh + stale windows)
-- ARGV[4]     signal ttl in ms
-- ARGV[5..]   the stamp values read by cache_claim before computing
--
-- Returns 1 stored, 0 rejected (a stamp changed or vanished: the result may be stale,
-- django-cacheops PR #302), -1 nothing to store (release only).
local result = -1
if ARGV[2] ~= '' then
  result = 1
  for i = 4, #KEYS do
    -- pcall: a stamp key of another type is a changed stamp, not a script error
    if redis.pcall('GET', KEYS[i]) ~= ARGV[i + 1] then
      result = 0
      break
    end
  end
  if result == 1 then
    local px = tonumber(ARGV[3])
    redis.call('SET', KEYS[1], ARGV[2], 'PX', px)
    for i = 4, #KEYS do
      local t = redis.call('PTTL', KEYS[i])
      if t >= 0 and t < px then redis.call('PEXPIRE', KEYS[i], px) end
    end
  end
end
if redis.pcall('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
-- one element that every waiter's BLMOVE rotates: all of them wake, in FIFO order
redis.call('DEL', KEYS[3])
redis.call('RPUSH', KEYS[3], '1')
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return result
