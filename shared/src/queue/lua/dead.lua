-- DEAD: ARGV = limit. Answers 5 fields per dead letter, oldest first: id, buried at,
-- body, attempts, last error.
local d = redis.call('ZRANGE', K_DEAD, 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
if #d == 0 then return {} end
local ids = {}
for i = 1, #d, 2 do ids[#ids + 1] = d[i] end
local bodies = redis.call('HMGET', K_ITEMS, unpack(ids))
local atts = redis.call('HMGET', K_ATT, unpack(ids))
local errs = redis.call('HMGET', K_ERR, unpack(ids))
local out = {}
for i = 1, #ids do
  out[#out + 1] = ids[i]
  out[#out + 1] = d[2 * i]
  out[#out + 1] = bodies[i]
  out[#out + 1] = atts[i]
  out[#out + 1] = errs[i]
end
return out
