-- REQUEUE: ARGV = limit, then ids (none: the oldest `limit` dead letters). Moves dead
-- letters back to pending, due now, attempts reset. Answers how many moved.
local now = now_ms()
local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', K_DEAD, 0, tonumber(ARGV[1]) - 1)
end
local moved = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    local raw = redis.call('HGET', K_META, id)
    local m = raw and parse_meta(raw)
    if m then
      m.att = 0
      redis.call('HSET', K_META, id, fmt_meta(m))
      make_pending(id, m, now)
      moved = moved + 1
    else
      forget(id)
    end
  end
end
return moved
