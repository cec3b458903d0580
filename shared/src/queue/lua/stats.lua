-- STATS: answers {pending, due now, in flight, dead, next due or -1, moving,
-- due within ARGV[1] ms, waiting for a handler}.
local now = now_ms()
local h = redis.call('ZRANGE', K_DUE, 0, 0, 'WITHSCORES')
local nd = -1
if #h > 0 then nd = tonumber(h[2]) end
-- In flight: deliveries of their own, and the items still in each batch (a batch is
-- one member of `run`).
local in_flight = redis.call('ZCARD', K_RUN)
for _, st in ipairs(redis.call('HVALS', K_BST)) do
  in_flight = in_flight - 1 + tonumber(string.match(st, '^%d+|(%d+)|'))
end
return {
  redis.call('ZCARD', K_DUE),
  redis.call('ZCOUNT', K_DUE, '-inf', num(now)),
  in_flight,
  redis.call('ZCARD', K_DEAD),
  nd,
  redis.call('ZCARD', K_MOVING),
  redis.call('ZCOUNT', K_DUE, '-inf', num(now + tonumber(ARGV[1]))),
  redis.call('ZCARD', K_PARK),
}
