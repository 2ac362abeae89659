-- Compare-and-delete by token, then wake one waiter.
-- KEYS[1] lock key        {prefix}:l:{name}
-- KEYS[2] signal list     {prefix}:l:{name}:signal  (waiters BLPOP it)
-- ARGV[1] token
-- ARGV[2] signal list lifetime in ms (a signal nobody pops must not linger)
-- ARGV[3] maximum signals kept in the list (1 for a mutex: one release, one grant)
-- Returns  1  released (and one signal pushed)
--          0  the key holds another token: someone else's lock, left untouched
--         -1  the key is gone: the lease expired
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('LPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
if cur == false then
  return -1
end
return 0
