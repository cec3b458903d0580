-- EXTEND: ARGV = visibility_ms, n, then n in-flight members (id \1 seq \1 attempt),
-- then their n positions in batch seq (0: a delivery of its own). Pushes the
-- deadline of the deliveries that are still current to now + visibility_ms; answers
-- how many.
-- A batch whose every item still in it is named moves its deadline whole: that is
-- the worker's periodic extension of all it holds, one write per batch. When only
-- some are named (a handler extending its own item), those leave the batch as
-- members `id \1 seq \1 1` with the new deadline and the rest keep theirs: a handler
-- that extends never keeps another item from being redelivered.
local deadline = num(now_ms() + tonumber(ARGV[1]))
local n = tonumber(ARGV[2])
-- Named batch positions by seq (in order of first appearance), and members of their
-- own (`z`: deadline, member pairs for ZADD XX).
local groups, order, z = {}, {}, {}
for i = 1, n do
  local member, p = ARGV[2 + i], tonumber(ARGV[2 + n + i])
  if p > 0 then
    local seq = seq_of(member)
    local g = groups[seq]
    if not g then
      g = { members = {}, ps = {} }
      groups[seq] = g
      order[#order + 1] = seq
    end
    g.members[#g.members + 1] = member
    g.ps[#g.ps + 1] = p
  else
    z[#z + 1] = deadline
    z[#z + 1] = member
  end
end
local count, fresh = 0, {}
for _, seq in ipairs(order) do
  local g = groups[seq]
  local state = batch_state(seq)
  -- Named positions still in the batch (each once).
  local held, seen = 0, {}
  if state then
    for _, p in ipairs(g.ps) do
      if not seen[p] and batch_has(state, p, false) then
        held = held + 1
        seen[p] = true
      end
    end
  end
  if state and held == state.left then
    redis.call('ZADD', K_RUN, 'XX', deadline, '\2' .. seq)
    count = count + held
    -- Named positions out of the batch: members of their own, if current.
    for i, p in ipairs(g.ps) do
      if not seen[p] then
        z[#z + 1] = deadline
        z[#z + 1] = g.members[i]
      end
    end
  else
    for i, p in ipairs(g.ps) do
      if state and batch_has(state, p, true) then
        fresh[#fresh + 1] = deadline
        fresh[#fresh + 1] = g.members[i]
      else
        z[#z + 1] = deadline
        z[#z + 1] = g.members[i]
      end
    end
    if state then batch_save(seq, state) end
  end
end
if #fresh > 0 then count = count + redis.call('ZADD', K_RUN, unpack(fresh)) end
if #z > 0 then count = count + redis.call('ZADD', K_RUN, 'XX', 'CH', unpack(z)) end
return count
