-- MV_FINISH: ARGV = move token, then ids. Forgets moved items whose move carries
-- this token (they live in their new queue now). Answers how many.
local token = ARGV[1]
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local info = redis.call('HGET', K_MVINFO, id)
  if info and string.sub(info, 1, #token + 1) == token .. '|' then
    redis.call('ZREM', K_MOVING, id)
    redis.call('HDEL', K_MVINFO, id)
    forget(id)
    n = n + 1
  end
end
return n
