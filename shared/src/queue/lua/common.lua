-- chime delay queue: helpers shared by every script (prepended to each).
--
-- Every script runs against ONE queue; its keys share the queue's hash tag, so a
-- script touches a single Redis Cluster slot:
--   KEYS[1] due    ZSET  pending item ids, score = when due (ms)
--   KEYS[2] run    ZSET  in-flight item ids, score = visibility deadline (ms)
--   KEYS[3] items  HASH  id -> body (opaque to Lua: key, handler, merge key, payload)
--   KEYS[4] meta   HASH  id -> "due|max_attempts|attempts|nonce|merge_class"
--   KEYS[5] dead   ZSET  dead-lettered ids, score = when buried (ms)
--   KEYS[6] mki    ZSET  merge index, all scores 0, member = class \1 pad(due) \1 id
--   KEYS[7] lease  STRING the consumer lease token (PX TTL)
--   KEYS[8] cx     SET   ids cancelled while in flight (never retried)
--   KEYS[9] err    HASH  id -> last error
-- Time is always Redis TIME, never a client's clock.
local K_DUE, K_RUN, K_ITEMS, K_META, K_DEAD, K_MKI, K_LEASE, K_CX, K_ERR =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]

-- Integers as plain digits (Lua's default number format switches to exponents).
local function num(n) return string.format('%d', n) end
local function pad(n) return string.format('%016d', n) end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function parse_meta(s)
  local due, mx, att, nonce, class = string.match(s, '^(%d+)|(%d+)|(%d+)|(%x+)|(.*)$')
  if not due then return nil end
  return { due = tonumber(due), max = tonumber(mx), att = tonumber(att), nonce = nonce, class = class }
end

local function fmt_meta(m)
  return num(m.due) .. '|' .. num(m.max) .. '|' .. num(m.att) .. '|' .. m.nonce .. '|' .. m.class
end

local function token_of(m) return num(m.att) .. ':' .. m.nonce end

local function mki_member(class, score, id)
  return class .. '\1' .. pad(score) .. '\1' .. id
end

-- Makes an item (in no set) pending at `score`.
local function make_pending(id, m, score)
  redis.call('ZADD', K_DUE, num(score), id)
  if m.class ~= '' then redis.call('ZADD', K_MKI, 0, mki_member(m.class, score, id)) end
end

-- Takes an item out of the pending set and the merge index; false if not pending.
local function unpend(id, m)
  local s = redis.call('ZSCORE', K_DUE, id)
  if not s then return false end
  redis.call('ZREM', K_DUE, id)
  if m.class ~= '' then redis.call('ZREM', K_MKI, mki_member(m.class, tonumber(s), id)) end
  return true
end

-- Deletes an item's records (it is in no set any more).
local function forget(id)
  redis.call('HDEL', K_ITEMS, id)
  redis.call('HDEL', K_META, id)
  redis.call('HDEL', K_ERR, id)
  redis.call('SREM', K_CX, id)
end

local function bury(id, now, err)
  redis.call('ZADD', K_DEAD, num(now), id)
  redis.call('HSET', K_ERR, id, err)
end
