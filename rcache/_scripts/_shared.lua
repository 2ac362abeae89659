-- Shared preamble, pasted into a script at its include line (LuaScript expands
-- it when it loads the script; not a script of its own: no KEYS, no ARGV, no reply).
-- server_ms()      Redis's clock in milliseconds (TIME: one clock for every client, so
--                  leases and expiries never follow a skewed host)
-- server_us()      the same in microseconds, as a string of digits (exact: no float)
-- next_fence(key)  INCR of a fence counter that never goes backwards. The counter can be
--                  lost (a restart without persistence, eviction, FLUSHALL): a missing
--                  counter is seeded from the server clock in microseconds, above every
--                  fence issued before unless the server clock went back (issue 14:
--                  fences restarted at 1 after a SHUTDOWN NOSAVE restart).
-- push_wakeup(list, keep, ms)
--                  wake one waiter blocked on `list` (LPUSH: its BLPOP pops it), keep
--                  at most `keep` wake-ups in it (one release, one grant) and let an
--                  unconsumed one expire after `ms` (a stale one costs a spurious retry)
-- not_held(cur)    the reply when a lock key does not hold our token (`cur`: its GET):
--                  -1 the key is gone (the lease expired), 0 it holds another token
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function server_us()
  local t = redis.call('TIME')
  return t[1] .. string.sub('00000' .. t[2], -6)
end
local function next_fence(key)
  local fence = redis.call('INCR', key)
  if fence == 1 then  -- the counter was missing: seed it (one call less than EXISTS)
    redis.call('SET', key, server_us())
    fence = redis.call('INCR', key)
  end
  return fence
end
local function not_held(cur)
  if cur == false then
    return -1
  end
  return 0
end
local function push_wakeup(list, keep, ms)
  redis.call('LPUSH', list, '1')
  redis.call('LTRIM', list, 0, tonumber(keep) - 1)
  redis.call('PEXPIRE', list, ms)
end
