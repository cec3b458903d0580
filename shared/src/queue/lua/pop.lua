-- POP: ARGV = lease_token, max_items, visibility_ms, lease_ttl_ms, merge_window_ms,
-- reap_limit. Fenced by the lease: answers {'STALE'} when the token is not the
-- queue's lease. Otherwise answers {now, next_due_or_-1, then 7 fields per item:
-- id, group, attempt, nonce, due, max_attempts, body}; items of one group form one
-- delivery (merged).
if redis.call('GET', K_LEASE) ~= ARGV[1] then return { 'STALE' } end
redis.call('PEXPIRE', K_LEASE, ARGV[4])
local now = now_ms()
local limit, vis, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])

-- 1. Reap: in-flight items whose deadline passed are due again now (dead when out of
--    attempts, dropped when cancelled while in flight).
local expired = redis.call('ZRANGEBYSCORE', K_RUN, '-inf', num(now), 'LIMIT', 0, ARGV[6])
if #expired > 0 then
  redis.call('ZREM', K_RUN, unpack(expired))
  local metas = redis.call('HMGET', K_META, unpack(expired))
  local any_cx = redis.call('SCARD', K_CX) > 0
  for i = 1, #expired do
    local id = expired[i]
    local m = metas[i] and parse_meta(metas[i])
    if not m or (any_cx and redis.call('SISMEMBER', K_CX, id) == 1) then
      forget(id)
    elseif m.att >= m.max then
      bury(id, now, 'visibility timeout passed during attempt ' .. num(m.att))
    else
      make_pending(id, m, now)
    end
  end
end

-- 2. Pop due items, earliest first. An item with a merge class takes along every
--    pending item of its class due within `window` after it (the merge index), so
--    they are delivered together at the earliest due time.
local out = { now, -1 }
local due = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', num(now), 'WITHSCORES', 'LIMIT', 0, limit)
if #due > 0 then
  local ids = {}
  for i = 1, #due, 2 do ids[#ids + 1] = due[i] end
  local metas = redis.call('HMGET', K_META, unpack(ids))
  local taken, picked, groups = {}, {}, 0
  -- picked[k] = { id, score, group, meta (false until fetched), merge member }
  for i = 1, #ids do
    if #picked >= limit then break end
    local id = ids[i]
    if not taken[id] then
      taken[id] = true
      local score = tonumber(due[2 * i])
      local m = metas[i] and parse_meta(metas[i])
      groups = groups + 1
      picked[#picked + 1] = { id, score, groups, m or false, false }
      if m and m.class ~= '' then
        local prefix = m.class .. '\1'
        local mates = redis.call('ZRANGEBYLEX', K_MKI, '[' .. prefix,
          '[' .. prefix .. pad(score + window) .. '\1\255', 'LIMIT', 0, limit)
        local p = #prefix + 1
        for _, member in ipairs(mates) do
          if #picked >= limit then break end
          local mid = string.sub(member, p + 17)
          if not taken[mid] then
            taken[mid] = true
            picked[#picked + 1] = { mid, tonumber(string.sub(member, p, p + 15)), groups, false, member }
          end
        end
      end
    end
  end
  -- Metas of the merge mates.
  local need, pos = {}, {}
  for k = 1, #picked do
    if picked[k][5] then need[#need + 1] = picked[k][1]; pos[#pos + 1] = k end
  end
  if #need > 0 then
    local mm = redis.call('HMGET', K_META, unpack(need))
    for j = 1, #need do picked[pos[j]][4] = mm[j] and parse_meta(mm[j]) or false end
  end
  local zdue, zmki, hmeta, zrun, live = {}, {}, {}, {}, {}
  local deadline = num(now + vis)
  for k = 1, #picked do
    local id, score, m, member = picked[k][1], picked[k][2], picked[k][4], picked[k][5]
    zdue[#zdue + 1] = id
    if member then
      zmki[#zmki + 1] = member
    elseif m and m.class ~= '' then
      zmki[#zmki + 1] = mki_member(m.class, score, id)
    end
    if m then
      m.att = m.att + 1
      hmeta[#hmeta + 1] = id
      hmeta[#hmeta + 1] = fmt_meta(m)
      zrun[#zrun + 1] = deadline
      zrun[#zrun + 1] = id
      live[#live + 1] = picked[k]
    else
      forget(id) -- a pending id without meta: unreadable, drop it
    end
  end
  redis.call('ZREM', K_DUE, unpack(zdue))
  if #zmki > 0 then redis.call('ZREM', K_MKI, unpack(zmki)) end
  if #live > 0 then
    redis.call('HSET', K_META, unpack(hmeta))
    redis.call('ZADD', K_RUN, unpack(zrun))
    local bids = {}
    for k = 1, #live do bids[k] = live[k][1] end
    local bodies = redis.call('HMGET', K_ITEMS, unpack(bids))
    for k = 1, #live do
      local m = live[k][4]
      out[#out + 1] = live[k][1]
      out[#out + 1] = live[k][3]
      out[#out + 1] = m.att
      out[#out + 1] = m.nonce
      out[#out + 1] = m.due
      out[#out + 1] = m.max
      out[#out + 1] = bodies[k] or ''
    end
  end
end

-- 3. When does this queue next need a consumer: a pending item falls due, or an
--    in-flight deadline passes.
local nd = -1
local h = redis.call('ZRANGE', K_DUE, 0, 0, 'WITHSCORES')
if #h > 0 then nd = tonumber(h[2]) end
local r = redis.call('ZRANGE', K_RUN, 0, 0, 'WITHSCORES')
if #r > 0 and (nd < 0 or tonumber(r[2]) < nd) then nd = tonumber(r[2]) end
out[2] = nd
return out
