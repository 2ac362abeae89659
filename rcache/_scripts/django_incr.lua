-- django_incr: Django's incr()/decr() on the raw integer the Django backend stores for
-- ints, atomically, only when the key exists (Django raises ValueError on a missing key;
-- a bare INCRBY would create it from 0).
--
-- KEYS[1]  the value key
-- ARGV[1]  delta (an integer)
--
-- Returns {1, new value}; {0} when the key is missing; {2, error text} when the stored
-- value is not a raw integer (a string, None, a float...: Django raises TypeError).
-- INCRBY keeps the key's TTL.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local r = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(r) == 'table' and r.err then
  return {2, r.err}
end
return {1, r}
