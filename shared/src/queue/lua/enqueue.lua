-- ENQUEUE: ARGV = layout epoch, n, then per item: id, due, merge_class, body.
-- Answers per item 1 (created) or 0 (an item with this id exists: duplicate), or
-- {'STALE', epoch} when the producer's layout is older than this queue's. Announces
-- a new earliest due time (see `announce`).
local newer = seal(ARGV[1])
if newer then return { 'STALE', newer } end
local n = tonumber(ARGV[2])
local ids = {}
for i = 1, n do ids[i] = ARGV[3 + (i - 1) * 4] end
local existing = redis.call('HMGET', K_ITEMS, unpack(ids))
local res, hitems, zdue, hcls, zmki, seen = {}, {}, {}, {}, {}, {}
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local id = ARGV[b]
  if existing[i] or seen[id] then
    res[i] = 0
  else
    seen[id] = true
    res[i] = 1
    local due, class = ARGV[b + 1], ARGV[b + 2]
    hitems[#hitems + 1] = id
    hitems[#hitems + 1] = ARGV[b + 3]
    zdue[#zdue + 1] = due
    zdue[#zdue + 1] = id
    if class ~= '' then
      hcls[#hcls + 1] = id
      hcls[#hcls + 1] = class
      zmki[#zmki + 1] = 0
      zmki[#zmki + 1] = mki_member(class, tonumber(due), id)
    end
  end
end
if #hitems > 0 then
  -- The head before and after, rather than the earliest of the batch: nothing is
  -- parsed per item on the hot path.
  local before = head_due()
  redis.call('HSET', K_ITEMS, unpack(hitems))
  redis.call('ZADD', K_DUE, unpack(zdue))
  announce(before, head_due())
end
if #hcls > 0 then
  redis.call('HSET', K_CLS, unpack(hcls))
  redis.call('ZADD', K_MKI, unpack(zmki))
end
return res
