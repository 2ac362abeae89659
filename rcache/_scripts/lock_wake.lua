-- Pass a wake-up signal on (a waiter was cancelled, maybe after popping one).
-- KEYS[1] signal list     e.g. {prefix}:l:{name}:signal
-- KEYS[2] (optional) lock key: when it exists the holder's release will signal, so
--         nothing is pushed
-- ARGV[1] signal lifetime ms, ARGV[2] maximum signals kept in the list
-- Returns 1 if a signal was pushed, 0 otherwise. A spurious signal costs one retry.
-- @include _shared
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
push_wakeup(KEYS[1], ARGV[2], ARGV[1])
return 1
