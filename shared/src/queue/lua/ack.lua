-- ACK: ARGV = n, then n in-flight members (id \1 seq \1 attempt), then the n ids of
-- those members in the same order (so that the common call slices ARGV instead of
-- parsing members). Deletes the items of the deliveries that are still current;
-- answers n when all were, else per member 1 (acked) or 0 (stale: the delivery was
-- settled, or its deadline passed and it was reaped).
local n = tonumber(ARGV[1])
local M, I = 2, 2 + n -- first index of the members and of the ids

-- Deletes the c deliveries `members[m..]` of items `ids[i..]` and the items' records.
local function settle(members, m, ids, i, c)
  redis.call('ZREM', K_RUN, unpack(members, m, m + c - 1))
  local a, b = i, i + c - 1
  redis.call('HDEL', K_ITEMS, unpack(ids, a, b))
  if redis.call('HLEN', K_ATT) > 0 then redis.call('HDEL', K_ATT, unpack(ids, a, b)) end
  if redis.call('HLEN', K_ERR) > 0 then redis.call('HDEL', K_ERR, unpack(ids, a, b)) end
  if redis.call('HLEN', K_CLS) > 0 then redis.call('HDEL', K_CLS, unpack(ids, a, b)) end
  if redis.call('SCARD', K_CX) > 0 then redis.call('SREM', K_CX, unpack(ids, a, b)) end
end

local scores = redis.call('ZMSCORE', K_RUN, unpack(ARGV, M, M + n - 1))
local all = true
for i = 1, n do
  if not scores[i] then
    all = false
    break
  end
end
if all then
  settle(ARGV, M, ARGV, I, n)
  return n
end
-- Rare path: some deliveries are stale; settle only the current ones.
local live, ids, res = {}, {}, {}
for i = 1, n do
  if scores[i] then
    live[#live + 1] = ARGV[M + i - 1]
    ids[#ids + 1] = ARGV[I + i - 1]
    res[i] = 1
  else
    res[i] = 0
  end
end
if #live > 0 then settle(live, 1, ids, 1, #live) end
return res
