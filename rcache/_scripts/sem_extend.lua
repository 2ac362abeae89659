-- Replace the lease of a permit we hold (never recreates an expired permit).
-- KEYS[1] permits ZSET    {prefix}:l:{name}:sem  (also used for RW-lock readers)
-- ARGV[1] permit id
-- ARGV[2] new lease in milliseconds, counted from the server's TIME
-- Returns  1  extended
--         -1  no such live permit
-- @include _shared
local now = server_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score == false or tonumber(score) <= now then
  return -1
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]) + 1)
return 1
