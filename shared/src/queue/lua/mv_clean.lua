-- MV_CLEAN: ARGV = layout epoch, back counter seen when the pass began. Records
-- that a full pass found no misplaced item, unless items went back to pending
-- meanwhile, something is still moving, or a newer layout sealed the queue.
-- Answers 1 (recorded) or 0.
local cur = tonumber(redis.call('GET', K_EPOCH) or '0')
if cur > tonumber(ARGV[1]) then return 0 end
if tonumber(redis.call('GET', K_BACK) or '0') ~= tonumber(ARGV[2]) then return 0 end
if redis.call('ZCARD', K_MOVING) > 0 then return 0 end
redis.call('SET', K_CLEAN, ARGV[1])
return 1
