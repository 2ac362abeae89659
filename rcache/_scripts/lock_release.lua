-- Compare-and-delete by token, then wake one waiter (if anyone waits).
-- KEYS[1] lock key        {prefix}:l:{name}
-- KEYS[2] signal list     {prefix}:l:{name}:signal  (waiters BLPOP it)
-- KEYS[3] waiters marker  {prefix}:l:{name}:w       (see lock_acquire.lua)
-- KEYS[4] hand-off grace  {prefix}:l:{name}:h
-- ARGV[1] token
-- ARGV[2] signal list lifetime in ms (a signal nobody pops must not linger)
-- ARGV[3] maximum signals kept in the list (1 for a mutex: one release, one grant)
-- ARGV[4] hand-off grace in ms (0: none)
-- Returns  1  released (and one signal pushed when the waiters marker exists)
--          0  the key holds another token: someone else's lock, left untouched
--         -1  the key is gone: the lease expired
-- @include _shared
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('DEL', KEYS[1])
  -- Every waiter sets the marker in the same script as its failed try, before it
  -- blocks, and it outlives the wait: without a marker nobody can be waiting, and the
  -- uncontended release skips the signal.
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return 1
  end
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[4], '1', 'PX', ARGV[4])
  end
  push_wakeup(KEYS[2], ARGV[3], ARGV[2])
  return 1
end
return not_held(cur)
