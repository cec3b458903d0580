-- MV_RETARGET: ARGV = move token, new target, then ids. Points unfinished moves
-- (that never landed: their old target refused them) at a new target, so a later
-- recovery imports where this attempt does.
local token, target = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local info = redis.call('HGET', K_MVINFO, ARGV[i])
  if info and string.sub(info, 1, #token + 1) == token .. '|' then
    redis.call('HSET', K_MVINFO, ARGV[i], token .. '|' .. target .. '|' .. string.sub(info, -1))
  end
end
return 1
