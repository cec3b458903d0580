-- POP: ARGV = lease_token, max_items, visibility_ms, lease_ttl_ms, merge_window_ms,
-- reap_limit, most bodies answered inline, then the handlers the consumer serves.
-- Fenced by the lease: answers {'STALE'} when the token is not the queue's lease.
-- Otherwise answers {now, next_due_or_-1, seq, ids, attempts made
-- before, groups, positions}: ids in delivery order; attempts made before per id
-- (nil = 0), or empty when no item had any; group numbers per id, items of one group
-- forming one delivery (merged), or empty when every item is its own delivery;
-- positions in the batch (see below), bodies. The bodies are in the answer only for a
-- small pop (at most ARGV[7]); otherwise it answers an empty list and the caller
-- reads them with a plain HMGET (an item in flight keeps its body until its
-- delivery is settled): a body through Lua is copied three times, which outweighs a
-- command of its own only when a pop is large.
-- First attempts of a pop of 8 items or more are in flight as batch `seq` (one
-- member of `run` for the pop); retries and the items of a smaller pop as members
-- `id \1 seq \1 attempt`; until settled.
if redis.call('GET', K_LEASE) ~= ARGV[1] then return { 'STALE' } end
redis.call('PEXPIRE', K_LEASE, ARGV[4])
local now = now_ms()
local limit, vis, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])

-- 1. Reap: deliveries whose deadline passed are due again now (dead when out of
--    attempts, dropped when cancelled while in flight). Rare path.
local expired = redis.call('ZRANGEBYSCORE', K_RUN, '-inf', num(now), 'LIMIT', 0, ARGV[6])
if #expired > 0 then
  redis.call('ZREM', K_RUN, unpack(expired))
  local any_cx = redis.call('SCARD', K_CX) > 0
  -- Attempt `a` of item `id` ran out of time.
  local function expire(id, a)
    local body = redis.call('HGET', K_ITEMS, id)
    if not body or (any_cx and redis.call('SISMEMBER', K_CX, id) == 1) then
      forget(id)
    else
      set_att(id, a)
      if a >= max_of(body) then
        bury(id, now, 'visibility timeout passed during attempt ' .. num(a))
      else
        make_pending(id, now)
        redis.call('INCR', K_BACK)
      end
    end
  end
  for i = 1, #expired do
    local m = expired[i]
    if string.byte(m, 1) == 2 then
      -- A batch: each item still in it ran out of time on its first attempt.
      local seq = string.sub(m, 2)
      local state = batch_state(seq)
      if state then
        for p, id in ipairs(batch_ids(seq)) do
          if batch_has(state, p, false) then expire(id, 1) end
        end
      end
      redis.call('HDEL', K_BAT, seq)
      redis.call('HDEL', K_BST, seq)
    else
      expire(id_of(m), attempt_of(m))
    end
  end
end

