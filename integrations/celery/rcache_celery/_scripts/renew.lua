-- renew: the watchdog of a running task extends its lease, owner-checked.
-- KEYS[1] guard key (value = owner task id), KEYS[2] run marker of this task id
-- ARGV[1] task id, ARGV[2] lease in ms
-- Returns 1 if renewed; 0 if ARGV[1] no longer owns the guard key (lease lost: nothing
-- is extended, nothing deleted).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('GET', KEYS[2]) == 'running' then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
