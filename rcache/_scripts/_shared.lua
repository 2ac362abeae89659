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
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function server_us()
  local t = redis.call('TIME')
  return t[1] .. string.sub('00000' .. t[2], -6)
end
local function next_fence(key)
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, server_us())
  end
  return redis.call('INCR', key)
end
