-- chime delay queue: helpers shared by every script (prepended to each).
--
-- Every script runs against ONE queue; its keys share the queue's hash tag, so a
-- script touches a single Redis Cluster slot:
--   KEYS[1]  due    ZSET   pending item ids, score = when due (ms)
--   KEYS[2]  run    ZSET   in-flight deliveries, score = visibility deadline (ms);
--                          member = id \1 seq \1 attempt (a delivery of its own), or
--                          \2 seq (the batch of first attempts pop `seq` made)
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
--   KEYS[12] epoch  STRING the newest layout epoch this queue has seen (the seal):
--                          producers and movers with an older layout are refused
--   KEYS[13] moving ZSET   ids a resize is moving out, score = their pending score
--   KEYS[14] mvinfo HASH   id -> "token|target queue|p or d" for moving ids
--   KEYS[15] imported ZSET move tokens already imported here (idempotent import)
--   KEYS[16] back   STRING counts items going back from run/dead to due (a resize's
--                          "is this queue clean" pass is void if it changed)
--   KEYS[17] clean  STRING the epoch this queue was last found clean for
--   KEYS[18] park   ZSET   items waiting for a handler (no consumer that popped them
--                          served it), scores 0, member = handler \1 pad(due) \1 id
--   KEYS[19] parki  HASH   id -> its park member (finding a waiting item by id)
--   KEYS[20] bat    HASH   seq -> the ids of batch `seq`, joined by \1 (position p is
--                          the p-th id)
--   KEYS[21] bst    HASH   seq -> "count|left|bitmap": the batch's size, how many of
--                          its items are still in it, and a bit per position (LSB
--                          first) set once that item left it (settled, or extended
--                          into a delivery of its own)
-- A batch is why a pop writes one in-flight record, not one per item, and an ack
-- checks a bit, not a sorted-set member: an item is in flight either as a delivery of
-- its own or at a position of a batch whose bit is clear.
-- An item is in exactly one of due, run, dead, moving, park. Time is Redis TIME, never a
-- client's.
-- The hot path (enqueue, pop, ack, extend) uses only variadic commands and parses
-- nothing per item; rare paths (reap, retry, cancel, reschedule) may.
local K_DUE, K_RUN, K_ITEMS, K_ATT, K_DEAD, K_MKI, K_LEASE, K_CX, K_ERR, K_CLS, K_SEQ =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local K_EPOCH, K_MOVING, K_MVINFO, K_IMPORTED, K_BACK, K_CLEAN, K_PARK, K_PARKI =
  KEYS[12], KEYS[13], KEYS[14], KEYS[15], KEYS[16], KEYS[17], KEYS[18], KEYS[19]
local K_BAT, K_BST = KEYS[20], KEYS[21]

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

-- The seq of an in-flight member: a batch's (\2 seq) or a delivery's (id \1 seq \1 a).
local function seq_of(member)
  if string.byte(member, 1) == 2 then return string.sub(member, 2) end
  return string.match(member, '\1(%d+)\1%d+$')
end

