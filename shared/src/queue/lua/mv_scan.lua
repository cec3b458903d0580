-- MV_SCAN: ARGV = set ('due', 'run', 'dead' or 'park'), cursor member ('' = start),
-- limit.
-- A page of the set after the cursor, for a resize's mover: 3 fields per entry
-- (member, routing key, score), then {back counter, moving count, clean epoch} at the
-- end.
local set = ({ due = K_DUE, run = K_RUN, dead = K_DEAD, park = K_PARK })[ARGV[1]]
local start = 0
if ARGV[2] ~= '' then
  local r = redis.call('ZRANK', set, ARGV[2])
  if r then start = r + 1 end
end
local limit = tonumber(ARGV[3])
local page = redis.call('ZRANGE', set, start, start + limit - 1, 'WITHSCORES')
local out = {}
if #page > 0 then
  local ids = {}
  for i = 1, #page, 2 do
    local m = page[i]
    if set == K_RUN then m = id_of(m) elseif set == K_PARK then m = (parked_of(m)) end
    ids[#ids + 1] = m
  end
  local bodies = redis.call('HMGET', K_ITEMS, unpack(ids))
  for k = 1, #ids do
    out[#out + 1] = page[2 * k - 1]
    out[#out + 1] = bodies[k] and key_of(bodies[k]) or ''
    out[#out + 1] = page[2 * k]
  end
end
out[#out + 1] = tonumber(redis.call('GET', K_BACK) or '0')
out[#out + 1] = redis.call('ZCARD', K_MOVING)
out[#out + 1] = tonumber(redis.call('GET', K_CLEAN) or '0')
return out
