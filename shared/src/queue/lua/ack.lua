-- ACK: ARGV = n, g, then g triples (seq, c, positions) for the deliveries that are
-- at a position of a batch (positions: c 3-byte big-endian numbers in one string),
-- then the members (id \1 seq \1 attempt) of the other n - sum(c) deliveries, then
-- the n ids: the batches' items first, in the triples' order, then the others.
-- Deletes the items of the deliveries that are still current; answers n when all
-- were, else per id (in ARGV's order) 1 (acked) or 0 (stale: the delivery was
-- settled, or its deadline passed and it was reaped).
-- A batch position is current while its bit is clear; once set (settled, or the item
-- was extended into a delivery of its own, member `id \1 seq \1 1`) that member
-- decides. The common call — every item still in its batch — sets bits and deletes
-- the items: no sorted set is touched per item.
local n, g = tonumber(ARGV[1]), tonumber(ARGV[2])
local nb = 0
for j = 1, g do nb = nb + tonumber(ARGV[3 * j + 1]) end
local M = 3 + 3 * g -- first member of the other deliveries
local I = M + (n - nb) -- first id

-- ok[k]: delivery k is current. `loose`: positions found out of their batch, to be
-- checked as deliveries of their own (k, member).
local ok, all, loose = {}, true, {}
local k = 0
for j = 1, g do
  local seq, c, packed = ARGV[3 * j], tonumber(ARGV[3 * j + 1]), ARGV[3 * j + 2]
  local state = batch_state(seq)
  for i = 1, c do
    k = k + 1
    local b1, b2, b3 = string.byte(packed, 3 * i - 2, 3 * i)
    if state and batch_has(state, b1 * 65536 + b2 * 256 + b3, true) then
      ok[k] = true
    else
      all = false
      loose[#loose + 1] = { k, ARGV[I + k - 1] .. '\1' .. seq .. '\1' .. '1' }
    end
  end
  if state then batch_save(seq, state) end
end

-- Deliveries of their own, and positions that left their batch: current while their
-- member is in flight.
local members, where = {}, {}
for i = 1, #loose do
  members[#members + 1] = loose[i][2]
  where[#where + 1] = loose[i][1]
end
for i = 1, n - nb do
  members[#members + 1] = ARGV[M + i - 1]
  where[#where + 1] = nb + i
end
if #members > 0 then
  local scores = redis.call('ZMSCORE', K_RUN, unpack(members))
  local live = {}
  for i = 1, #members do
    if scores[i] then
      live[#live + 1] = members[i]
      ok[where[i]] = true
    else
      all = false
    end
  end
  if #live > 0 then redis.call('ZREM', K_RUN, unpack(live)) end
end

-- Deletes the records of items `ids[a..b]`.
local function forget_all(ids, a, b)
  redis.call('HDEL', K_ITEMS, unpack(ids, a, b))
  if redis.call('HLEN', K_ATT) > 0 then redis.call('HDEL', K_ATT, unpack(ids, a, b)) end
  if redis.call('HLEN', K_ERR) > 0 then redis.call('HDEL', K_ERR, unpack(ids, a, b)) end
  if redis.call('HLEN', K_CLS) > 0 then redis.call('HDEL', K_CLS, unpack(ids, a, b)) end
  if redis.call('SCARD', K_CX) > 0 then redis.call('SREM', K_CX, unpack(ids, a, b)) end
end

if all then
  if n > 0 then forget_all(ARGV, I, I + n - 1) end
  return n
end
-- Rare path: some deliveries are stale; settle only the current ones.
local ids, res = {}, {}
for i = 1, n do
  if ok[i] then
    ids[#ids + 1] = ARGV[I + i - 1]
    res[i] = 1
  else
    res[i] = 0
  end
end
if #ids > 0 then forget_all(ids, 1, #ids) end
return res
