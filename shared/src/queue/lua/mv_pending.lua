-- MV_PENDING: ARGV = limit. Moves left unfinished (a mover died): 8 fields per item:
-- id, score, kind, body, attempts, last error, merge class, mvinfo.
local ids = redis.call('ZRANGE', K_MOVING, 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #ids, 2 do
  local id = ids[i]
  local info = redis.call('HGET', K_MVINFO, id) or ''
  out[#out + 1] = id
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = string.sub(info, -1)
  out[#out + 1] = redis.call('HGET', K_ITEMS, id) or ''
  out[#out + 1] = redis.call('HGET', K_ATT, id) or ''
  out[#out + 1] = redis.call('HGET', K_ERR, id) or ''
  out[#out + 1] = redis.call('HGET', K_CLS, id) or ''
  out[#out + 1] = info
end
return out
