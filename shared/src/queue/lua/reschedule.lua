-- RESCHEDULE: ARGV = id, due_ms. Answers 'rescheduled', 'in_flight', 'dead' or
-- 'not_found'.
local id = ARGV[1]
local raw = redis.call('HGET', K_META, id)
local m = raw and parse_meta(raw)
if not m then return 'not_found' end
if redis.call('ZSCORE', K_RUN, id) then return 'in_flight' end
if redis.call('ZSCORE', K_DEAD, id) then return 'dead' end
if not unpend(id, m) then return 'not_found' end
m.due = tonumber(ARGV[2])
redis.call('HSET', K_META, id, fmt_meta(m))
make_pending(id, m, m.due)
return 'rescheduled'