-- A batch's state: size, items still in it, and its bitmap as a table of bytes
-- (read in slices: `string.byte` answers on Lua's C stack).
local function batch_state(seq)
  local st = redis.call('HGET', K_BST, seq)
  if not st then return false end
  local a = string.find(st, '|', 1, true)
  local b = string.find(st, '|', a + 1, true)
  local bytes, len = {}, #st
  local p = b + 1
  while p <= len do
    local q = math.min(p + 3999, len)
    local slice = { string.byte(st, p, q) }
    for i = 1, #slice do bytes[#bytes + 1] = slice[i] end
    p = q + 1
  end
  return { count = tonumber(string.sub(st, 1, a - 1)), left = tonumber(string.sub(st, a + 1, b - 1)), bytes = bytes }
end

-- Whether position p of a batch state is still in the batch; when it is and `take`,
-- takes it out (sets its bit).
local function batch_has(state, p, take)
  if p < 1 or p > state.count then return false end
  local bi, m = math.floor((p - 1) / 8) + 1, 2 ^ ((p - 1) % 8)
  local bytes = state.bytes
  for f = #bytes + 1, bi do bytes[f] = 0 end
  if math.floor(bytes[bi] / m) % 2 == 1 then return false end
  if take then
    bytes[bi] = bytes[bi] + m
    state.left = state.left - 1
  end
  return true
end

-- Writes a batch state back; a batch nothing is left in is deleted with its record.
local function batch_save(seq, state)
  if state.left <= 0 then
    redis.call('HDEL', K_BAT, seq)
    redis.call('HDEL', K_BST, seq)
    redis.call('ZREM', K_RUN, '\2' .. seq)
    return
  end
  local parts, bytes = {}, state.bytes
  for i = 1, #bytes, 4000 do
    parts[#parts + 1] = string.char(unpack(bytes, i, math.min(i + 3999, #bytes)))
  end
  redis.call('HSET', K_BST, seq, string.format('%d|%d|', state.count, state.left) .. table.concat(parts))
end

-- The ids of batch `seq`, in position order (empty when it is gone).
local function batch_ids(seq)
  local rec = redis.call('HGET', K_BAT, seq)
  local ids = {}
  if not rec then return ids end
  for id in string.gmatch(rec, '[^\1]+') do ids[#ids + 1] = id end
  return ids
end

local function mki_member(class, score, id)
  return class .. '\1' .. pad(score) .. '\1' .. id
end

-- The earliest due time of the pending items, false when none is.
local function head_due()
  local h = redis.call('ZRANGE', K_DUE, 0, 0, 'WITHSCORES')
  if #h == 0 then return false end
  return tonumber(h[2])
end

-- Idle consumers sleep until the earliest due time they saw (at most their idle
-- cap). When pending items now start earlier than `before` (the head before this
-- script), say so on the family's wake channel, `<prefix>:<family>:wake`, as
-- `queue due_ms`: consumers then look at this queue at `due`, not at their cap.
local function announce(before, due)
  if before and before <= due then return end
  local family, q = string.match(K_DUE, '^{(.*):(%d+)}:due$')
  -- pcall: a user whose ACL has no channel access (Redis 7's default for new users)
  -- still enqueues; its consumers then learn on their idle cap.
  redis.pcall('PUBLISH', family .. ':wake', q .. ' ' .. num(due))
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

-- Checks a caller's layout epoch against this queue's seal and raises the seal to
-- it. Answers nil when the caller may go on, or the newer epoch that refuses it.
local function seal(epoch)
  local e = tonumber(epoch)
  local cur = tonumber(redis.call('GET', K_EPOCH) or '0')
  if cur > e then return cur end
  if cur < e then redis.call('SET', K_EPOCH, e) end
  return nil
end

-- A length-prefixed field of a body whose u32 LE length starts at byte `p`: the
-- field and the position of the next field's length.
local function field_at(body, p)
  local b1, b2, b3, b4 = string.byte(body, p, p + 3)
  local len = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
  return string.sub(body, p + 4, p + 3 + len), p + 4 + len
end

-- The routing key inside a body: after "max|due|" come a version byte and the
-- key's u32 LE length.
local function key_of(body)
  local p = string.find(body, '|', string.find(body, '|', 1, true) + 1, true)
  return (field_at(body, p + 2))
end

-- The handler inside a body: the field after the key.
local function handler_of(body)
  local p = string.find(body, '|', string.find(body, '|', 1, true) + 1, true)
  local _, next = field_at(body, p + 2)
  return (field_at(body, next))
end

-- The due time in a body's header.
local function due_of(body)
  return tonumber(string.match(body, '^%d+|(%-?%d+)|'))
end

-- The id and due score inside a park member (handler \1 pad(due) \1 id).
local function parked_of(member)
  local a = string.find(member, '\1', 1, true)
  return string.sub(member, a + 18), tonumber(string.sub(member, a + 1, a + 16))
end

-- Parks an item (in no set): it waits for a consumer that serves its handler, at
-- its due time.
local function park(id, body)
  local m = handler_of(body) .. '\1' .. pad(due_of(body)) .. '\1' .. id
  redis.call('ZADD', K_PARK, 0, m)
  redis.call('HSET', K_PARKI, id, m)
end

-- Takes a waiting item out of the park; answers its due score, or false.
local function unpark(id)
  local m = redis.call('HGET', K_PARKI, id)
  if not m then return false end
  redis.call('ZREM', K_PARK, m)
  redis.call('HDEL', K_PARKI, id)
  local _, score = parked_of(m)
  return score
end
