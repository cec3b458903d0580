-- GET: ARGV = id, glob-escaped id. Answers {body, attempts, pending score, in-flight
-- member, in-flight deadline, dead since, last error, cancelled-in-flight flag,
-- waiting (parked) due score} as one consistent snapshot. Finding the in-flight
-- member scans the in-flight set and the batches (an operator's call, not the hot
-- path).
local id = ARGV[1]
local member, deadline = false, false
local pm = redis.call('HGET', K_PARKI, id)
local parked = false
if pm then
  local _, s = parked_of(pm)
  parked = s
end
if not redis.call('ZSCORE', K_DUE, id) and not redis.call('ZSCORE', K_DEAD, id)
   and not redis.call('ZSCORE', K_MOVING, id) and not pm
   and redis.call('HEXISTS', K_ITEMS, id) == 1 then
  local cursor = '0'
  repeat
    local r = redis.call('ZSCAN', K_RUN, cursor, 'MATCH', ARGV[2] .. '\1*', 'COUNT', 1000)
    cursor = r[1]
    if #r[2] > 0 then
      member, deadline = r[2][1], r[2][2]
      break
    end
  until cursor == '0'
  if not member then
    -- At a position of a batch whose bit is clear (an id may be in an older batch
    -- too, settled there before it was enqueued again).
    local wanted = '\1' .. id .. '\1'
    cursor = '0'
    repeat
      local r = redis.call('HSCAN', K_BAT, cursor, 'COUNT', 100)
      cursor = r[1]
      for i = 1, #r[2], 2 do
        local seq, rec = r[2][i], '\1' .. r[2][i + 1] .. '\1'
        local at = string.find(rec, wanted, 1, true)
        while at and not member do
          local _, p = string.gsub(string.sub(rec, 1, at), '\1', '')
          local state = batch_state(seq)
          if state and batch_has(state, p, false) then
            member = id .. '\1' .. seq .. '\1' .. '1'
            deadline = redis.call('ZSCORE', K_RUN, '\2' .. seq)
          end
          at = string.find(rec, wanted, at + 1, true)
        end
      end
    until member or cursor == '0'
  end
end
return {
  redis.call('HGET', K_ITEMS, id),
  redis.call('HGET', K_ATT, id),
  redis.call('ZSCORE', K_DUE, id) or redis.call('ZSCORE', K_MOVING, id),
  member,
  deadline,
  redis.call('ZSCORE', K_DEAD, id),
  redis.call('HGET', K_ERR, id),
  redis.call('SISMEMBER', K_CX, id),
  parked and num(parked) or false,
}
