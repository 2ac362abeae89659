#!lua flags=allow-cross-slot-keys
-- cluster_delete: delete keys of several hash slots that this Redis Cluster node serves,
-- in one command (an invalidation's stamp copies, one per slot group: the copies on one
-- node disappear together, and B copies cost one command per node, not B).
--
-- KEYS        none: a cluster refuses declared keys that span slots
-- ARGV[1..n]  the keys, each in a slot this node serves (else the script fails with
--             "non local key", and the caller deletes them one by one)
--
-- Returns one integer per key: 1 if it existed, else 0.
local out = {}
for i = 1, #ARGV do
  out[i] = redis.call('DEL', ARGV[i])
end
return out
