-- REQUEUE: ARGV = limit, then ids (none: the oldest `limit` dead letters). Moves dead
-- letters back to pending, due now, attempts reset. Answers how many moved, and
-- announces them (see `announce`).
local now = now_ms()
local before = head_due()
local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', K_DEAD, 0, tonumber(ARGV[1]) - 1)
end
local moved = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    if redis.call('HEXISTS', K_ITEMS, id) == 1 then
      redis.call('HDEL', K_ATT, id)
      make_pending(id, now)
      redis.call('INCR', K_BACK)
      moved = moved + 1
    else
      forget(id)
    end
  end
end
if moved > 0 then announce(before, now) end
return moved
