-- GET: ARGV = id, glob-escaped id. Answers {body, attempts, pending score, in-flight
-- member, in-flight deadline, dead since, last error, cancelled-in-flight flag,
-- waiting (parked) due score} as one consistent snapshot. Finding the in-flight
-- member scans the in-flight set (an operator's call, not the hot path).
local id = ARGV[1]
local member, deadline = false, false
local pm = redis.call('HGET', K_PARKI, id)
local parked = false
if pm then
  local _, s = parked_of(pm)
  parked = s
end
if not redis.call('ZSCORE', K_DUE, id) and not redis.call('ZSCORE', K_DEAD, id)
   and not redis.call('ZSCORE', K_MOVING, id) and not pm
   and redis.call('HEXISTS', K_ITEMS, id) == 1 then
  local cursor = '0'
  repeat
    local r = redis.call('ZSCAN', K_RUN, cursor, 'MATCH', ARGV[2] .. '\1*', 'COUNT', 1000)
    cursor = r[1]
    if #r[2] > 0 then
      member, deadline = r[2][1], r[2][2]
      break
    end
  until cursor == '0'
end
return {
  redis.call('HGET', K_ITEMS, id),
  redis.call('HGET', K_ATT, id),
  redis.call('ZSCORE', K_DUE, id) or redis.call('ZSCORE', K_MOVING, id),
  member,
  deadline,
  redis.call('ZSCORE', K_DEAD, id),
  redis.call('HGET', K_ERR, id),
  redis.call('SISMEMBER', K_CX, id),
  parked and num(parked) or false,
}
