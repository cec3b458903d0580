-- ACK: ARGV = in-flight members (id \1 seq \1 attempt). Deletes the items of the deliveries
-- that are still current; answers per member 1 (acked) or 0 (stale: the delivery
-- was settled, or its deadline passed and it was reaped).
local scores = redis.call('ZMSCORE', K_RUN, unpack(ARGV))
local live, ids, res = {}, {}, {}
for i = 1, #ARGV do
  if scores[i] then
    live[#live + 1] = ARGV[i]
    ids[#ids + 1] = id_of(ARGV[i])
    res[i] = 1
  else
    res[i] = 0
  end
end
if #live > 0 then
  redis.call('ZREM', K_RUN, unpack(live))
  redis.call('HDEL', K_ITEMS, unpack(ids))
  if redis.call('HLEN', K_ATT) > 0 then redis.call('HDEL', K_ATT, unpack(ids)) end
  if redis.call('HLEN', K_ERR) > 0 then redis.call('HDEL', K_ERR, unpack(ids)) end
  if redis.call('HLEN', K_CLS) > 0 then redis.call('HDEL', K_CLS, unpack(ids)) end
  if redis.call('SCARD', K_CX) > 0 then redis.call('SREM', K_CX, unpack(ids)) end
end
return res
