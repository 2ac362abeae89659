-- release: compare-and-delete of a plain guard key (a failed publish, warming).
-- KEYS[1] guard key, ARGV[1] expected value (task id or token)
-- Returns 1 if deleted, 0 if the key held another value or was gone.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
