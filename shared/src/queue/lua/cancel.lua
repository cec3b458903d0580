-- CANCEL: ARGV = id. Answers 'cancelled', 'in_flight' (marked: never retried or
-- redelivered) or 'not_found'.
local id = ARGV[1]
local raw = redis.call('HGET', K_META, id)
if not raw then return 'not_found' end
if redis.call('ZSCORE', K_RUN, id) then
  redis.call('SADD', K_CX, id)
  return 'in_flight'
end
local m = parse_meta(raw)
local found
if m then found = unpend(id, m) else found = redis.call('ZREM', K_DUE, id) == 1 end
if not found then found = redis.call('ZREM', K_DEAD, id) == 1 end
forget(id)
if found then return 'cancelled' end
return 'not_found'
