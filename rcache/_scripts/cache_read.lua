-- cache_read: the value, its version stamps, and the server's clock in one round trip,
-- so that freshness never depends on the reader's wall clock (a reader whose clock
-- stepped back 1 h served an expired entry as fresh, issue 14 item 6). Used for a
-- process's first read and then every few seconds; in between the client extrapolates
-- Redis's clock with its monotonic clock and reads with a plain MGET.
--
-- KEYS[1]     value key
-- KEYS[2..n]  stamp keys (per function, per tag)
--
-- Returns {now_us, value, stamp_1, ..., stamp_k}: now_us is Redis TIME in microseconds;
-- a missing key (or one of another type) is nil, as with MGET.
local t = redis.call('TIME')
local rows = redis.call('MGET', unpack(KEYS))
local out = {tonumber(t[1]) * 1000000 + tonumber(t[2])}
for i = 1, #KEYS do out[i + 1] = rows[i] end
return out
