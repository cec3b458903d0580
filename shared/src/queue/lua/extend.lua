-- EXTEND: ARGV = visibility_ms, n, then per item: id, token. Pushes the deadline of
-- in-flight deliveries whose token still matches to now + visibility_ms.
local deadline = num(now_ms() + tonumber(ARGV[1]))
local n = tonumber(ARGV[2])
local ids = {}
for i = 1, n do ids[i] = ARGV[1 + 2 * i] end
local metas = redis.call('HMGET', K_META, unpack(ids))
local z = {}
for i = 1, n do
  local m = metas[i] and parse_meta(metas[i])
  if m and token_of(m) == ARGV[2 + 2 * i] then
    z[#z + 1] = deadline
    z[#z + 1] = ids[i]
  end
end
if #z == 0 then return 0 end
return redis.call('ZADD', K_RUN, 'XX', 'CH', unpack(z))
