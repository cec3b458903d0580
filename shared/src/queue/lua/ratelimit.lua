-- RATE: KEYS[1] = state HASH, KEYS[2] = active ZSET (both tagged by the budget).
-- ARGV = handler, want, rate (items/s for the whole budget), cap (the handler's own
-- limit, 0 = none), burst_ms, active_ms.
--
-- A smooth token bucket per active handler, refilled at an equal share of the rate
-- (rate / active handlers), or at its own cap when that is lower. What a handler
-- cannot use (its share above its cap, or tokens above its bucket's capacity) goes to
-- a shared spare pool that uncapped handlers draw from when their own bucket is
-- empty: each handler gets an equal share of what is left, and nothing of the budget
-- is wasted while someone wants it. Answers {granted, wait_ms}.
local handler, want = ARGV[1], tonumber(ARGV[2])
local rate, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local burst, active_ms = tonumber(ARGV[5]) / 1000, tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', KEYS[2], now, handler)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - active_ms)
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
local raw = redis.call('HGETALL', KEYS[1])
local st = {}
for i = 1, #raw, 2 do st[raw[i]] = raw[i + 1] end
st['cap:' .. handler] = tostring(cap)
local share = rate / #members
local spare = tonumber(st['spare'] or '0')
local writes = { 'cap:' .. handler, tostring(cap) }
local mine_rate = share
for _, h in ipairs(members) do
  local last = tonumber(st['t:' .. h] or tostring(now))
  local tok = tonumber(st['tok:' .. h] or '0')
  local c = tonumber(st['cap:' .. h] or '0')
  local r = share
  if c > 0 and c < share then r = c end
  local dt = math.max(now - last, 0) / 1000
  local capacity = math.max(r * burst, 1)
  tok = tok + r * dt
  local surplus = (share - r) * dt
  if tok > capacity then
    surplus = surplus + tok - capacity
    tok = capacity
  end
  spare = spare + surplus
  if h == handler then mine_rate = r end
  st['tok:' .. h] = tok
  writes[#writes + 1] = 't:' .. h
  writes[#writes + 1] = tostring(now)
end
spare = math.min(spare, math.max(rate * burst, 1))
local tok = st['tok:' .. handler]
local granted = math.min(want, math.floor(tok))
tok = tok - granted
if granted < want and (cap == 0 or cap >= share) then
  local extra = math.min(want - granted, math.floor(spare))
  granted = granted + extra
  spare = spare - extra
end
st['tok:' .. handler] = tok
for _, h in ipairs(members) do
  writes[#writes + 1] = 'tok:' .. h
  writes[#writes + 1] = tostring(st['tok:' .. h])
end
writes[#writes + 1] = 'spare'
writes[#writes + 1] = tostring(spare)
redis.call('HSET', KEYS[1], unpack(writes))
redis.call('PEXPIRE', KEYS[1], 3600000)
redis.call('PEXPIRE', KEYS[2], 3600000)
local wait = 0
if granted < want then wait = math.ceil((want - granted - tok) / mine_rate * 1000) end
return { granted, math.max(wait, 0) }
