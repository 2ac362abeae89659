-- begin: a task copy asks to run under its guard key.
-- KEYS[1] guard key: value = the owner task id (dedup key or lock key)
-- KEYS[2] run marker of this task id: "running" | "queued" | "done"
-- ARGV[1] task id, ARGV[2] lease in ms (applied to both keys while running),
-- ARGV[3] "1" to take the guard key when it is free, "0" to never take it
-- Returns {code, holder}:
--   0  acquired a free guard key (now owner, marker "running")
--   1  already the owner (queued by dedup, retried or requeued), marker "running"
--   2  the same task id is running elsewhere (visibility-timeout redelivery): holder = id
--   3  the same task id already finished (late redelivery): holder = id
--  -1  another task id holds the guard key: holder = that id
--  -2  the guard key is free and ARGV[3] is "0"
local state = redis.call('GET', KEYS[2])
if state == 'running' then return {2, ARGV[1]} end
if state == 'done' then return {3, ARGV[1]} end
local cur = redis.call('GET', KEYS[1])
local code
if not cur then
  if ARGV[3] ~= '1' then return {-2, ''} end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  code = 0
elseif cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  code = 1
else
  return {-1, cur}
end
redis.call('SET', KEYS[2], 'running', 'PX', ARGV[2])
return {code, ARGV[1]}
