-- Replace the lease of a lock we hold (never adds: a retried extend cannot double it).
-- KEYS[1] lock key        {prefix}:l:{name}
-- ARGV[1] token
-- ARGV[2] new lease in milliseconds, counted from now
-- Returns  1  extended
--          0  the key holds another token
--         -1  the key is gone (expired); it is NOT recreated (redsync's
--             touchWithSetNXScript resurrects expired locks)
-- @include _shared
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return not_held(cur)
