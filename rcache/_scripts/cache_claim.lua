-- cache_claim: take the per-key computation lease and read (creating if missing) the
-- version stamps the computation will run under. Called only on a miss.
--
-- KEYS[1]     lease key       {prefix}:c:...:lease
-- KEYS[2]     signal list     {prefix}:c:...:ready  (waiters BLMOVE on it)
-- KEYS[3..n]  stamp keys      {prefix}:s:...        (per function, per tag)
-- ARGV[1]     token of this caller (random)
-- ARGV[2]     lease ttl in ms, or 0 to only read/create the stamps
-- ARGV[3]     stamp ttl in ms (stamps must outlive the entries that depend on them)
-- ARGV[4..]   one fresh random stamp per stamp key, used if the key is missing
--
-- Returns {claimed, lease_pttl, stamp_1, ..., stamp_k}
--   claimed = 1: the lease is ours (also when a retried call finds our own token)
--   claimed = 0: someone else computes; lease_pttl is how long their lease still runs
local stamps = {}
for i = 3, #KEYS do
  local s = redis.call('GET', KEYS[i])
  if not s then
    s = ARGV[i + 1]
    redis.call('SET', KEYS[i], s, 'PX', ARGV[3])
  end
  stamps[#stamps + 1] = s
end
local claimed = 0
local pttl = 0
if ARGV[2] == '0' then
  pttl = 0
elseif redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  claimed = 1
  -- a signal left by the previous computation would wake our waiters at once
  redis.call('DEL', KEYS[2])
elseif redis.call('GET', KEYS[1]) == ARGV[1] then
  claimed = 1
else
  pttl = redis.call('PTTL', KEYS[1])
end
local out = {claimed, pttl}
for _, s in ipairs(stamps) do out[#out + 1] = s end
return out
