-- ENQUEUE: ARGV = layout epoch, n, c ('1' when some item has a merge class, else
-- '0'), then sections of n: the ids, their due times, their bodies, and when c is
-- '1' their merge classes ('' for none). Each id is sent once (an id's bytes cross
-- into Lua once, not once per command that names it); the caller sends an id at
-- most once per call (a repeat in one call is a duplicate it answers itself), so the
-- common call — no duplicate, no merge class — is three variadic commands and one
-- loop that only lays out their arguments.
-- Answers n when every item was created; otherwise per item 1 (created) or 0 (an item
-- with this id exists: duplicate); or {'STALE', epoch} when the producer's layout is
-- older than this queue's. Announces a new earliest due time (see `announce`).
local newer = seal(ARGV[1])
if newer then return { 'STALE', newer } end
local n = tonumber(ARGV[2])
local merging = ARGV[3] == '1'
-- First index of each section.
local I, D, B, C = 4, 4 + n, 4 + 2 * n, 4 + 3 * n
local existing = redis.call('HMGET', K_ITEMS, unpack(ARGV, I, I + n - 1))
local fresh = true
for i = 1, n do
  if existing[i] then
    fresh = false
    break
  end
end
-- The head before and after, rather than the earliest of the batch: nothing is
-- parsed per item on the hot path.
local before = head_due()
local res
if fresh then
  local hitems, zdue = {}, {}
  for i = 0, n - 1 do
    local id = ARGV[I + i]
    hitems[2 * i + 1], hitems[2 * i + 2] = id, ARGV[B + i]
    zdue[2 * i + 1], zdue[2 * i + 2] = ARGV[D + i], id
  end
  redis.call('HSET', K_ITEMS, unpack(hitems))
  redis.call('ZADD', K_DUE, unpack(zdue))
  res = n
else
  -- Rare path: some ids exist; store only the others.
  local hitems, zdue = {}, {}
  res = {}
  for i = 1, n do
    if existing[i] then
      res[i] = 0
    else
      res[i] = 1
      local id = ARGV[I + i - 1]
      hitems[#hitems + 1] = id
      hitems[#hitems + 1] = ARGV[B + i - 1]
      zdue[#zdue + 1] = ARGV[D + i - 1]
      zdue[#zdue + 1] = id
    end
  end
  if #hitems > 0 then
    redis.call('HSET', K_ITEMS, unpack(hitems))
    redis.call('ZADD', K_DUE, unpack(zdue))
  end
end
if merging then
  local hcls, zmki = {}, {}
  for i = 1, n do
    local class = ARGV[C + i - 1]
    if class ~= '' and not existing[i] then
      local id = ARGV[I + i - 1]
      hcls[#hcls + 1] = id
      hcls[#hcls + 1] = class
      zmki[#zmki + 1] = 0
      zmki[#zmki + 1] = mki_member(class, tonumber(ARGV[D + i - 1]), id)
    end
  end
  if #hcls > 0 then
    redis.call('HSET', K_CLS, unpack(hcls))
    redis.call('ZADD', K_MKI, unpack(zmki))
  end
end
local after = head_due()
if after then announce(before, after) end
return res
