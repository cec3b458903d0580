-- MV_IMPORT: ARGV = layout epoch, move token, then 7 fields per item: id, score,
-- kind, body, attempts, last error, merge class. Idempotent per token: a token
-- already imported here answers {'DONE'}. An id that already lives here is kept as
-- it is and the incoming copy dropped (counted). An id here only as the leaving copy
-- of an older move is not alive here: that move landed (or was pointed back here),
-- and the item now comes back under a newer layout. The incoming copy is its latest
-- state, so it is stored and the older move cancelled: that move's MV_FINISH finds
-- no record with its token and forgets nothing. (Dropping the incoming copy instead
-- lost the item: the older move's finish deleted the only copy.) Answers
-- {'OK', dropped} or {'STALE', epoch}.
local token = ARGV[2]
-- The tombstone first: a move that already landed here is done whatever the seal.
if redis.call('ZSCORE', K_IMPORTED, token) then return { 'DONE' } end
local newer = seal(ARGV[1])
if newer then return { 'STALE', newer } end
local dropped = 0
for i = 3, #ARGV, 7 do
  local id, score, kind, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local att, err, class = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  if body ~= '' and redis.call('ZSCORE', K_MOVING, id) then
    redis.call('ZREM', K_MOVING, id)
    redis.call('HDEL', K_MVINFO, id)
    forget(id)
  end
  if body == '' or redis.call('HEXISTS', K_ITEMS, id) == 1 then
    dropped = dropped + 1
  else
    redis.call('HSET', K_ITEMS, id, body)
    if att ~= '' then redis.call('HSET', K_ATT, id, att) end
    if err ~= '' then redis.call('HSET', K_ERR, id, err) end
    if class ~= '' then redis.call('HSET', K_CLS, id, class) end
    if kind == 'd' then
      redis.call('ZADD', K_DEAD, score, id)
    elseif kind == 'k' then
      park(id, body)
    else
      make_pending(id, tonumber(score))
    end
  end
end
redis.call('ZADD', K_IMPORTED, now_ms(), token)
return { 'OK', dropped }
