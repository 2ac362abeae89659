-- cache_store_many: write a batch of computed entries unless the function's version
-- stamp changed while they were computed (an invalidate_all raced the computation).
--
-- KEYS[1]     the function's stamp key
-- KEYS[2..n]  value keys
-- ARGV[1]     the stamp value read before computing
-- ARGV[2]     entry ttl in ms
-- ARGV[3..]   envelope bytes, one per value key
--
-- Returns the number of entries stored (0 when rejected).
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then  -- pcall: another type = changed
  return 0
end
local px = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', px)
end
local t = redis.call('PTTL', KEYS[1])
if t >= 0 and t < px then redis.call('PEXPIRE', KEYS[1], px) end
return #KEYS - 1
