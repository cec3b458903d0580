-- EXTEND: ARGV = visibility_ms, then in-flight members. Pushes the deadline of the
-- deliveries that are still current to now + visibility_ms; answers how many.
local deadline = num(now_ms() + tonumber(ARGV[1]))
local z = {}
for i = 2, #ARGV do
  z[#z + 1] = deadline
  z[#z + 1] = ARGV[i]
end
return redis.call('ZADD', K_RUN, 'XX', 'CH', unpack(z))
