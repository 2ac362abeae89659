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
-- Returns {claimed, lease_pttl, now_us, repaired, stamp_1, ..., stamp_k}
--   claimed = 1: the lease is ours (also when a retried call finds our own token)
--   claimed = 0: someone else computes; lease_pttl is how long their lease still runs
--   now_us:  Redis TIME in microseconds (envelopes are dated by the server's clock)
--   repaired: how many of our keys held a value of the wrong type and were replaced
--     (a list squatting the lease slot disabled caching of its key for good, item 11)
local t = redis.call('TIME')
local repaired = 0
-- a key of ours holding another type is replaced, never a reason to stop caching
local function string_at(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' and v.err then
    redis.call('DEL', key)
    repaired = repaired + 1
    return false
  end
  return v
end
local stamps = {}
for i = 3, #KEYS do
  local s = string_at(KEYS[i])
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
else
  local holder = string_at(KEYS[1])
  if not holder then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    claimed = 1
    -- a signal left by the previous computation would wake our waiters at once
    redis.call('DEL', KEYS[2])
  elseif holder == ARGV[1] then
    claimed = 1
  else
    pttl = redis.call('PTTL', KEYS[1])
    if pttl < 0 then
      -- a lease without a TTL (written by hand or by a foreign client) would make
      -- every caller wait forever: give it one lease period
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
      pttl = tonumber(ARGV[2])
    end
    -- waiters BLMOVE on the signal list: it must be a list (or absent)
    local kind = redis.call('TYPE', KEYS[2])['ok']
    if kind ~= 'none' and kind ~= 'list' then
      redis.call('DEL', KEYS[2])
      repaired = repaired + 1
    end
  end
end
local out = {claimed, pttl, tonumber(t[1]) * 1000000 + tonumber(t[2]), repaired}
for _, s in ipairs(stamps) do out[#out + 1] = s end
return out