-- 2. Unpark: items waiting for a handler this consumer serves are pending again at
--    their due time, so this pop takes them (at most a pop's worth). Rare path.
if #ARGV > 7 and redis.call('ZCARD', K_PARK) > 0 then
  local budget = limit
  for i = 8, #ARGV do
    if budget <= 0 then break end
    local h = ARGV[i]
    local ms = redis.call('ZRANGEBYLEX', K_PARK, '[' .. h .. '\1', '[' .. h .. '\1\255', 'LIMIT', 0, budget)
    if #ms > 0 then
      redis.call('ZREM', K_PARK, unpack(ms))
      for _, m in ipairs(ms) do
        local id, score = parked_of(m)
        redis.call('HDEL', K_PARKI, id)
        make_pending(id, score)
      end
      -- Back to pending behind a resize's scan: that pass cannot call the queue clean.
      redis.call('INCR', K_BACK)
      budget = budget - #ms
    end
  end
end

-- 3. Pop due items, earliest first. An item with a merge class takes along every
--    pending item of its class due within `window` after it, so they are delivered
--    together at the earliest due time.
local merging = redis.call('HLEN', K_CLS) > 0
-- picked: ids in delivery order; group[k]: delivery number of picked[k] (false when
-- every item is its own delivery).
local picked, group = {}, false
if not merging then
  -- The common case: the due items are the first ranks, so they leave `due` by rank
  -- (no member is looked up) and nothing is parsed per item.
  picked = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', num(now), 'LIMIT', 0, limit)
  if #picked > 0 then redis.call('ZREMRANGEBYRANK', K_DUE, 0, #picked - 1) end
else
  local due = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', num(now), 'WITHSCORES', 'LIMIT', 0, limit)
  if #due > 0 then
    -- mkm: merge-index members of the picked items
    local mkm = {}
    local ids = {}
    for i = 1, #due, 2 do ids[#ids + 1] = due[i] end
    local classes = redis.call('HMGET', K_CLS, unpack(ids))
    local taken, groups = {}, 0
    group = {}
    for i = 1, #ids do
      if #picked >= limit then break end
      local id = ids[i]
      if not taken[id] then
        local class = classes[i]
        local score = tonumber(due[2 * i])
        local mates, prefix = {}, false
        if class then
          prefix = class .. '\1'
          local p = #prefix + 18
          local members = redis.call('ZRANGEBYLEX', K_MKI, '[' .. prefix,
            '[' .. prefix .. pad(score + window) .. '\1\255', 'LIMIT', 0, limit + 1)
          for _, member in ipairs(members) do
            local mid = string.sub(member, p)
            if mid ~= id and not taken[mid] then mates[#mates + 1] = { mid, member } end
          end
        end
        -- A group is never cut at the capacity boundary: when it does not fit behind
        -- the deliveries already picked, it waits whole for the next pop. Only a
        -- group larger than the whole request is delivered in pieces.
        if #picked > 0 and #picked + 1 + #mates > limit then break end
        taken[id] = true
        groups = groups + 1
        picked[#picked + 1] = id
        group[#picked] = groups
        if class then
          mkm[#mkm + 1] = mki_member(class, score, id)
          for _, m in ipairs(mates) do
            if #picked >= limit then break end
            taken[m[1]] = true
            picked[#picked + 1] = m[1]
            group[#picked] = groups
            mkm[#mkm + 1] = m[2]
          end
        end
      end
    end
    redis.call('ZREM', K_DUE, unpack(picked))
    if #mkm > 0 then redis.call('ZREM', K_MKI, unpack(mkm)) end
  end
end

-- First attempts go into one batch (one in-flight record for the whole pop, see
-- common.lua); a retry is a delivery of its own. `pos`: empty when item k is at
-- position k of the batch (the common case: nothing built per item), else per item
-- its position, 0 for a delivery of its own.
local seq, atts, pos = 0, false, {}
if #picked > 0 then
  -- Attempts made before (retries, reaped deliveries); none in the common case.
  if redis.call('HLEN', K_ATT) > 0 then
    atts = redis.call('HMGET', K_ATT, unpack(picked))
    redis.call('HDEL', K_ATT, unpack(picked))
  end
  seq = redis.call('INCR', K_SEQ)
  local deadline = num(now + vis)
  local batch = picked
  -- A few items are cheaper as members of their own than as a batch (whose record,
  -- state and member cost a pop three writes, and each ack a state read and write).
  local small = #picked < 8
  if atts or small then
    -- Retries, and small pops: members of their own.
    local tail = '\1' .. num(seq) .. '\1'
    local zrun = {}
    batch = {}
    for k = 1, #picked do
      local id = picked[k]
      pos[k] = 0
      if atts and atts[k] then
        zrun[#zrun + 1] = deadline
        zrun[#zrun + 1] = id .. tail .. num(tonumber(atts[k]) + 1)
      elseif small then
        zrun[#zrun + 1] = deadline
        zrun[#zrun + 1] = id .. tail .. '1'
      else
        batch[#batch + 1] = id
        pos[k] = #batch
      end
    end
    if #zrun > 0 then redis.call('ZADD', K_RUN, unpack(zrun)) end
  end
  if #batch > 0 then
    redis.call('HSET', K_BAT, seq, table.concat(batch, '\1'))
    redis.call('HSET', K_BST, seq, string.format('%d|%d|', #batch, #batch))
    redis.call('ZADD', K_RUN, deadline, '\2' .. seq)
  end
end

-- 4. When does this queue next need a consumer: a pending item falls due, or an
--    in-flight deadline passes.
local nd = -1
local h = redis.call('ZRANGE', K_DUE, 0, 0, 'WITHSCORES')
if #h > 0 then nd = tonumber(h[2]) end
local r = redis.call('ZRANGE', K_RUN, 0, 0, 'WITHSCORES')
if #r > 0 and (nd < 0 or tonumber(r[2]) < nd) then nd = tonumber(r[2]) end
-- The tables Redis answered are answered as they are (nested arrays): nothing is
-- copied per item to build the reply.
local bodies = {}
if #picked > 0 and #picked <= tonumber(ARGV[7]) then bodies = redis.call('HMGET', K_ITEMS, unpack(picked)) end
return { now, nd, seq, picked, atts or {}, group or {}, pos, bodies }
