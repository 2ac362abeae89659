-- cache_renew: extend a computation lease if it is still ours (replace, never add).
--
-- KEYS[1]  lease key
-- ARGV[1]  token
-- ARGV[2]  lease ttl in ms
--
-- Returns 1 renewed, 0 not ours any more (expired, taken over, or another type).
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
