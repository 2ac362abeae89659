-- Acquire an exclusive lease and issue its fencing token in one round trip.
-- KEYS[1] lock key        {prefix}:l:{name}
-- KEYS[2] fence counter   {prefix}:l:{name}:fence  (never expires: fences must only grow)
-- KEYS[3] waiters marker  {prefix}:l:{name}:w      set while someone waits
-- KEYS[4] hand-off grace  {prefix}:l:{name}:h      set by a release that woke a waiter
-- ARGV[1] token (random per acquisition)
-- ARGV[2] lease in milliseconds
-- ARGV[3] '0' first try of a waiting acquire, '1' retry after a wake-up, '2' single
--         try (timeout=0: never waits, so it ignores the grace and is not a waiter)
-- ARGV[4] waiters marker lifetime in ms (the caller's longest wait)
-- Hand-off grace: for a few ms after a release that woke a waiter, a first try does
-- not take the free lock, so the woken waiter is not overtaken by the process that
-- just released it (python-redis-lock #58: barging starves waiters).
-- Returns {1, fence}  acquired; also when the key already holds ARGV[1] (a retried
--                     acquire whose first reply was lost): the TTL is replaced, and the
--                     fence is the current counter (nobody else can have incremented it
--                     while we held the key)
--         {0, pttl}   busy; pttl is the holder's remaining lease in ms, so a waiter that
--                     misses a wake-up re-checks no later than the lease's end (Redisson)
--         {2, ms}     free, but reserved for a woken waiter for ms more: retry then
-- The waiters marker must outlive every waiter's block: extend it, never shorten it.
-- @include _shared
local function mark_waiting()
  if ARGV[3] ~= '2' and redis.call('PTTL', KEYS[3]) < tonumber(ARGV[4]) then
    redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  end
end
-- The uncontended try is three calls (grace, SET NX, fence): each call inside a script
-- costs about what a GET costs the server.
if ARGV[3] == '0' then
  local grace = redis.call('PTTL', KEYS[4])
  if grace > 0 and redis.call('EXISTS', KEYS[1]) == 0 then
    mark_waiting()
    return {2, grace}
  end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '0' then
    redis.call('DEL', KEYS[4])
  end
  return {1, next_fence(KEYS[2])}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
mark_waiting()
return {0, redis.call('PTTL', KEYS[1])}
