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
  -- ids, and the member and score each entry answers: a batch answers an entry per
  -- item still in it, each under the batch's member (the cursor then passes it whole).
  local ids, ms, ss = {}, {}, {}
  for i = 1, #page, 2 do
    local m = page[i]
    if set == K_RUN and string.byte(m, 1) == 2 then
      local seq = string.sub(m, 2)
      local state = batch_state(seq)
      if state then
        for p, id in ipairs(batch_ids(seq)) do
          if batch_has(state, p, false) then
            ids[#ids + 1], ms[#ms + 1], ss[#ss + 1] = id, m, page[i + 1]
          end
        end
      end
    else
      if set == K_RUN then m = id_of(m) elseif set == K_PARK then m = (parked_of(m)) end
      ids[#ids + 1], ms[#ms + 1], ss[#ss + 1] = m, page[i], page[i + 1]
    end
  end
  if #ids > 0 then
    local bodies = redis.call('HMGET', K_ITEMS, unpack(ids))
    for k = 1, #ids do
      out[#out + 1] = ms[k]
      out[#out + 1] = bodies[k] and key_of(bodies[k]) or ''
      out[#out + 1] = ss[k]
    end
  end
end
out[#out + 1] = tonumber(redis.call('GET', K_BACK) or '0')
out[#out + 1] = redis.call('ZCARD', K_MOVING)
out[#out + 1] = tonumber(redis.call('GET', K_CLEAN) or '0')
return out
