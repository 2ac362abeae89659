-- Release a fair lock (compare-and-delete by token) and wake the first waiter only;
-- also used by a waiter that gives up (ARGV[3] = 'a'): it leaves the queue, and if the
-- lock is free the new first waiter is woken.
-- KEYS[1] lock key        {prefix}:l:{name}
-- KEYS[2] queue ZSET      {prefix}:l:{name}:fq
-- KEYS[3] waiter expiry   {prefix}:l:{name}:fqt
-- KEYS[4] signal prefix   {prefix}:l:{name}:fs:   the first waiter BLPOPs KEYS[4]..token
--                         (same hash tag, so the same cluster slot as KEYS[1])
-- ARGV[1] token, ARGV[2] signal lifetime ms, ARGV[3] 'r' release or 'a' abandon
-- Returns  1  released (or left the queue)
--          0  the key holds another token: left untouched
--         -1  the key is gone: the lease expired
-- @include _shared
local result = 1
if ARGV[3] == 'a' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
else
  local cur = redis.call('GET', KEYS[1])
  if cur ~= ARGV[1] then
    return not_held(cur)
  end
  redis.call('DEL', KEYS[1])
end
local head = redis.call('ZRANGE', KEYS[2], 0, 0)
if head[1] then
  push_wakeup(KEYS[4] .. head[1], 1, ARGV[2])
end
return result
