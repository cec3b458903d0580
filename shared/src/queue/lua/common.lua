-- chime delay queue: helpers shared by every script (prepended to each).
--
-- Every script runs against ONE queue; its keys share the queue's hash tag, so a
-- script touches a single Redis Cluster slot:
--   KEYS[1]  due    ZSET   pending item ids, score = when due (ms)
--   KEYS[2]  run    ZSET   in-flight deliveries, member = id \1 seq \1 attempt,
--                          score = visibility deadline (ms)
--   KEYS[3]  items  HASH   id -> body ("max|due|" + binary; see codec.rs)
--   KEYS[4]  att    HASH   id -> attempts made, for items that are not in flight and
--                          were tried before (absent = 0; in flight, the member says)
--   KEYS[5]  dead   ZSET   dead-lettered ids, score = when buried (ms)
--   KEYS[6]  mki    ZSET   merge index, scores 0, member = class \1 pad(due) \1 id
--   KEYS[7]  lease  STRING the consumer lease token (PX TTL)
--   KEYS[8]  cx     SET    ids cancelled while in flight (never retried)
--   KEYS[9]  err    HASH   id -> last error
--   KEYS[10] cls    HASH   id -> merge class (items with a merge key only)
--   KEYS[11] seq    STRING delivery counter: each pop takes the next value
-- An item is in exactly one of due, run, dead. Time is Redis TIME, never a client's.
-- The hot path (enqueue, pop, ack, extend) uses only variadic commands and parses
-- nothing per item; rare paths (reap, retry, cancel, reschedule) may.
local K_DUE, K_RUN, K_ITEMS, K_ATT, K_DEAD, K_MKI, K_LEASE, K_CX, K_ERR, K_CLS, K_SEQ =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]

-- Integers as plain digits (Lua's default number format switches to exponents).
local function num(n) return string.format('%d', n) end
local function pad(n) return string.format('%016d', n) end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Records attempts of an item leaving the in-flight set (none: forget the count).
local function set_att(id, a)
  if a > 0 then redis.call('HSET', K_ATT, id, a) else redis.call('HDEL', K_ATT, id) end
end

local function max_of(body)
  return tonumber(string.match(body, '^(%d+)|')) or 1
end

local function id_of(member)
  return string.sub(member, 1, string.find(member, '\1', 1, true) - 1)
end

-- The attempt number carried by an in-flight member.
local function attempt_of(member)
  return tonumber(string.match(member, '\1(%d+)$'))
end

local function mki_member(class, score, id)
  return class .. '\1' .. pad(score) .. '\1' .. id
end

-- Makes an item (in no set) pending at `score`.
local function make_pending(id, score)
  redis.call('ZADD', K_DUE, num(score), id)
  local class = redis.call('HGET', K_CLS, id)
  if class then redis.call('ZADD', K_MKI, 0, mki_member(class, score, id)) end
end

-- Takes an item out of the pending set and the merge index; false if not pending.
local function unpend(id)
  local s = redis.call('ZSCORE', K_DUE, id)
  if not s then return false end
  redis.call('ZREM', K_DUE, id)
  local class = redis.call('HGET', K_CLS, id)
  if class then redis.call('ZREM', K_MKI, mki_member(class, tonumber(s), id)) end
  return true
end

-- Deletes an item's records (it is in no set any more).
local function forget(id)
  redis.call('HDEL', K_ITEMS, id)
  redis.call('HDEL', K_ATT, id)
  redis.call('HDEL', K_ERR, id)
  redis.call('HDEL', K_CLS, id)
  redis.call('SREM', K_CX, id)
end

local function bury(id, now, err)
  redis.call('ZADD', K_DEAD, num(now), id)
  redis.call('HSET', K_ERR, id, err)
end
