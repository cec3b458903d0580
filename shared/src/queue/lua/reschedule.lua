-- RESCHEDULE: ARGV = id, due_ms. Answers 'rescheduled', 'in_flight', 'dead',
-- 'moving' (ask again) or 'not_found'. Rewrites the due time in the body's header.
-- A waiting item (parked) becomes pending at the new time. Announces a new earliest
-- due time (see `announce`).
local id, due = ARGV[1], ARGV[2]
local body = redis.call('HGET', K_ITEMS, id)
if not body then return 'not_found' end
if redis.call('ZSCORE', K_DEAD, id) then return 'dead' end
if redis.call('ZSCORE', K_MOVING, id) then return 'moving' end
local before = head_due()
if not unpend(id) and not unpark(id) then return 'in_flight' end
local mx, rest = string.match(body, '^(%d+)|%d+|(.*)$')
redis.call('HSET', K_ITEMS, id, mx .. '|' .. due .. '|' .. rest)
make_pending(id, tonumber(due))
announce(before, tonumber(due))
return 'rescheduled'
