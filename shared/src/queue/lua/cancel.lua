-- CANCEL: ARGV = id. Answers 'cancelled', 'in_flight' (marked: never retried or
-- redelivered), 'moving' (a resize is moving it: ask again) or 'not_found'.
local id = ARGV[1]
if redis.call('HEXISTS', K_ITEMS, id) == 0 then return 'not_found' end
if redis.call('ZSCORE', K_MOVING, id) then return 'moving' end
if unpend(id) or redis.call('ZREM', K_DEAD, id) == 1 or unpark(id) then
  forget(id)
  return 'cancelled'
end
redis.call('SADD', K_CX, id)
return 'in_flight'
