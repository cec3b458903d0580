-- MV_TAKE: ARGV = lease token, layout epoch, move token, then per item: id, target.
-- Fenced by the lease and the epoch. Takes pending, dead or waiting items out of
-- reach (into `moving`) and answers 7 fields per item taken: id, score, kind ('p',
-- 'd' or 'k'), body, attempts, last error, merge class ('' when none). Items popped
-- meanwhile are left.
if redis.call('GET', K_LEASE) ~= ARGV[1] then return { 'STALE_LEASE' } end
local newer = seal(ARGV[2])
if newer then return { 'STALE', newer } end
local token = ARGV[3]
local out = {}
for i = 4, #ARGV, 2 do
  local id, target = ARGV[i], ARGV[i + 1]
  local kind, score = 'p', redis.call('ZSCORE', K_DUE, id)
  if score then
    unpend(id)
  else
    kind, score = 'd', redis.call('ZSCORE', K_DEAD, id)
    if score then
      redis.call('ZREM', K_DEAD, id)
    else
      kind, score = 'k', unpark(id)
    end
  end
  if score then
    redis.call('ZADD', K_MOVING, score, id)
    redis.call('HSET', K_MVINFO, id, token .. '|' .. target .. '|' .. kind)
    out[#out + 1] = id
    out[#out + 1] = score
    out[#out + 1] = kind
    out[#out + 1] = redis.call('HGET', K_ITEMS, id) or ''
    out[#out + 1] = redis.call('HGET', K_ATT, id) or ''
    out[#out + 1] = redis.call('HGET', K_ERR, id) or ''
    out[#out + 1] = redis.call('HGET', K_CLS, id) or ''
  end
end
return out
