-- Release a read or a write lease of an RW lock and wake the right waiters.
-- KEYS[1] readers ZSET    {prefix}:l:{name}:rw:r
-- KEYS[2] writer key      {prefix}:l:{name}:rw:w
-- KEYS[3] writer intents  {prefix}:l:{name}:rw:wq
-- KEYS[4] reader signal   {prefix}:l:{name}:rw:rs
-- KEYS[5] writer signal   {prefix}:l:{name}:rw:ws
-- ARGV[1] token, ARGV[2] 'r' (read lease) or 'w' (write lease) or 'a' (a waiting
-- writer gives up: only its intent is removed), ARGV[3] signal lifetime ms
-- Wake-ups: when nobody holds the lock any more a waiting writer is woken first
-- (writer preference); with no writer waiting, the end of a write lease (or a writer
-- giving up) wakes one reader, who passes it on.
-- Returns  1  released
--         -1  the lease is gone (expired)
--          0  the write key holds another token (left untouched)
-- @include _shared
local now = server_ms()
local result = 1
if ARGV[2] == 'w' then
  local cur = redis.call('GET', KEYS[2])
  if cur ~= ARGV[1] then
    return not_held(cur)
  end
  redis.call('DEL', KEYS[2])
elseif ARGV[2] == 'r' then
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  if score == false or tonumber(score) <= now then result = -1 end
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('EXISTS', KEYS[2]) == 0 then
  local sig = false
  if redis.call('ZCARD', KEYS[3]) > 0 then
    if redis.call('ZCARD', KEYS[1]) == 0 then sig = KEYS[5] end
  elseif ARGV[2] ~= 'r' then
    sig = KEYS[4]
  end
  if sig then
    push_wakeup(sig, 1, ARGV[3])
  end
end
return result
