-- finish: compare-and-act end of a run, or hand-over to the next delivery of the same id.
-- KEYS[1] guard key (value = owner task id), KEYS[2] run marker of this task id
-- ARGV[1] task id
-- ARGV[2] "done": delete the guard key if ARGV[1] owns it; marker := "done" for ARGV[3] ms
--         (late redeliveries of this id are then recognised and ignored)
--         "queued": the same id will be delivered again (retry, requeue): keep the guard
--         key if owned, its TTL := ARGV[3] ms; marker := "queued" for ARGV[3] ms
-- ARGV[3] TTL in ms for the marker (and the guard key for "queued")
-- Returns 1 if ARGV[1] owned the guard key, 0 if not (expired or held by another id:
-- never deleted nor extended).
local owned = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  owned = 1
  if ARGV[2] == 'done' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return owned
