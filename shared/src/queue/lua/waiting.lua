-- WAITING: answers {handler, count, ...} for the items waiting for a handler in
-- this queue, one pair per handler (a walk over the park's handler prefixes: one
-- range read per handler, not per item).
local out = {}
local from = '-'
while true do
  local m = redis.call('ZRANGEBYLEX', K_PARK, from, '+', 'LIMIT', 0, 1)
  if #m == 0 then break end
  local h = string.sub(m[1], 1, string.find(m[1], '\1', 1, true) - 1)
  out[#out + 1] = h
  out[#out + 1] = redis.call('ZLEXCOUNT', K_PARK, '[' .. h .. '\1', '[' .. h .. '\1\255')
  from = '(' .. h .. '\1\255'
end
return out
