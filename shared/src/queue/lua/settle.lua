-- SETTLE: ARGV = n, then per settlement: id, token ("attempt:nonce"), mode, delay_ms,
-- error. mode 'a' = ack (delete), 'r' = retry after delay_ms (or bury when out of
-- attempts), 'x' = release (due now, attempt not counted). Answers per settlement 1
-- (applied) or 0 (stale token: settled or redelivered meanwhile).
local now = now_ms()
local n = tonumber(ARGV[1])
local ids = {}
for i = 1, n do ids[i] = ARGV[2 + (i - 1) * 5] end
local metas = redis.call('HMGET', K_META, unpack(ids))
local res, acked, ack_metas = {}, {}, {}
local any_cx = nil
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local id, mode = ARGV[b], ARGV[b + 2]
  local m = metas[i] and parse_meta(metas[i])
  if not m or token_of(m) ~= ARGV[b + 1] then
    res[i] = 0
  elseif mode == 'a' then
    res[i] = 1
    acked[#acked + 1] = id
    ack_metas[#ack_metas + 1] = m
  elseif redis.call('ZREM', K_RUN, id) == 0 then
    -- Reaped after its deadline passed; the reaper already decided what happens next.
    res[i] = 0
  else
    res[i] = 1
    if any_cx == nil then any_cx = redis.call('SCARD', K_CX) > 0 end
    if any_cx and redis.call('SISMEMBER', K_CX, id) == 1 then
      forget(id)
    elseif mode == 'x' then
      m.att = m.att - 1
      redis.call('HSET', K_META, id, fmt_meta(m))
      make_pending(id, m, now)
    elseif m.att >= m.max then
      bury(id, now, ARGV[b + 4])
    else
      redis.call('HSET', K_ERR, id, ARGV[b + 4])
      make_pending(id, m, now + tonumber(ARGV[b + 3]))
    end
  end
end
if #acked > 0 then
  if redis.call('ZREM', K_RUN, unpack(acked)) < #acked then
    -- Some were reaped (back to pending, or buried) before the ack arrived; the work
    -- is done, so take them out of there as well.
    for j = 1, #acked do
      unpend(acked[j], ack_metas[j])
      redis.call('ZREM', K_DEAD, acked[j])
    end
  end
  redis.call('HDEL', K_ITEMS, unpack(acked))
  redis.call('HDEL', K_META, unpack(acked))
  if redis.call('HLEN', K_ERR) > 0 then redis.call('HDEL', K_ERR, unpack(acked)) end
  if redis.call('SCARD', K_CX) > 0 then redis.call('SREM', K_CX, unpack(acked)) end
end
return res
