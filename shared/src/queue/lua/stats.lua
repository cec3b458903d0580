-- STATS: answers {pending, due now, in flight, dead, next due or -1, moving,
-- due within ARGV[1] ms, waiting for a handler}.
local now = now_ms()
local h = redis.call('ZRANGE', K_DUE, 0, 0, 'WITHSCORES')
local nd = -1
if #h > 0 then nd = tonumber(h[2]) end
return {
  redis.call('ZCARD', K_DUE),
  redis.call('ZCOUNT', K_DUE, '-inf', num(now)),
  redis.call('ZCARD', K_RUN),
  redis.call('ZCARD', K_DEAD),
  nd,
  redis.call('ZCARD', K_MOVING),
  redis.call('ZCOUNT', K_DUE, '-inf', num(now + tonumber(ARGV[1]))),
  redis.call('ZCARD', K_PARK),
}
