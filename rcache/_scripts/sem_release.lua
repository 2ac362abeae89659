-- Return a leased permit and wake one waiter.
-- KEYS[1] permits ZSET    {prefix}:l:{name}:sem
-- KEYS[2] signal list     {prefix}:l:{name}:sem:signal
-- ARGV[1] permit id
-- ARGV[2] signal list lifetime in ms
-- ARGV[3] maximum signals kept in the list
-- Returns  1  released
--         -1  no such permit: its lease expired (or it was never granted)
-- @include _shared
local now = server_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score == false or tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return -1
end
redis.call('ZREM', KEYS[1], ARGV[1])
push_wakeup(KEYS[2], ARGV[3], ARGV[2])
return 1
