-- CANCEL: ARGV = id. Answers 'cancelled', 'in_flight' (marked: never retried or
-- redelivered) or 'not_found'.
local id = ARGV[1]
if redis.call('HEXISTS', K_ITEMS, id) == 0 then return 'not_found' end
if unpend(id) or redis.call('ZREM', K_DEAD, id) == 1 then
  forget(id)
  return 'cancelled'
end
redis.call('SADD', K_CX, id)
return 'in_flight'
