-- FAIL: ARGV = n, then per delivery: member (id \1 seq \1 attempt), position in
-- batch seq (0: a delivery of its own), mode, delay_ms, error. mode 'r' = retry
-- after delay_ms (or bury when out of attempts), 'x' = release (due now, attempt not
-- counted), 'k' = park (waits for a consumer serving its handler, attempt not
-- counted). Answers per delivery 1 (applied) or 0 (stale).
local now = now_ms()
local n = tonumber(ARGV[1])
local any_cx = redis.call('SCARD', K_CX) > 0
local res = {}
-- Whether the delivery is current, taking it out of flight when it is: out of its
-- batch while its bit is clear, else as a member of its own.
local function take(member, p)
  if p > 0 then
    local seq = seq_of(member)
    local state = batch_state(seq)
    if state and batch_has(state, p, true) then
      batch_save(seq, state)
      return true
    end
  end
  return redis.call('ZREM', K_RUN, member) == 1
end
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local member, mode = ARGV[b], ARGV[b + 2]
  if not take(member, tonumber(ARGV[b + 1])) then
    res[i] = 0
  else
    res[i] = 1
    local id = id_of(member)
    local body = redis.call('HGET', K_ITEMS, id)
    if not body or (any_cx and redis.call('SISMEMBER', K_CX, id) == 1) then
      forget(id)
    elseif mode == 'x' then
      set_att(id, attempt_of(member) - 1)
      make_pending(id, now)
      redis.call('INCR', K_BACK)
    elseif mode == 'k' then
      set_att(id, attempt_of(member) - 1)
      park(id, body)
      -- The park may land behind a resize's scan of it: void that pass.
      redis.call('INCR', K_BACK)
    else
      local a = attempt_of(member)
      set_att(id, a)
      if a >= max_of(body) then
        bury(id, now, ARGV[b + 4])
      else
        redis.call('HSET', K_ERR, id, ARGV[b + 4])
        make_pending(id, now + tonumber(ARGV[b + 3]))
        redis.call('INCR', K_BACK)
      end
    end
  end
end
return res
